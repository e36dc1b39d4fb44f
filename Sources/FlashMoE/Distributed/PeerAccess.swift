/// Two GPUs that must work together cannot: the fused kernel on `source` stores rows into `destination`'s
/// buffers and updates its counters with system-scope atomics, so it needs both a direct path and native atomics
/// over it. The text names both GPUs and what to change.
public struct PeerAccessError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What the link from `source` to `destination` lacks.
    public enum Reason: Sendable, Hashable {
        /// `cuDeviceCanAccessPeer` says `source` cannot reach `destination`'s memory at all.
        case noAccess
        /// The path exists but does not carry native atomics (`CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED`
        /// is 0), so `atom.add.sys` on `destination`'s counters would not be atomic.
        case noNativeAtomics
    }

    /// The ordinal of the GPU whose kernels would access the other's memory.
    public let source: Int
    /// The ordinal of the GPU whose memory would be accessed.
    public let destination: Int
    /// What is missing.
    public let reason: Reason

    /// An error for the link from GPU `source` to GPU `destination`.
    public init(source: Int, destination: Int, reason: Reason) {
        self.source = source
        self.destination = destination
        self.reason = reason
    }

    /// Which GPU cannot use which one's memory, what the link lacks, and how to place the ranks instead.
    public var description: String {
        let remedy = "or all ranks on one GPU"
        switch reason {
        case .noAccess:
            return "GPU \(source) cannot access GPU \(destination)'s memory directly (no NVLink or PCIe "
                + "peer-to-peer path): run the ranks on GPUs that cuDeviceCanAccessPeer connects (nvidia-smi topo -m), "
                + remedy
        case .noNativeAtomics:
            return "GPU \(source) can access GPU \(destination)'s memory, but not with native atomics (typical of "
                + "PCIe peer-to-peer), and the kernel updates GPU \(destination)'s counters with system-scope "
                + "atomics: run the ranks on GPUs connected by NVLink (NV# in nvidia-smi topo -m), " + remedy
        }
    }
}

/// Connects the GPUs of a multi-GPU run so that each one's kernels can store into and atomically update every
/// other's memory.
public enum PeerAccess {
    /// Checks every ordered pair of distinct GPUs among `devices` (direct access and native atomics, both ways),
    /// then enables peer access for each pair both ways, and returns the links checked.
    ///
    /// Devices with the same ordinal are one GPU, however often they are listed: ranks sharing a GPU need no peer
    /// access, so one GPU, or N ranks on it, connects nothing. Pairs are checked in the order the GPUs are first
    /// listed (source, then destination), and all of them before any access is enabled, so a failure leaves
    /// nothing half-connected.
    ///
    /// - Throws: `PeerAccessError` for the first pair that lacks access or native atomics; `CUDAError` when a
    ///   driver call fails.
    @discardableResult
    public static func connect(_ devices: [CUDADevice]) throws -> [PeerLink] {
        var gpus: [CUDADevice] = []
        for device in devices where !gpus.contains(where: { $0.properties.ordinal == device.properties.ordinal }) {
            gpus.append(device)
        }
        var pairs: [(source: CUDADevice, destination: CUDADevice, link: PeerLink)] = []
        for source in gpus {
            for destination in gpus where destination !== source {
                let link = try source.peerLink(to: destination)
                let missing: PeerAccessError.Reason? =
                    !link.access ? .noAccess : !link.nativeAtomics ? .noNativeAtomics : nil
                if let missing {
                    throw PeerAccessError(source: link.source, destination: link.destination, reason: missing)
                }
                pairs.append((source, destination, link))
            }
        }
        for pair in pairs {
            try pair.source.enablePeerAccess(to: pair.destination)
        }
        return pairs.map(\.link)
    }
}
