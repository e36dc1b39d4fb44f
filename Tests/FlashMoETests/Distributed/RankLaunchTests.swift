import CCUDA
import Testing

@testable import FlashMoE

/// The ranks entry's launch carries no epoch (issue 13: a rank's forward under the single-GPU op's graph rules).
/// Each rank's blocks read the epoch from the rank's `done_epoch` on the device, so the host's launches must be
/// identical call after call; a rank's own launch (device forwards) carries its `Params` by value, so a CUDA graph
/// captures no copy. Over a fake driver: the bytes every launch passes.
@Suite struct RankLaunchTests {
    static let config = MoEConfig(hiddenSize: 64, intermediateSize: 96, experts: 8, topK: 2)

    struct Rig {
        let fake: FakeDriver
        let kernel: FusedKernel
        let weights: FusedDeviceWeights
        let stream: CUDAStream
        let workspace: FusedWorkspace
    }

    static func rig() throws -> Rig {
        let fake = FakeDriver(
            kernels: [FusedSpecialization.ranksKernelName], parameterSizes: [8, 4, FusedParams.byteCount])
        let device = try CUDADevice(ordinal: 0, driver: fake)
        let kernel = try FusedKernel.loaded(on: device, entry: FusedSpecialization.ranksKernelName)
        let spec = try FusedSpecialization(config: config, injectFault: 0)
        let layer = try MoELayer(config: config, weights: MoEWeights.random(config: config, seed: 5))
        let weights = try FusedDeviceWeights(layer: layer, device: device, packRows: kernel.packRows)
        let ws = RankParts.rankWorkspace(
            spec: spec, tokens: 32, totalTokens: 64, localExperts: 4, blocksPerRank: 4, ranks: 2, fixedSplit: false)
        return Rig(fake: fake, kernel: kernel, weights: weights, stream: try CUDAStream(device: device), workspace: ws)
    }

    static func field(_ params: [UInt8], _ name: String, bytes n: Int = 8) -> UInt64 {
        let offset = FusedParams.offsets[FusedParams.fieldNames.firstIndex(of: name)!]
        return (0..<n).reduce(UInt64(0)) { $0 | UInt64(params[offset + $1]) << (8 * $1) }
    }

    static func params(_ r: Rig, wrap: UInt64 = UInt64(UInt32.max)) -> [UInt8] {
        RankParts.params(
            workspace: r.workspace, base: 0x10_0000, weights: r.weights, sync: 0x20_0000, errorRecord: 0x30_0000,
            peers: 0x40_0000, tokens: 32, capacity: 40, rank: 1, gateSplit: 2, budget: .seconds(1), epochWrap: wrap,
            io: DeviceForward(input: 0x50_0000, output: 0x60_0000, tokens: 32))
    }

    @Test func aRankLaunchIsTheSameEveryCallAndCarriesItsParamsByValue() throws {
        let r = try Self.rig()
        let bytes = Self.params(r, wrap: 1000)
        #expect(bytes.count == FusedParams.byteCount)
        // The epoch is the device's (done_epoch + 1): Params hold 0; the wrap limit the kernel refuses past is set.
        #expect(Self.field(bytes, "epoch") == 0 && Self.field(bytes, "epoch_wrap") == 1000)
        #expect(Self.field(bytes, "x") == 0x50_0000 && Self.field(bytes, "y") == 0x60_0000)
        #expect(Self.field(bytes, "sync") == 0x20_0000 && Self.field(bytes, "rank", bytes: 4) == 1)
        r.fake.clearCalls()
        for _ in 0..<3 {
            try RankParts.launch(r.kernel, params: bytes, blocksPerRank: 4, streamHandle: r.stream.handle)
        }
        let launches = r.fake.launches
        #expect(launches.count == 3 && launches.allSatisfy { $0.cooperative && $0.grid.0 == 4 })
        // Three calls, three identical launches: nothing counted on the host reaches the kernel.
        #expect(launches.allSatisfy { $0.parameters == launches[0].parameters })
        let p = launches[0].parameters
        #expect(p.count == 3 && p[0] == [UInt8](repeating: 0, count: 8))  // no table: the Params argument is used
        #expect(p[1] == [4, 0, 0, 0] && p[2] == bytes)
        // Nothing but the launches: no parameter copy a graph capture would have to hold.
        #expect(r.fake.calls.filter { $0.hasPrefix("memcpy") || $0.hasSuffix("Synchronize") }.isEmpty, "\(r.fake.calls)")
    }

    @Test func aTableLaunchIsTheSameEveryCallToo() throws {
        let r = try Self.rig()
        let table = try DeviceBuffer<UInt8>(device: r.kernel.device, count: FusedParams.byteCount * 2)
        for _ in 0..<2 {
            try RankParts.launch(
                r.kernel, table: table.address, ranks: 2, blocksPerRank: 4, cooperative: false, stream: r.stream)
        }
        let launches = r.fake.launches
        #expect(launches.count == 2 && launches[0].parameters == launches[1].parameters)
        let p = launches[0].parameters
        #expect(launches[0].grid.0 == 8 && !launches[0].cooperative)
        #expect(p[0] == withUnsafeBytes(of: table.address.littleEndian, Array.init) && p[1] == [4, 0, 0, 0])
        #expect(p[2] == [UInt8](repeating: 0, count: FusedParams.byteCount))  // ignored with a table
    }

    @Test func aLaunchPastTheWrapLimitIsATypedError() throws {
        let placement = try ExpertPlacement(experts: 4, ranks: 2)
        let e = DistributedError(
            kernel: FusedKernelError(
                phase: nil, index: 0, rank: 1, expected: 37, seen: 38, code: DistributedError.epochLimitCode),
            placement: placement)
        #expect(e.epochLimit && e.missingSource == nil)
        #expect(e.description.contains("rank 1 refused launch epoch 38"))
        #expect(e.description.contains("allows 37 launches between host wraps") && e.description.contains("create the group again"))
        let timeout = DistributedError(
            kernel: FusedKernelError(phase: .peerDone, index: 0, rank: 0, expected: 6, seen: 5, code: 1),
            placement: placement)
        #expect(!timeout.epochLimit)
    }
}

extension FusedKernel {
    /// A kernel "loaded" on a fake driver's device (no NVRTC): a 1-byte module with `entry`, 1 KiB of dynamic
    /// shared memory, 64 packing rows, one gate tile of 8 router rows, the decode gate up to `gateGemvTokens`
    /// tokens (none by default), a grid limit of 8 blocks.
    static func loaded(on device: CUDADevice, entry: String, gateGemvTokens: Int = 0) throws -> FusedKernel {
        let module = try CUDAModule(device: device, cubin: [0x7F])
        let compiled = CompiledKernel(
            name: "moe.cu", arch: GPUArchitecture(major: 9, minor: 0), cubin: [0x7F], log: "", resources: [],
            cache: .miss, cacheWriteFailure: nil, time: .zero, key: [])
        return FusedKernel(
            device: device, compiled: compiled, module: module, function: try module.function(named: entry),
            dynamicSharedBytes: 1024, packRows: 64, gateTiles: 1, routerRows: 8, gateGemvTokens: gateGemvTokens,
            gridLimit: 8, blockThreads: 256, tensorMapBytes: 0)
    }
}
