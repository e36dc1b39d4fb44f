/// How E experts are spread over R ranks: contiguous blocks, the first E mod R ranks one expert larger (so E need
/// not divide by R). The kernel computes the same placement (`rank_first` in moe.cu).
public struct ExpertPlacement: Sendable, Hashable {
    /// Experts E.
    public let experts: Int
    /// Ranks R.
    public let ranks: Int

    /// Checks 1 ≤ R ≤ E.
    public init(experts: Int, ranks: Int) throws(MoEError) {
        guard ranks >= 1 else { throw MoEError(.invalidConfig, "ranks must be at least 1 (got \(ranks))") }
        guard ranks <= experts else {
            throw MoEError(.invalidConfig, "\(ranks) ranks need at least \(ranks) experts (got \(experts)): use fewer ranks")
        }
        self.experts = experts
        self.ranks = ranks
    }

    private var blocks: ContiguousBlocks { ContiguousBlocks(count: experts, parts: ranks) }

    /// The first expert of rank `r` (r = R gives E).
    public func firstExpert(of r: Int) -> Int { blocks.first(of: r) }

    /// The experts rank `r` owns.
    public func experts(of r: Int) -> Range<Int> { blocks.block(r) }

    /// The rank that owns expert `e`.
    public func owner(of e: Int) -> Int { blocks.part(of: e) }
}

/// What one forward moved between ranks, per source rank: rows dispatched to experts on other ranks, their results
/// returned, and the signalling words (counters, flags, atomics). Rows routed to the rank's own experts and rows
/// dropped by capacity move nothing.
public struct RankTraffic: Sendable, Hashable {
    /// The source rank.
    public let rank: Int
    /// Rows this rank's tokens sent to experts owned by other ranks.
    public let remoteRows: Int
    /// remoteRows × H × element size: the dispatch payload.
    public let dispatchBytes: Int
    /// remoteRows × H × 4: the FP32 results written back into this rank's return buffer (× 2 with storage returns,
    /// `FusedOptions.storageReturns`).
    public let returnBytes: Int
    /// Flags and counters: one 8-byte row flag per expert of another rank (empty ones included), the count
    /// all-gather (E counts of 4 bytes and an 8-byte flag to every other rank), and one 4-byte pending increment
    /// per returned row. (The combine-list push of a token whose last contribution came from another rank, 12 bytes,
    /// is not counted.)
    public let signalBytes: Int

    /// Everything this rank put on the wire.
    public var totalBytes: Int { dispatchBytes + returnBytes + signalBytes }
}
