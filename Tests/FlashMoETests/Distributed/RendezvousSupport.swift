import Synchronization

@testable import FlashMoE

/// Runs `count` participants, each on its own thread (a participant blocks while it polls the store, so they must
/// not share the cooperative pool), and returns each one's result in order.
func runParticipants<T: Sendable>(_ count: Int, _ body: @escaping @Sendable (Int) throws -> T) -> [Result<T, any Error>] {
    let results = Mutex([Result<T, any Error>?](repeating: nil, count: count))
    for i in 0..<count {
        startThread {
            let r = Result { try body(i) }
            results.withLock { $0[i] = r }
        }
    }
    while results.withLock({ $0.contains { $0 == nil } }) { sleepFor(.milliseconds(2)) }
    return results.withLock { $0.map { $0! } }
}

/// The `RendezvousError` a result failed with, or nil.
func rendezvousError<T>(_ r: Result<T, any Error>) -> RendezvousError? {
    if case .failure(let e) = r { return e as? RendezvousError }
    return nil
}

/// The two kinds of store, for tests that run on both: a fresh one for a world of ranks (rank 0's TCP store
/// serves on a free loopback port; the directory store lives in a new temporary directory).
enum StoreKind: String, CaseIterable, Sendable, CustomStringConvertible {
    case tcp, directory
    var description: String { rawValue }

    /// A store factory: `open(rank)` gives that rank's store. Call `cleanup` at the end.
    func make(connectTimeout: Duration = .seconds(5)) throws -> (open: @Sendable (Int) throws -> any RendezvousStore, cleanup: @Sendable () -> Void) {
        switch self {
        case .tcp:
            let server = try RendezvousTCPStore.serve(host: "127.0.0.1", port: 0)
            let port = server.port
            return ({ rank in
                rank == 0 ? server : try RendezvousTCPStore.connect(host: "127.0.0.1", port: port, timeout: connectTimeout)
            }, { server.close() })
        case .directory:
            guard case .success(let path) = SystemFiles.makeTemporaryDirectory(prefix: "flashmoe-rdzv") else {
                throw RendezvousError(.unreachable, "no temporary directory")
            }
            let store = try RendezvousDirectoryStore(path: path)
            return ({ _ in store }, { SystemFiles.removeDirectory(path) })
        }
    }
}

/// A `RankExchange` without a store, as a framework's all-gather would be (e.g. torch.distributed): the ranks of
/// one process share a table and poll it.
final class InProcessExchange: RankExchange, @unchecked Sendable {
    final class Group: Sendable {
        let posts = Mutex<[String: [UInt8]]>([:])
    }
    let rank: Int
    let worldSize: Int
    let group: Group
    private let step = Mutex(0)

    init(rank: Int, worldSize: Int, group: Group) {
        self.rank = rank
        self.worldSize = worldSize
        self.group = group
    }

    func allGather(_ name: String, _ bytes: [UInt8]) throws -> [[UInt8]] {
        let n = step.withLock {
            $0 += 1
            return $0
        }
        group.posts.withLock { $0["\(n)/\(rank)"] = bytes }
        let clock = ContinuousClock()
        let deadline = clock.now + .seconds(10)
        while true {
            let all = group.posts.withLock { p in (0..<worldSize).compactMap { p["\(n)/\($0)"] } }
            if all.count == worldSize { return all }
            guard clock.now < deadline else { throw RendezvousError(.timeout(missing: []), "in-process step \(name)") }
            sleepFor(.milliseconds(1))
        }
    }

    func abort(_ reason: String) {}
    func close() {}
}
