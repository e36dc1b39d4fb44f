import Synchronization
import Testing

@testable import FlashMoE

/// An all-gather of equal-sized blocks between threads of this process, as a framework's collective is between
/// processes: the n-th call of every participant meets the n-th call of the others (by order, not by name).
final class BlockGather: Sendable {
    let world: Int
    private let posts = Mutex<[Int: [Int: [UInt8]]]>([:])  // call number → position → block
    private let calls = Mutex<[Int: Int]>([:])  // position → calls made
    /// Every call counted here (to check that a broken exchange stops calling).
    let total = Mutex(0)

    init(world: Int) { self.world = world }

    /// Participant `position`'s all-gather.
    func gather(position: Int) -> AllGatherExchange.AllGather {
        { [self] block in
            let n = calls.withLock { c in
                c[position, default: 0] += 1
                return c[position]!
            }
            total.withLock { $0 += 1 }
            posts.withLock { $0[n, default: [:]][position] = block }
            let clock = ContinuousClock()
            let deadline = clock.now + .seconds(10)
            while true {
                let all = posts.withLock { p in p[n].flatMap { step in step.count == world ? step : nil } }
                if let all { return (0..<world).flatMap { all[$0]! } }
                guard clock.now < deadline else { throw RendezvousError(.timeout(missing: []), "in-process gather") }
                sleepFor(.milliseconds(1))
            }
        }
    }
}

@Suite struct AllGatherExchangeTests {
    /// Runs `world` participants, participant i told rank `ranks[i]` and world size `worlds[i]`.
    static func run<T: Sendable>(
        _ world: Int, ranks: [Int]? = nil, worlds: [Int]? = nil, gather: BlockGather? = nil,
        _ body: @escaping @Sendable (AllGatherExchange) throws -> T
    ) -> [Result<T, any Error>] {
        let g = gather ?? BlockGather(world: world)
        return runParticipants(world) { i in
            let exchange = try AllGatherExchange(
                rank: ranks?[i] ?? i, worldSize: worlds?[i] ?? world, allGather: g.gather(position: i))
            return try body(exchange)
        }
    }

    @Test func recordsOfDifferentLengthsComeBackInRankOrder() throws {
        let results = Self.run(3) { x -> [[[UInt8]]] in
            let r = x.rank
            let first = try x.allGather("one", [UInt8](repeating: UInt8(r), count: r * 5))
            let empty = try x.allGather("empty", [])
            try x.barrier("done")
            return [first, empty]
        }
        for result in results {
            let steps = try result.get()
            #expect(steps[0] == [[], [1, 1, 1, 1, 1], [UInt8](repeating: 2, count: 10)])
            #expect(steps[1] == [[], [], []])
        }
    }

    @Test func twoProcessesGivenOneRankFailEveryRank() throws {
        let results = Self.run(3, ranks: [0, 0, 2]) { try $0.allGather("join", [1]) }
        for result in results {
            let e = try #require(rendezvousError(result))
            #expect(e.kind == .duplicateRank(0))
            #expect(e.message.contains("positions 0, 1 of the all-gather were all given rank 0"))
        }
    }

    @Test func aRankAtAnotherPositionIsOutOfRange() throws {
        let results = Self.run(2, ranks: [1, 0]) { try $0.allGather("join", [1]) }
        for result in results {
            #expect(rendezvousError(result)?.kind == .rankOutOfRange(rank: 1, worldSize: 2))
        }
    }

    @Test func anotherWorldSizeIsAMismatchOnTheOthers() throws {
        let results = Self.run(3, worlds: [3, 2, 3]) { try $0.allGather("join", [1]) }
        #expect(rendezvousError(results[0])?.kind == .worldSizeMismatch)
        #expect(rendezvousError(results[2])?.kind == .worldSizeMismatch)
        // Rank 1 was told 2 ranks: the all-gather returned three blocks.
        let e = try #require(rendezvousError(results[1]))
        #expect(e.kind == .unreachable && e.message.contains("for 2 ranks"))
    }

    @Test func ranksInDifferentStepsAreOutOfStep() throws {
        let results = Self.run(2) { x in try x.allGather(x.rank == 0 ? "create" : "forward", [1]) }
        for result in results { #expect(rendezvousError(result)?.kind == .outOfStep) }
    }

    @Test func anAbortEndsTheOthersStepWithItsReason() throws {
        let results = Self.run(3) { x -> Int in
            if x.rank == 1 {
                x.abort("no memory for the weights")
                return 1
            }
            _ = try x.allGather("grid", [7])
            return 0
        }
        #expect(try results[1].get() == 1)
        for i in [0, 2] {
            let e = try #require(rendezvousError(results[i]))
            #expect(e.kind == .aborted(by: 1))
            #expect(e.message.contains("rank 1 gave up: no memory for the weights"))
        }
    }

    @Test func aFailedCollectiveBreaksTheExchange() throws {
        let calls = Mutex(0)
        let x = try AllGatherExchange(rank: 0, worldSize: 2) { _ in
            calls.withLock { $0 += 1 }
            throw RendezvousError(.unreachable, "the process group is gone")
        }
        #expect {
            _ = try x.allGather("one", [1])
        } throws: { error in
            (error as? RendezvousError)?.message.contains("the process group is gone") == true
        }
        #expect(throws: RendezvousError.self) { _ = try x.allGather("two", [1]) }
        x.abort("after the failure")
        #expect(calls.withLock { $0 } == 1, "a broken exchange calls the collective no more")
    }

    @Test func aRankOutOfRangeIsRefusedBeforeAnyCollective() {
        #expect(throws: RendezvousError.self) { _ = try AllGatherExchange(rank: 2, worldSize: 2) { $0 } }
        #expect(throws: RendezvousError.self) { _ = try AllGatherExchange(rank: 0, worldSize: 0) { $0 } }
    }

    @Test func theGroupCheckRunsOverIt() throws {
        let results = Self.run(3) { x in
            _ = try RankGroupTests.check(try RankGroupTests.layer(seed: x.rank == 2 ? 5 : 1)).exchange(x)
        }
        for result in results { #expect(rendezvousError(result)?.kind == .configMismatch(rank: 0, other: 2)) }
    }

    @Test func ranksWithoutADriverFailAlikeAfterTheConfigCheck() throws {
        let config = RankGroupTests.config
        func record(driver: Int, topK: Int = 2) -> RankGroupCheck {
            var c = config
            c.topK = topK
            return RankGroupCheck(
                config: c, routerValues: driver == 0 ? nil : [1, 2, 3], driverVersion: driver,
                driverProblem: driver == 0 ? "libcuda.so.1 not found" : "", host: "node", maxTokens: 8)
        }
        #expect(throws: RendezvousError.self) { try RankGroupCheck.verify([record(driver: 0), record(driver: 0, topK: 1)]) }
        do {
            try RankGroupCheck.verify([record(driver: 13000), record(driver: 0), record(driver: 0)])
            Issue.record("ranks without a driver passed")
        } catch {
            #expect(error.kind == .noDriver(ranks: [1, 2]))
            #expect(error.message.contains("ranks 1, 2 of the group have no usable CUDA driver (rank 1: libcuda.so.1 not found)"))
        }
        try RankGroupCheck.verify([record(driver: 13000), record(driver: 13000)])
    }

    /// Without a GPU here, a group of device weights ends on every rank with the same typed error, through the
    /// caller's all-gather, before anything is allocated.
    @Test(.enabled(if: (try? CUDADriver.shared.get()) == nil, "needs a machine without a CUDA driver"))
    func aGroupWithoutDriversFailsOnEveryRank() throws {
        let config = RankGroupTests.config
        let pointers = WeightPointers(
            router: 0x1000, selectionBias: nil, firstLayer: .fused(0x2000), down: 0x3000, b1: nil, b2: nil,
            sharedFirstLayer: nil, sharedDown: nil, sharedGate: nil)
        let results = Self.run(2) { x in
            _ = try RankProcessMoE.create(
                rendezvous: x, config: config, weights: .device(pointers, allExperts: true), maxTokens: 8)
        }
        for result in results { #expect(rendezvousError(result)?.kind == .noDriver(ranks: [0, 1])) }
    }
}
