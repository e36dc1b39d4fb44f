/// How the ranks of a one-process-per-GPU group exchange small records: collective steps every rank calls in the
/// same order. `Rendezvous` is one (a TCP or directory store); a framework can supply its own, e.g. an all-gather
/// over `torch.distributed` behind the C ABI, and `RankProcessMoE`, `IPCPeerTable`, `RankGroupCheck` and
/// `NVSHMEMLibrary.bootstrap` work the same over it.
public protocol RankExchange: AnyObject, Sendable {
    /// This process's rank.
    var rank: Int { get }
    /// Ranks in the group.
    var worldSize: Int { get }
    /// Every rank's `bytes` for step `name`, indexed by rank. Bounded: a missing rank is an error, not a hang.
    func allGather(_ name: String, _ bytes: [UInt8]) throws -> [[UInt8]]
    /// Tells the ranks waiting in a step that this one gave up (best effort; may do nothing).
    func abort(_ reason: String)
    /// Releases what the exchange holds (a store's connection or server). Idempotent.
    func close()
}

extension RankExchange {
    /// Waits until every rank reached step `name`.
    public func barrier(_ name: String) throws { _ = try allGather(name, []) }

    /// Every rank's `value` for step `name`, indexed by rank (nil where a rank's text is not an integer).
    func allGather(_ name: String, int value: Int) throws -> [Int?] {
        try allGather(name, Array("\(value)".utf8)).map { Int(String(decoding: $0, as: UTF8.self)) }
    }
}

extension Rendezvous: RankExchange {
    /// Closes the store (rank 0's TCP store stops serving). Idempotent.
    public func close() { store.close() }
}
