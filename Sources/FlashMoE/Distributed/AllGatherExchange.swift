import Synchronization

/// A `RankExchange` over a caller's all-gather of equal-sized byte blocks: what a framework already has
/// (`torch.distributed.all_gather`, `MPI_Allgather`, NCCL), so a group needs no store of ours.
///
/// The caller's collective matches calls by order, not by name, and takes the same byte count on every rank. So
/// each step is two collective calls: a 32-byte header from every rank (its rank and world size as it was told,
/// the payload length, a hash of the step's name, an abort bit), then every payload padded to the longest. The
/// headers make these typed errors on every rank, before any payload is read: two processes given one rank, a rank
/// at another position of the caller's group than it was told (`rankOutOfRange` / `duplicateRank`), different
/// world sizes (`worldSizeMismatch`), ranks in different steps (`outOfStep`, a bug in the caller's call order).
///
/// `abort(reason)` is a step of its own: a rank that fails between steps takes part in the next collective with
/// the abort bit and its reason, so the ranks waiting there fail at once with that reason (`aborted(by:)`) rather
/// than waiting out the caller's collective timeout.
///
/// Bounded only as the caller's collective is (torch.distributed's process-group timeout, say). When it throws,
/// this exchange is broken: later steps throw at once without calling it.
public final class AllGatherExchange: RankExchange, @unchecked Sendable {
    // @unchecked: immutable but for `state`, a Mutex.

    /// All-gathers `bytes` (the same count on every rank): every rank's block, in rank order (world size × count
    /// bytes). Throws (or returns a wrong length) when the collective failed.
    public typealias AllGather = @Sendable (_ bytes: [UInt8]) throws -> [UInt8]

    /// This process's rank, as the caller said.
    public let rank: Int
    /// Ranks in the group, as the caller said.
    public let worldSize: Int
    private let gather: AllGather
    private let state = Mutex<String?>(nil)  // why the exchange broke, once it has

    /// The header of a step: magic, flags, payload length, step-name hash, rank, world size (32 bytes).
    static let headerBytes = 32
    private static let magic: UInt32 = 0x464D_4758  // "FMGX"
    private static let abortFlag: UInt32 = 1

    /// An exchange for `rank` of `worldSize` over `allGather`.
    ///
    /// - Throws: `RendezvousError.rankOutOfRange` unless 0 ≤ rank < worldSize (checked here, before any collective,
    ///   so a bad rank is reported by the rank that has it; the others meet it in the first step's headers).
    public init(rank: Int, worldSize: Int, allGather: @escaping AllGather) throws(RendezvousError) {
        guard worldSize >= 1 else {
            throw RendezvousError(
                .rankOutOfRange(rank: rank, worldSize: worldSize), "the world size must be at least 1 (got \(worldSize))")
        }
        guard (0..<worldSize).contains(rank) else {
            throw RendezvousError(
                .rankOutOfRange(rank: rank, worldSize: worldSize),
                "rank \(rank) is out of range for world size \(worldSize) (ranks 0...\(worldSize - 1))")
        }
        self.rank = rank
        self.worldSize = worldSize
        gather = allGather
    }

    /// Step `name`: two calls of the caller's all-gather (headers, then payloads padded to the longest); every
    /// rank's `bytes`, indexed by rank. Throws `RendezvousError` for a mismatched group, an abort or a failed call.
    public func allGather(_ name: String, _ bytes: [UInt8]) throws -> [[UInt8]] {
        try step(name, bytes, abort: false)
    }

    /// Takes part in the next step with the abort bit and `reason`: the other ranks fail in that step with it.
    /// Does nothing once the exchange is broken (the collective itself failed, or this rank already aborted).
    public func abort(_ reason: String) {
        _ = try? step("abort", Array(reason.utf8), abort: true)
        breakExchange("rank \(rank) gave up: \(reason)")
    }

    /// Breaks the exchange (later steps throw at once); the caller's collective is the caller's to release.
    public func close() { breakExchange("the exchange was closed") }

    // MARK: - Machinery

    private func breakExchange(_ why: String) { state.withLock { if $0 == nil { $0 = why } } }

    private func step(_ name: String, _ bytes: [UInt8], abort: Bool) throws -> [[UInt8]] {
        if let broken = state.withLock({ $0 }) {
            throw RendezvousError(.unreachable, "rank \(rank) cannot run step '\(name)': \(broken)")
        }
        do {
            return try exchange(name, bytes, abort: abort)
        } catch {
            breakExchange(error.message)
            throw error
        }
    }

    private func exchange(_ name: String, _ bytes: [UInt8], abort: Bool) throws(RendezvousError) -> [[UInt8]] {
        let mine = Header(flags: abort ? Self.abortFlag : 0, length: bytes.count, step: Self.hash(name), rank: rank,
                          world: worldSize)
        let all = try collective(mine.bytes, name, "headers").map(Header.init(bytes:))
        // Every rank judges the same headers, so all of them skip (or make) the payload round alike.
        var headers: [Header] = []
        for (q, h) in all.enumerated() {
            guard let h else {
                throw RendezvousError(
                    .unreachable,
                    "step '\(name)' on rank \(rank): position \(q) of the all-gather holds no FlashMoE header (the "
                        + "callback must gather the blocks of every rank of the group, in rank order)")
            }
            headers.append(h)
        }
        try checkPositions(headers)
        let longest = headers.map(\.length).max() ?? 0
        guard longest <= 1 << 30 else {
            throw RendezvousError(.unreachable, "step '\(name)': a rank announced a \(longest)-byte record (corrupt header)")
        }
        let aborted = headers.firstIndex { $0.flags & Self.abortFlag != 0 }
        if aborted == nil, let q = headers.firstIndex(where: { $0.step != mine.step }) {
            throw RendezvousError(
                .outOfStep,
                "rank \(q) is in another step than rank \(rank) ('\(name)'): every rank must make the same calls in "
                    + "the same order (create, forward, destroy on every rank)")
        }
        let padded = bytes + [UInt8](repeating: 0, count: longest - bytes.count)
        let payloads = longest == 0
            ? [[UInt8]](repeating: [], count: worldSize) : try collective(padded, name, "records")
        if let q = aborted {
            let reason = String(decoding: payloads[q].prefix(headers[q].length), as: UTF8.self)
            throw RendezvousError(.aborted(by: q), "rank \(rank) stopped in step '\(name)': rank \(q) gave up: \(reason)")
        }
        return zip(headers, payloads).map { Array($1.prefix($0.length)) }
    }

    /// Every header's world size is this rank's, and the header at position q says rank q.
    private func checkPositions(_ headers: [Header]) throws(RendezvousError) {
        for (q, h) in headers.enumerated() {
            if h.world != worldSize {
                throw RendezvousError(
                    .worldSizeMismatch,
                    "the process at position \(q) of the all-gather was given world size \(h.world), rank \(rank) "
                        + "was given \(worldSize): give every rank the size of the group its all-gather spans")
            }
            if h.rank != q {
                let twice = headers.enumerated().filter { $0.element.rank == h.rank }.map(\.offset)
                let why = twice.count > 1
                    ? "the processes at positions \(twice.map(String.init).joined(separator: ", ")) of the all-gather "
                        + "were all given rank \(h.rank)"
                    : "the process at position \(q) of the all-gather was given rank \(h.rank)"
                throw RendezvousError(
                    twice.count > 1 ? .duplicateRank(h.rank) : .rankOutOfRange(rank: h.rank, worldSize: worldSize),
                    "\(why): each process's rank must be its position in the group the all-gather spans "
                        + "(torch.distributed.get_rank(group))")
            }
        }
    }

    /// One call of the caller's all-gather, checked: every rank's `block`, split.
    private func collective(_ block: [UInt8], _ name: String, _ what: String) throws(RendezvousError) -> [[UInt8]] {
        let all: [UInt8]
        do {
            all = try gather(block)
        } catch {
            throw RendezvousError(
                .unreachable, "the all-gather of step '\(name)' (\(what)) failed on rank \(rank): \(error)")
        }
        guard all.count == block.count * worldSize else {
            throw RendezvousError(
                .unreachable,
                "the all-gather of step '\(name)' (\(what)) returned \(all.count) bytes for \(worldSize) ranks of "
                    + "\(block.count): it must return every rank's block, in rank order")
        }
        return (0..<worldSize).map { Array(all[$0 * block.count..<($0 + 1) * block.count]) }
    }

    /// A 64-bit FNV-1a hash of a step's name (ranks compare it; no security needed).
    static func hash(_ name: String) -> UInt64 {
        name.utf8.reduce(0xcbf2_9ce4_8422_2325 as UInt64) { ($0 ^ UInt64($1)) &* 0x100_0000_01b3 }
    }

    struct Header {
        var flags: UInt32, length: Int, step: UInt64, rank: Int, world: Int

        init(flags: UInt32, length: Int, step: UInt64, rank: Int, world: Int) {
            (self.flags, self.length, self.step, self.rank, self.world) = (flags, length, step, rank, world)
        }

        /// The header in `bytes`, or nil when they are not one.
        init?(bytes b: [UInt8]) {
            func word(_ at: Int, _ n: Int) -> UInt64 {
                (0..<n).reduce(UInt64(0)) { $0 | UInt64(b[at + $1]) << (8 * $1) }
            }
            guard b.count == AllGatherExchange.headerBytes, word(0, 4) == UInt64(AllGatherExchange.magic) else {
                return nil
            }
            self.init(
                flags: UInt32(word(4, 4)), length: Int(truncatingIfNeeded: word(8, 8)), step: word(16, 8),
                rank: Int(Int32(truncatingIfNeeded: word(24, 4))), world: Int(Int32(truncatingIfNeeded: word(28, 4))))
        }

        var bytes: [UInt8] {
            func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
            return le(AllGatherExchange.magic) + le(flags) + le(UInt64(length)) + le(step) + le(Int32(rank))
                + le(Int32(world))
        }
    }
}
