/// What the driver reports about the direct path from one GPU to another (`cuDeviceCanAccessPeer` and
/// `cuDeviceGetP2PAttribute`). Links are directional: the path from A to B and from B to A are asked separately.
public struct PeerLink: Sendable, Hashable {
    /// The ordinal of the GPU whose kernels access the other's memory.
    public let source: Int
    /// The ordinal of the GPU whose memory is accessed.
    public let destination: Int
    /// Whether kernels on `source` can load and store `destination`'s memory directly (NVLink or PCIe P2P).
    public let access: Bool
    /// Whether those accesses include native atomics (`atom.*.sys` on `destination`'s memory); without them
    /// the kernel's remote counters would be wrong or fault.
    public let nativeAtomics: Bool
    /// The driver's relative rank of this link against the machine's other links (lower is better, 0 where the
    /// driver does not rank it); only comparable between links of one machine.
    public let performanceRank: Int

    /// A link as reported (public so that callers and tests can describe a topology).
    public init(source: Int, destination: Int, access: Bool, nativeAtomics: Bool, performanceRank: Int) {
        self.source = source
        self.destination = destination
        self.access = access
        self.nativeAtomics = nativeAtomics
        self.performanceRank = performanceRank
    }
}
