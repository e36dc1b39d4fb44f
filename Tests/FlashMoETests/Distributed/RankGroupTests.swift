import CCUDA
import Testing

@testable import FlashMoE

/// The checks every rank runs before any launch (`RankGroupCheck`) and the IPC handle exchange
/// (`IPCPeerTable`) over fake drivers standing for separate processes.
@Suite struct RankGroupTests {
    static let config = MoEConfig(hiddenSize: 16, intermediateSize: 8, experts: 4, topK: 2, precision: .fp32)

    static func layer(seed: UInt64 = 1, config: MoEConfig = config) throws -> MoELayer {
        try MoELayer(config: config, weights: MoEWeights.random(config: config, seed: seed))
    }

    static func check(_ layer: MoELayer, driver: Int = 13000, host: String = "node", maxTokens: Int = 64)
        -> RankGroupCheck
    {
        RankGroupCheck(layer: layer, driverVersion: driver, host: host, maxTokens: maxTokens)
    }

    @Test func equalRanksPass() throws {
        let c = Self.check(try Self.layer())
        try RankGroupCheck.verify([c, c, c])
        #expect(Self.check(try Self.layer()).layerHash == c.layerHash, "the hash is a function of the layer")
    }

    @Test func anotherConfigIsAMismatchShowingBothConfigs() throws {
        var other = Self.config
        other.topK = 1
        let all = [Self.check(try Self.layer()), Self.check(try Self.layer()), Self.check(try Self.layer(config: other))]
        #expect {
            try RankGroupCheck.verify(all)
        } throws: { error in
            guard let e = error as? RendezvousError else { return false }
            return e.kind == .configMismatch(rank: 0, other: 2) && e.message.contains("rank 2's layer differs")
                && e.message.contains("rank 0 has") && e.message.contains("rank 2 has")
        }
    }

    @Test func anotherSeedIsAMismatchOfTheWeights() throws {
        let all = [Self.check(try Self.layer(seed: 1)), Self.check(try Self.layer(seed: 2))]
        #expect {
            try RankGroupCheck.verify(all)
        } throws: { error in
            guard let e = error as? RendezvousError else { return false }
            return e.kind == .configMismatch(rank: 0, other: 1) && e.message.contains("router values differ")
        }
    }

    @Test func driverNodeAndTokenLimitMismatchesNameTheRank() throws {
        let layer = try Self.layer()
        let base = Self.check(layer)
        func kind(_ other: RankGroupCheck) -> RendezvousError.Kind? {
            do {
                try RankGroupCheck.verify([base, base, other])
                return nil
            } catch { return error.kind }
        }
        #expect(kind(Self.check(layer, driver: 12080)) == .driverMismatch(rank: 0, other: 2))
        #expect(kind(Self.check(layer, host: "other-node")) == .differentNodes(rank: 0, other: 2))
        #expect(kind(Self.check(layer, maxTokens: 65)) == .configMismatch(rank: 0, other: 2))
    }

    @Test func everyRankOfAGroupWithOneOtherLayerFailsTheSame() throws {
        let (open, cleanup) = try StoreKind.directory.make()
        defer { cleanup() }
        let results = runParticipants(3) { rank in
            let r = try Rendezvous.join(rank: rank, worldSize: 3, store: try open(rank), timeout: .seconds(10))
            _ = try Self.check(try Self.layer(seed: rank == 2 ? 9 : 1)).exchange(r)
        }
        for result in results {
            #expect(rendezvousError(result)?.kind == .configMismatch(rank: 0, other: 2))
        }
    }

    // MARK: - IPC

    /// One fake process: its own driver (one world for all), opening GPU `rank`, with an arena whose control
    /// block starts at `controlOffset`.
    struct FakeRank {
        let fake: FakeDriver
        let device: CUDADevice
        let arena: DeviceBuffer<UInt8>
        static let offsets = (0..<9).map { 256 * $0 }
        static let controlOffset = 4096

        init(rank: Int, world: FakeIPCWorld, ranks: Int) throws {
            fake = FakeDriver(devices: Int32(ranks))
            world.join(fake)
            device = try CUDADevice(ordinal: rank, driver: fake)
            arena = try DeviceBuffer<UInt8>(device: device, count: Self.controlOffset + 512)
        }
    }

    @Test func handlesAreExchangedAndEveryPeerIsMappedAndUnmapped() throws {
        let (open, cleanup) = try StoreKind.tcp.make()
        defer { cleanup() }
        let world = FakeIPCWorld()
        let results = runParticipants(3) { rank -> [UInt64] in
            let me = try FakeRank(rank: rank, world: world, ranks: 3)
            let r = try Rendezvous.join(rank: rank, worldSize: 3, store: try open(rank), timeout: .seconds(10))
            let bases = try Self.checkTable(rank: rank, me: me, rendezvous: r)
            #expect(me.fake.liveImports == 0, "dropping the table unmaps every peer")
            return bases
        }
        for result in results { #expect(try result.get().count == 3) }
    }

    /// Builds rank `rank`'s table and checks it; the table is gone when this returns.
    static func checkTable(rank: Int, me: FakeRank, rendezvous r: Rendezvous) throws -> [UInt64] {
        let t = try IPCPeerTable(
            rendezvous: r, device: me.device, arena: me.arena, controlOffset: FakeRank.controlOffset,
                offsets: FakeRank.offsets)
        #expect(t.mappedCount == 2)  // two peers, one allocation each
        #expect(me.fake.liveImports == 2)
        #expect(t.arenaBases[rank] == me.arena.address)
        for q in 0..<3 {
            #expect(t.controlBases[q] == t.arenaBases[q] + UInt64(FakeRank.controlOffset))
            if q != rank { #expect(t.arenaBases[q] >= 0x9000_0000, "a peer's arena is a mapping, not a local address") }
        }
        #expect(t.errorRecordAddress == t.controlBases[0] + 256)
        #expect(t.gpus == ["GPU 0 (Fake GPU 0)", "GPU 1 (Fake GPU 1)", "GPU 2 (Fake GPU 2)"])
        let entries = t.peerTable
        #expect(entries.count == 3 * FusedParams.peerByteCount)
        // Rank q's entry: its arena base + each region offset, then its Sync (control block start).
        let words = stride(from: 0, to: entries.count, by: 8).map { i in
            (0..<8).reduce(UInt64(0)) { $0 | UInt64(entries[i + $1]) << (8 * $1) }
        }
        for q in 0..<3 {
            #expect(Array(words[10 * q..<10 * q + 9]) == FakeRank.offsets.map { t.arenaBases[q] + UInt64($0) })
            #expect(words[10 * q + 9] == t.controlBases[q])
        }
        try r.barrier("all checked")  // keep every exporter alive until all peers are done
        return t.arenaBases
    }

    @Test func theExchangeNeedsNoStoreJustAnAllGather() throws {
        let world = FakeIPCWorld()
        let group = InProcessExchange.Group()
        let results = runParticipants(2) { rank -> Int in
            let me = try FakeRank(rank: rank, world: world, ranks: 2)
            let exchange = InProcessExchange(rank: rank, worldSize: 2, group: group)
            _ = try Self.check(try Self.layer()).exchange(exchange)
            let table = try IPCPeerTable(
                rendezvous: exchange, device: me.device, arena: me.arena, controlOffset: FakeRank.controlOffset,
                offsets: FakeRank.offsets)
            try exchange.barrier("done")
            return table.mappedCount
        }
        for result in results { #expect(try result.get() == 1) }
    }

    @Test func aPeerThatCannotBeMappedFailsEveryRankNamingBothRanksAndGPUs() throws {
        let (open, cleanup) = try StoreKind.directory.make()
        defer { cleanup() }
        let world = FakeIPCWorld()
        let results = runParticipants(3) { rank in
            let me = try FakeRank(rank: rank, world: world, ranks: 3)
            if rank == 1 { me.fake.fail("ipcOpenMemHandle", with: CUDA_ERROR_INVALID_VALUE) }
            let r = try Rendezvous.join(rank: rank, worldSize: 3, store: try open(rank), timeout: .seconds(10))
            defer { #expect(me.fake.liveImports == 0, "rank \(rank) keeps no mapping after the failure") }
            _ = try IPCPeerTable(
                rendezvous: r, device: me.device, arena: me.arena, controlOffset: FakeRank.controlOffset,
                offsets: FakeRank.offsets)
        }
        for result in results {
            guard case .failure(let error) = result, let e = error as? PeerMappingError else {
                Issue.record("expected a PeerMappingError, got \(result)")
                continue
            }
            #expect(e.rank == 1 && e.peer == 0)
            #expect(e.description.hasPrefix("rank 1 (GPU 1 (Fake GPU 1)) cannot map the buffers of rank 0 (GPU 0 (Fake GPU 0))"))
            #expect(e.description.contains("cuIpcOpenMemHandle_v2"))
        }
    }

    @Test func exportNeedsIPCAndAHandleCannotBeOpenedByItsExporter() throws {
        let lonely = FakeDriver()
        let device = try CUDADevice(ordinal: 0, driver: lonely)
        let buffer = try DeviceBuffer<UInt8>(device: device, count: 64)
        #expect(throws: CUDAError.self) { _ = try buffer.ipcHandle() }

        let world = FakeIPCWorld()
        let a = try FakeRank(rank: 0, world: world, ranks: 1)
        let handle = try a.arena.ipcHandle()
        #expect(handle.bytes.count == 64)
        #expect(throws: CUDAError.self) { _ = try IPCMapping(device: a.device, handle: handle, byteCount: 4096) }
        #expect(throws: MoEError.self) { _ = try IPCHandle(bytes: [1, 2, 3]) }
    }
}
