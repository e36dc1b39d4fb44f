import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The ranks of a one-process-per-GPU group meeting through a `RendezvousStore`: collective steps (all-gather of a
/// few bytes, barrier) that every rank calls in the same order, each bounded by `timeout`.
///
/// `join` is step 0: every rank posts its world size, node and process id; rank 0 also posts a session id that
/// namespaces every later key, aborts included (so a directory store's leftovers of an earlier run are never read
/// as this run's; an abort posted during join carries its time, and one older than the joining rank's start by
/// more than a timeout is an earlier run's and ignored).
/// A rank out of range, a rank claimed twice, or different world sizes are typed errors on every rank that sees
/// them; a rank that gives up posts why (`abort`), and every rank waiting in a step then fails with that reason
/// instead of waiting out its timeout. A step that times out names the ranks that never posted.
public final class Rendezvous: @unchecked Sendable {
    // @unchecked: immutable except `step`, a Mutex.

    /// This process's rank.
    public let rank: Int
    /// Ranks in the group.
    public let worldSize: Int
    /// Where the ranks meet.
    public let store: any RendezvousStore
    /// How long a step waits for the slowest rank.
    public let timeout: Duration
    /// Each rank's node name and process id, as posted at join (index = rank).
    public let members: [(host: String, pid: Int)]
    /// Rank 0's session id (namespaces every key after join).
    public let session: String
    private let step = Mutex(0)
    private static let pollInterval: Duration = .milliseconds(2)

    /// Joins the group as `rank` of `worldSize`: posts this process's record and waits (up to `timeout`) for
    /// every other rank's.
    ///
    /// - Throws: `RendezvousError` (`rankOutOfRange`, `duplicateRank`, `worldSizeMismatch`, `timeout` naming the
    ///   ranks that never joined, `aborted` when another rank gave up, `unreachable` for store failures).
    public static func join(rank: Int, worldSize: Int, store: any RendezvousStore, timeout: Duration = .seconds(60))
        throws(RendezvousError) -> Rendezvous
    {
        guard worldSize >= 1 else {
            throw RendezvousError(.rankOutOfRange(rank: rank, worldSize: worldSize),
                                  "the world size must be at least 1 (got \(worldSize))")
        }
        guard (0..<worldSize).contains(rank) else {
            let why = "a process was started as rank \(rank), but the world size is \(worldSize) "
                + "(ranks 0...\(worldSize - 1)): give every process a distinct --rank below --world-size"
            postAbort(store, key: joinAbortKey, by: rank, why)
            throw RendezvousError(.rankOutOfRange(rank: rank, worldSize: worldSize), why)
        }
        var mine = RendezvousRecord([
            "world": "\(worldSize)", "host": hostName(), "pid": "\(getpid())",
        ])
        if rank == 0 { mine["session"] = hexString((0..<8).map { _ in UInt8.random(in: 0...255) }) }
        let records = try gather(
            store: store, prefix: "join", abortKey: joinAbortKey, rank: rank, worldSize: worldSize, value: mine.bytes,
            timeout: timeout, what: "join", staleBefore: wallClock() - Int(timeout.components.seconds) - 1)
        let parsed = records.map(RendezvousRecord.init(bytes:))
        for (q, record) in parsed.enumerated() where record.int("world") != worldSize {
            let why = "rank \(q) was started with world size \(record["world"] ?? "?"), rank \(rank) with "
                + "\(worldSize): start every process with the same --world-size"
            postAbort(store, key: joinAbortKey, by: rank, why)
            throw RendezvousError(.worldSizeMismatch, why)
        }
        let members = parsed.map { (host: $0["host"] ?? "?", pid: $0.int("pid") ?? 0) }
        let r = Rendezvous(
            rank: rank, worldSize: worldSize, store: store, timeout: timeout, members: members,
            session: parsed[0]["session"] ?? "none")
        return r
    }

    private init(rank: Int, worldSize: Int, store: any RendezvousStore, timeout: Duration,
                 members: [(host: String, pid: Int)], session: String)
    {
        self.rank = rank
        self.worldSize = worldSize
        self.store = store
        self.timeout = timeout
        self.members = members
        self.session = session
    }

    /// Every rank's `bytes` for step `name`, indexed by rank (this rank's own included). All ranks must call the
    /// same steps in the same order.
    public func allGather(_ name: String, _ bytes: [UInt8]) throws(RendezvousError) -> [[UInt8]] {
        let n = step.withLock {
            $0 += 1
            return $0
        }
        let values = try Self.gather(
            store: store, prefix: "\(session)/\(n)", abortKey: abortKey, rank: rank, worldSize: worldSize,
            value: bytes, timeout: timeout, what: name)
        // Every rank has posted step n, so every rank has read all of step n − 1: its keys can go (join's too).
        let previous = n == 1 ? "join" : "\(session)/\(n - 1)"
        try store.delete("\(previous)/\(rank)")
        return values
    }

    /// Tells every rank waiting in a step that this one gave up, and why (the first abort posted wins).
    public func abort(_ reason: String) { Self.postAbort(store, key: abortKey, by: rank, reason) }

    // MARK: - Machinery

    /// Where aborts go during join (no session yet), and after it.
    private static let joinAbortKey = "abort"
    private var abortKey: String { "\(session)/abort" }

    static func postAbort(_ store: any RendezvousStore, key: String, by rank: Int, _ reason: String) {
        let record = RendezvousRecord(["rank": "\(rank)", "reason": reason, "time": "\(wallClock())"])
        _ = try? store.set(key, record.bytes, exclusive: true)
    }

    /// Seconds since the epoch (abort records from an earlier run are told apart by it).
    static func wallClock() -> Int { time(nil) }

    /// Posts `value` under `prefix/rank` (exclusively: a taken key is a duplicate rank) and polls for every rank's.
    private static func gather(
        store: any RendezvousStore, prefix: String, abortKey: String, rank: Int, worldSize: Int, value: [UInt8],
        timeout: Duration, what: String, staleBefore: Int? = nil
    ) throws(RendezvousError) -> [[UInt8]] {
        guard try store.set("\(prefix)/\(rank)", value, exclusive: true) else {
            let why = "rank \(rank) joined twice at \(store.location) (two processes were given --rank \(rank), or "
                + "the store holds keys of an earlier run: use an empty directory or a fresh port)"
            postAbort(store, key: abortKey, by: rank, why)
            throw RendezvousError(.duplicateRank(rank), why)
        }
        var values = [[UInt8]?](repeating: nil, count: worldSize)
        values[rank] = value
        let clock = ContinuousClock()
        let deadline = clock.now + timeout
        while true {
            for q in 0..<worldSize where values[q] == nil {
                values[q] = try store.get("\(prefix)/\(q)")
            }
            // An abort wins even over a complete step: the group is broken once any rank gave up.
            if let posted = try store.get(abortKey) {
                let record = RendezvousRecord(bytes: posted)
                // A reused directory may hold an earlier run's abort: older than this join by more than a timeout.
                let stale = staleBefore.map { (record.int("time") ?? Int.max) < $0 } ?? false
                let by = record.int("rank") ?? -1
                if !stale {
                    throw RendezvousError(
                        .aborted(by: by),
                        "rank \(rank) stopped in step '\(what)': rank \(by) gave up: \(record["reason"] ?? "no reason")")
                }
            }
            if values.allSatisfy({ $0 != nil }) { return values.map { $0! } }
            if clock.now >= deadline {
                let missing = (0..<worldSize).filter { values[$0] == nil }
                throw RendezvousError(
                    .timeout(missing: missing),
                    "rendezvous at \(store.location) timed out after \(timeout) in step '\(what)' on rank \(rank): "
                        + "rank\(missing.count == 1 ? "" : "s") \(missing.map(String.init).joined(separator: ", ")) "
                        + "never posted (not started, crashed, or given another --rendezvous)")
            }
            sleepFor(pollInterval)
        }
    }

    /// This node's name (gethostname).
    static func hostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "unknown" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// Sleeps the calling thread (the rendezvous polls from plain threads, not async tasks).
func sleepFor(_ d: Duration) {
    let c = d.components
    var ts = timespec(tv_sec: Int(c.seconds), tv_nsec: Int(c.attoseconds / 1_000_000_000))
    _ = nanosleep(&ts, nil)
}
