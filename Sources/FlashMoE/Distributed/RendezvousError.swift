/// Why the ranks of a one-process-per-GPU group could not meet, or refused to work together. Every check runs
/// before any kernel launch; the text names the ranks involved and what to change.
public struct RendezvousError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What went wrong, for callers that branch on it.
    public enum Kind: Sendable, Hashable {
        /// A step waited past its timeout: these ranks never posted their part.
        case timeout(missing: [Int])
        /// The `--rendezvous` text is not `tcp://HOST:PORT` or `dir:/PATH`.
        case badAddress
        /// The store could not be served, reached or read (socket or file error).
        case unreachable
        /// A rank outside 0..<worldSize.
        case rankOutOfRange(rank: Int, worldSize: Int)
        /// Two processes claimed the same rank (or a store holds a stale run's keys).
        case duplicateRank(Int)
        /// The ranks were started with different world sizes.
        case worldSizeMismatch
        /// The ranks' layer configs or weight shapes differ (hashes differ): the ranks named first and second.
        case configMismatch(rank: Int, other: Int)
        /// The ranks' CUDA drivers report different versions.
        case driverMismatch(rank: Int, other: Int)
        /// The ranks run on different nodes (IPC memory needs one node).
        case differentNodes(rank: Int, other: Int)
        /// The world cannot be split: E < ranks.
        case invalidWorld
        /// Another rank gave up and posted why.
        case aborted(by: Int)
        /// These ranks have no usable CUDA driver (an expert-parallel group runs on GPUs only).
        case noDriver(ranks: [Int])
        /// The ranks called different collective steps (a framework's all-gather matches calls by order).
        case outOfStep
    }

    /// What went wrong.
    public let kind: Kind
    /// What happened and what to change.
    public let message: String

    /// An error of `kind` saying `message`.
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    /// `message` alone (it already says what happened and what to change).
    public var description: String { message }
}

/// A rank could not map a peer's buffers (`cuIpcOpenMemHandle` failed): names both ranks and their GPUs.
public struct PeerMappingError: Error, Sendable, CustomStringConvertible {
    /// The rank that tried to map.
    public let rank: Int
    /// Its GPU: ordinal and name.
    public let gpu: String
    /// The rank whose buffer could not be mapped.
    public let peer: Int
    /// The peer's GPU, as it described it.
    public let peerGPU: String
    /// The driver's error text.
    public let detail: String

    /// Both ranks and their GPUs, the driver's text, and how to run the ranks so they can map each other's buffers.
    public var description: String {
        "rank \(rank) (\(gpu)) cannot map the buffers of rank \(peer) (\(peerGPU)): \(detail). Run every rank on one "
            + "node with its GPUs visible to every process (CUDA_VISIBLE_DEVICES), with peer access between them "
            + "(nvidia-smi topo -m), and keep every rank alive until all have joined"
    }
}
