import Testing

@testable import FlashMoE

/// The rendezvous over both stores with several in-process participants: all-gathers in rank order, a missing
/// rank's timeout naming it, duplicate and out-of-range ranks, different world sizes, and aborts reaching every
/// waiting rank.
@Suite struct RendezvousTests {
    @Test(arguments: StoreKind.allCases)
    func fourRanksAllGatherInRankOrderAndBarrier(kind: StoreKind) throws {
        let (open, cleanup) = try kind.make()
        defer { cleanup() }
        let results = runParticipants(4) { rank -> [[UInt8]] in
            let r = try Rendezvous.join(rank: rank, worldSize: 4, store: try open(rank), timeout: .seconds(10))
            let first = try r.allGather("first", [UInt8(rank), 7])
            try r.barrier("middle")
            let second = try r.allGather("second", Array(repeating: UInt8(10 + rank), count: rank))
            #expect(r.members.count == 4)
            #expect(first == (0..<4).map { [UInt8($0), 7] })
            return second
        }
        for result in results {
            #expect(try result.get() == (0..<4).map { Array(repeating: UInt8(10 + $0), count: $0) })
        }
    }

    @Test(arguments: StoreKind.allCases)
    func aRankThatNeverJoinsTimesOutNamingIt(kind: StoreKind) throws {
        let (open, cleanup) = try kind.make()
        defer { cleanup() }
        let results = runParticipants(2) { rank in
            try Rendezvous.join(rank: rank == 0 ? 0 : 2, worldSize: 4, store: try open(rank), timeout: .milliseconds(300))
        }
        for result in results {
            let error = try #require(rendezvousError(result))
            #expect(error.kind == .timeout(missing: [1, 3]))
            #expect(error.message.contains("ranks 1, 3 never posted"))
            #expect(error.message.contains("step 'join'"))
        }
    }

    @Test func aTCPRankWhoseRank0NeverServesTimesOut() throws {
        // Take a free port, then stop serving it: nobody listens there.
        let probe = try RendezvousTCPStore.serve(host: "127.0.0.1", port: 0)
        let port = probe.port
        probe.close()
        #expect {
            _ = try RendezvousTCPStore.connect(host: "127.0.0.1", port: port, timeout: .milliseconds(200))
        } throws: { error in
            guard let e = error as? RendezvousError else { return false }
            return e.kind == .timeout(missing: [0]) && e.message.contains("rank 0 never served its store")
        }
    }

    @Test func losingRank0sStoreIsATypedErrorNotAHang() throws {
        let server = try RendezvousTCPStore.serve(host: "127.0.0.1", port: 0)
        let client = try RendezvousTCPStore.connect(host: "127.0.0.1", port: server.port, timeout: .seconds(5))
        #expect(try client.set("k", [1, 2, 3], exclusive: true))
        #expect(try client.get("k") == [1, 2, 3])
        #expect(try client.set("k", [9], exclusive: true) == false, "an exclusive set of a taken key")
        #expect(try server.get("k") == [1, 2, 3], "rank 0 reads the same table")
        server.close()  // waits for the client to leave, then stops serving and drops its connection
        #expect {
            _ = try client.get("k")
        } throws: { error in
            (error as? RendezvousError)?.kind == .unreachable && "\(error)".contains("rank 0 serves it")
        }
    }

    @Test(arguments: StoreKind.allCases)
    func aDuplicateRankFailsAndAbortsTheOthers(kind: StoreKind) throws {
        let (open, cleanup) = try kind.make()
        defer { cleanup() }
        // Two processes claim rank 1 first: one of them finds the other's key.
        let pair = runParticipants(2) { i in
            try Rendezvous.join(rank: 1, worldSize: 3, store: try open(i + 1), timeout: .milliseconds(600))
        }
        let kinds = pair.compactMap { rendezvousError($0)?.kind }
        #expect(kinds.contains(.duplicateRank(1)))
        // Ranks 0 and 2 arrive later: they see the posted reason at once instead of waiting out the timeout.
        let late = runParticipants(2) { i in
            try Rendezvous.join(rank: i * 2, worldSize: 3, store: try open(i * 2), timeout: .seconds(30))
        }
        for result in late {
            let error = try #require(rendezvousError(result))
            #expect(error.kind == .aborted(by: 1))
            #expect(error.message.contains("joined twice"))
        }
    }

    @Test(arguments: StoreKind.allCases)
    func aRankOutOfRangeFailsAndAbortsTheOthers(kind: StoreKind) throws {
        let (open, cleanup) = try kind.make()
        defer { cleanup() }
        let results = runParticipants(3) { i in
            try Rendezvous.join(rank: i == 2 ? 5 : i, worldSize: 3, store: try open(i), timeout: .seconds(30))
        }
        #expect(rendezvousError(results[2])?.kind == .rankOutOfRange(rank: 5, worldSize: 3))
        for result in results.prefix(2) {
            let error = try #require(rendezvousError(result))
            #expect(error.kind == .aborted(by: 5))
            #expect(error.message.contains("started as rank 5, but the world size is 3"))
        }
    }

    @Test(arguments: StoreKind.allCases)
    func differentWorldSizesAreATypedError(kind: StoreKind) throws {
        let (open, cleanup) = try kind.make()
        defer { cleanup() }
        let results = runParticipants(3) { rank in
            try Rendezvous.join(rank: rank, worldSize: rank == 0 ? 2 : 3, store: try open(rank), timeout: .seconds(30))
        }
        // Whichever rank sees the other world size first says so; the others stop with its reason.
        let errors = results.compactMap { rendezvousError($0) }
        #expect(errors.count == 3)
        #expect(errors.contains { $0.kind == .worldSizeMismatch })
        for e in errors {
            if case .aborted = e.kind {} else { #expect(e.kind == .worldSizeMismatch) }
            #expect(e.message.contains("same --world-size"))
        }
    }

    @Test(arguments: StoreKind.allCases)
    func anAbortReachesRanksWaitingInALaterStep(kind: StoreKind) throws {
        let (open, cleanup) = try kind.make()
        defer { cleanup() }
        let results = runParticipants(3) { rank in
            let r = try Rendezvous.join(rank: rank, worldSize: 3, store: try open(rank), timeout: .seconds(30))
            if rank == 1 {
                r.abort("rank 1's GPU is gone")
                return
            }
            try r.barrier("after join")
        }
        #expect(throws: Never.self) { try results[1].get() }
        for rank in [0, 2] {
            let error = try #require(rendezvousError(results[rank]))
            #expect(error.kind == .aborted(by: 1))
            // (A rank may still be in join when the abort lands: an abort wins over a complete step.)
            #expect(error.message.contains("rank 1's GPU is gone"))
        }
    }

    @Test func anEarlierRunsAbortInAReusedDirectoryIsIgnored() throws {
        let (open, cleanup) = try StoreKind.directory.make()
        defer { cleanup() }
        let store = try open(0)
        let old = RendezvousRecord(["rank": "1", "reason": "an earlier run", "time": "\(Rendezvous.wallClock() - 3600)"])
        #expect(try store.set("abort", old.bytes, exclusive: true))
        let results = runParticipants(2) { rank in
            let r = try Rendezvous.join(rank: rank, worldSize: 2, store: store, timeout: .seconds(10))
            try r.barrier("after join")
        }
        for result in results { #expect(throws: Never.self) { try result.get() } }
    }

    @Test func directoryKeysOfFinishedStepsAreRemoved() throws {
        guard case .success(let path) = SystemFiles.makeTemporaryDirectory(prefix: "flashmoe-rdzv") else {
            Issue.record("no temporary directory")
            return
        }
        defer { SystemFiles.removeDirectory(path) }
        let store = try RendezvousDirectoryStore(path: path)
        _ = runParticipants(2) { rank in
            let r = try Rendezvous.join(rank: rank, worldSize: 2, store: store, timeout: .seconds(10))
            for i in 0..<5 { _ = try r.allGather("step \(i)", [UInt8(i)]) }
        }
        // Only the last step's two keys stay (a rank cannot know when the others have read them).
        guard case .success(let names) = SystemFiles.list(path) else { return }
        #expect(names.count == 2, "\(names)")
    }

    @Test func addressesParseAndBadOnesSayBothForms() throws {
        #expect(try RendezvousAddress(parsing: "tcp://10.0.0.2:29500") == .tcp(host: "10.0.0.2", port: 29500))
        #expect(try RendezvousAddress(parsing: "tcp://localhost:0") == .tcp(host: "localhost", port: 0))
        #expect(try RendezvousAddress(parsing: "dir:/tmp/run 1") == .directory(path: "/tmp/run 1"))
        for bad in ["tcp://host", "tcp://:12", "tcp://h:99999", "dir:", "file:/x", "host:1234"] {
            #expect {
                _ = try RendezvousAddress(parsing: bad)
            } throws: { error in
                (error as? RendezvousError)?.kind == .badAddress
            }
        }
        #expect {
            _ = try RendezvousAddress(parsing: "host:1234")
        } throws: { error in
            "\(error)".contains("tcp://HOST:PORT") && "\(error)".contains("dir:/PATH")
        }
    }

    @Test func recordsRoundTripAndHexDecodes() {
        let record = RendezvousRecord(["b": "2", "a": "x=y", "c": "two\nlines"])
        let back = RendezvousRecord(bytes: record.bytes)
        #expect(back["a"] == "x=y" && back["b"] == "2" && back["c"] == "two lines")
        #expect(RendezvousRecord.bytes(fromHex: RendezvousRecord.hex([0, 1, 0xAB, 0xFF])) == [0, 1, 0xAB, 0xFF])
        #expect(RendezvousRecord.bytes(fromHex: "abc") == nil)
        #expect(RendezvousRecord.bytes(fromHex: "zz") == nil)
    }
}
