import CCUDA
import Testing

@testable import FlashMoE

/// The TMA engine's build choice (`FusedSpecialization.tmaEngine`, `FMOE_TMA`) and its tensor-map parameter
/// (`FusedTensorMaps`) on the fake driver, and (with NVRTC) that its kernels compile. Its results on a GPU (same bits
/// as the cp.async engine, verify, sanitizers) are Benchmarks/RESULTS.md's, round 14.
@Suite struct TMAEngineBuildTests {
    static let gated = MoEConfig(
        hiddenSize: 256, intermediateSize: 192, experts: 8, topK: 2, ffn: .gated, activation: .silu,
        sharedExpert: SharedExpertConfig(intermediateSize: 64), precision: .bf16)

    @Test func builtOnlyForSm90aOneGPUAndTensorCorePrecisions() throws {
        let sm90a = try GPUArchitecture(parsing: "sm_90a")
        let on = try FusedSpecialization(config: Self.gated, arch: sm90a, tmaEngine: true)
        #expect(on.tmaEngine && on.defines["FMOE_TMA"] == "1")
        var fp16 = Self.gated
        fp16.precision = .fp16
        #expect(try FusedSpecialization(config: fp16, arch: sm90a, tmaEngine: true).tmaEngine)
        // Asked for where it cannot run: the cp.async engine, and no FMOE_TMA define.
        var refused: [FusedSpecialization] = [
            try FusedSpecialization(config: Self.gated, arch: sm90a, tmaEngine: false),
            try FusedSpecialization(config: Self.gated, arch: GPUArchitecture(parsing: "sm_80"), tmaEngine: true),
            try FusedSpecialization(config: Self.gated, arch: GPUArchitecture(parsing: "sm_90"), tmaEngine: true),
            try FusedSpecialization(config: Self.gated, arch: sm90a, ranks: 4, tmaEngine: true),
        ]
        for precision in [Precision.fp32, .tf32] {
            var c = Self.gated
            c.precision = precision
            refused.append(try FusedSpecialization(config: c, arch: sm90a, tmaEngine: true))
        }
        // fp8 (phase_experts_tma_fp8.cuh): the engine's tile rows go to the kernel with the build.
        var fp8 = Self.gated
        fp8.precision = .fp8
        let fp8Spec = try FusedSpecialization(config: fp8, arch: sm90a, experimentalFP8: true, tmaEngine: true)
        #expect(fp8Spec.tmaEngine && fp8Spec.defines["FMOE_TMA_FP8_BN"] == "\(fp8Spec.tmaFP8TileRows)")
        #expect(try FusedSpecialization(config: fp8, arch: sm90a, experimentalFP8: true).defines["FMOE_TMA_FP8_BN"] == nil)
        let rows256 = try FusedSpecialization(
            config: fp8, arch: sm90a, experimentalFP8: true, tmaEngine: true, tmaFP8TileRows: 256)
        let rows128 = try FusedSpecialization(
            config: fp8, arch: sm90a, experimentalFP8: true, tmaEngine: true, tmaFP8TileRows: 128)
        #expect(rows256.defines["FMOE_TMA_FP8_BN"] == "256" && rows128.defines["FMOE_TMA_FP8_BN"] == "128")
        #expect(rows256.kernelSpec != rows128.kernelSpec)
        // 256 rows unless the environment asks for 128 (FLASHMOE_TMA_FP8_BN=128); the narrower build of a 256-row
        // one is the 128-row build, and a 128-row build has none.
        let asked = ProcessEnvironment.current()["FLASHMOE_TMA_FP8_BN"] == "128" ? 128 : 256
        #expect(FusedSpecialization.tmaFP8TileRowsRequested == asked && fp8Spec.tmaFP8TileRows == asked)
        #expect(try rows256.narrowerFP8Tiles()?.kernelSpec == rows128.kernelSpec)
        #expect(try rows128.narrowerFP8Tiles() == nil)
        #expect(try FusedSpecialization(config: fp8, arch: sm90a, experimentalFP8: true, tmaEngine: false, tmaFP8TileRows: 256)
            .narrowerFP8Tiles() == nil)
        #expect(throws: MoEError.self) {
            try FusedSpecialization(config: fp8, arch: sm90a, experimentalFP8: true, tmaEngine: true, tmaFP8TileRows: 64)
        }
        for spec in refused {
            #expect(!spec.tmaEngine && spec.defines["FMOE_TMA"] == nil, "\(spec.arch) \(spec.config.precision)")
        }
        // The engine is part of the specialisation: its cubin is cached apart from the default's.
        #expect(on.kernelSpec != refused[0].kernelSpec)
    }

    /// The six maps in the kernel's order (W1, W2, Ws1, Ws2, hbuf, hs), each over the right buffer, rows, K and box;
    /// without a shared expert its maps are copies that the kernel never reads.
    @Test(arguments: [true, false])
    func tensorMapsDescribeTheOperands(shared: Bool) throws {
        var config = Self.gated
        if !shared { config.sharedExpert = nil }
        let spec = try FusedSpecialization(
            config: config, arch: GPUArchitecture(parsing: "sm_90a"), tmaEngine: true)
        let device = try CUDADevice(ordinal: 0, driver: FakeDriver())
        let layer = try MoELayer(config: config, weights: .random(config: config, seed: 3))
        let weights = try FusedDeviceWeights(layer: layer, device: device, packRows: 128)  // sm_90a: EBN / 2
        let ws = FusedWorkspace(spec: spec, tokens: 40, rowCapacity: 80, partRows: 40)
        let base: UInt64 = 0x4000_0000
        let bytes = try FusedTensorMaps.encode(
            device: device, spec: spec, weights: weights, workspace: ws, arenaBase: base)
        #expect(bytes.count == FusedTensorMaps.byteCount)
        // The fake driver writes address, K, rows, row bytes, box K, box rows into words 0 … 5.
        func map(_ i: Int) -> [UInt64] {
            (0..<6).map { w in bytes.withUnsafeBytes { $0.load(fromByteOffset: i * 128 + w * 8, as: UInt64.self) } }
        }
        let (h, i, e) = (UInt64(config.hiddenSize), UInt64(config.intermediateSize), UInt64(config.experts))
        let n0 = UInt64(weights.w1.byteCount) / (h * 2)  // packed gate/up rows of all experts
        #expect(n0 == e * 2 * 256 && map(0) == [weights.w1.address, h, n0, h * 2, 64, 256])
        #expect(map(1) == [weights.w2.address, i, e * h, i * 2, 64, 256])
        let hbuf = [base + UInt64(ws.offset(.hbuf)), i, 80, i * 2, 64, 128]
        #expect(map(4) == hbuf)
        if shared {
            let ws1 = try #require(weights.sharedW1), ws2 = try #require(weights.sharedW2)
            #expect(map(2) == [ws1.address, h, UInt64(ws1.byteCount) / (h * 2), h * 2, 64, 256])
            #expect(map(3) == [ws2.address, 64, h, 128, 64, 256])
            #expect(map(5) == [base + UInt64(ws.offset(.hs)), 64, 40, 128, 64, 128])
        } else {
            #expect(map(2) == map(0) && map(3) == map(1) && map(5) == hbuf)
        }
    }

    /// fp8's ring on the TMA engine holds the engine's weight rows a stage (128 + 128 rows by default, 128 + 256 for the
    /// 256-row form), so the default TMA build has the cp.async fp8 tiles' shared memory (and their L1).
    @Test func fp8RingOnTheTMAEngine() throws {
        var config = Self.gated
        config.precision = .fp8
        let sm90a = try GPUArchitecture(parsing: "sm_90a")
        let tma = try FusedSpecialization(
            config: config, arch: sm90a, experimentalFP8: true, tmaEngine: true, tmaFP8TileRows: 128)
        let wide = try FusedSpecialization(
            config: config, arch: sm90a, experimentalFP8: true, tmaEngine: true, tmaFP8TileRows: 256)
        let plain = try FusedSpecialization(config: config, arch: sm90a, experimentalFP8: true, tmaEngine: false)
        #expect(tma.sharedMemory.ringTileWidth == 128 && wide.sharedMemory.ringTileWidth == 256)
        #expect(plain.sharedMemory.ringTileWidth == 128)
        #expect(wide.sharedMemory.dynamicBytes == 4 * (128 + 256) * 128 + 1024)
        #expect(tma.sharedMemory.dynamicBytes == 4 * (128 + 128) * 128 + 1024)
        #expect(plain.sharedMemory.dynamicBytes == tma.sharedMemory.dynamicBytes)
        #expect(wide.defines["FMOE_TMA_FP8_BN"] == "256" && tma.defines["FMOE_TMA_FP8_BN"] == "128")
        #expect(throws: MoEError.self) {
            try FusedSpecialization(
                config: config, arch: sm90a, experimentalFP8: true, tmaEngine: true, tmaFP8TileRows: 192)
        }
    }

    /// fp8: W1 and W2 are stacks of the experts' E4M3 images (3-D maps: the image stride, one image a box, boxes of the
    /// engine's tile rows), the routed h map is over the E4M3 codes hq, and the shared expert's maps stay BF16.
    @Test func fp8TensorMapsDescribeTheImages() throws {
        var config = Self.gated
        config.precision = .fp8
        let spec = try FusedSpecialization(
            config: config, arch: GPUArchitecture(parsing: "sm_90a"), experimentalFP8: true, tmaEngine: true)
        let device = try CUDADevice(ordinal: 0, driver: FakeDriver())
        let layer = try MoELayer(config: config, weights: .random(config: config, seed: 5))
        let weights = try FusedDeviceWeights(layer: layer, device: device, packRows: FusedDeviceWeights.fp8Granule)
        let ws = FusedWorkspace(spec: spec, tokens: 40, rowCapacity: 80, partRows: 40)
        let base: UInt64 = 0x4000_0000
        let bytes = try FusedTensorMaps.encode(
            device: device, spec: spec, weights: weights, workspace: ws, arenaBase: base)
        // The fake driver writes address, K, rows, row bytes, box K, box rows, type, swizzle, matrices, matrix
        // stride, box depth into words 0 … 10.
        func map(_ i: Int) -> [UInt64] {
            (0..<11).map { w in bytes.withUnsafeBytes { $0.load(fromByteOffset: i * 128 + w * 8, as: UInt64.self) } }
        }
        let (h, i, e) = (config.hiddenSize, config.intermediateSize, UInt64(config.experts))
        let rows = UInt64(spec.tmaFP8TileRows), e4m3 = UInt64(CU_TENSOR_MAP_DATA_TYPE_UINT8.rawValue)
        let n0 = FusedDeviceWeights.fp8FirstRows(inner: i, gated: true, packRows: FusedDeviceWeights.fp8Granule)
        let w1Image = UInt64(FusedDeviceWeights.fp8ExpertBytes(rows: n0, k: h).total)
        let w2Image = UInt64(FusedDeviceWeights.fp8ExpertBytes(rows: h, k: i).total)
        let (uh, ui) = (UInt64(h), UInt64(i))
        #expect(map(0) == [weights.w1.address, uh, UInt64(n0), uh, 128, rows, e4m3, 3, e, w1Image, 1])
        #expect(map(1) == [weights.w2.address, ui, uh, ui, 128, rows, e4m3, 3, e, w2Image, 1])
        #expect(map(4) == [base + UInt64(ws.offset(.hq)), ui, 80, ui, 128, 128, e4m3, 3, 0, 0, 0])
        let bf16 = UInt64(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16.rawValue)
        #expect(map(5) == [base + UInt64(ws.offset(.hs)), 64, 40, 128, 64, 128, bf16, 3, 0, 0, 0])
    }

    /// The FMOE_TMA kernels compile for sm_90a (gated with a shared expert, plain with biases; plain and traced; fp8
    /// gated with a shared expert and plain with biases, phase_experts_tma_fp8.cuh):
    /// 384 threads (168 registers at launch; the roles' setmaxnreg split is 224 / 56), both entry points present.
    /// They spill a few hundred bytes (the phases' code, which uses up to 254 registers at 256 threads, runs in the
    /// consumers' 224): Benchmarks/RESULTS.md, round 14; the default build stays spill-free (FusedKernelTests).
    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason))
    func tmaKernelsCompile() throws {
        let compiler = KernelCompiler(backend: TestEnvironment.nvrtc!, cache: nil)
        let target = try GPUArchitecture(parsing: "sm_90a")
        let plain = MoEConfig(hiddenSize: 128, intermediateSize: 96, experts: 8, topK: 2, bias: true,
                              activation: .gelu, precision: .fp16)
        var fp8 = Self.gated, fp8Plain = plain
        fp8.precision = .fp8
        fp8Plain.precision = .fp8
        let specs = [
            try FusedSpecialization(config: Self.gated, arch: target, tmaEngine: true),
            try FusedSpecialization(config: plain, arch: target, tmaEngine: true),
            try FusedSpecialization(config: Self.gated, arch: target, trace: true, tmaEngine: true),
            try FusedSpecialization(config: fp8, arch: target, experimentalFP8: true, tmaEngine: true),
            try FusedSpecialization(config: fp8Plain, arch: target, experimentalFP8: true, tmaEngine: true),
        ]
        for spec in specs {
            #expect(spec.tmaEngine)
            let k = try compiler.compile(spec.kernelSpec, arch: target, sources: .embedded)
            let usage = try #require(k.resources.first { $0.name == FusedSpecialization.kernelName })
            #expect(usage.registers <= 168, "384 threads a block leave at most 168 registers at launch")
            #expect(k.resources.contains { $0.name == FusedSpecialization.ranksKernelName })
        }
    }

    /// The TMA engine's A/B switches (gathers arriving through cp.async.mbarrier.arrive, the producer's registers;
    /// fp8: 256-row tiles, consumers that trap on an expired task wait, h from the accumulators and a warpgroup with
    /// no rows skipping its MMAs with 128-row tiles, h through BF16 rows and every warpgroup computing with 256, the
    /// scales through the ring with 128-row tiles and not with 256, x's quantization pipelined) compile for sm_90a,
    /// change the FMOE_TMA kernel's code (a misspelt switch would compile the default) and keep the consumers' wgmma
    /// unserialised (ptxas C7512 / C7518 in the log); the trap spills more, the reason the default leaves it out.
    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason),
          arguments: [
            "FMOE_TMA_ASYNC_ARRIVE=0", "FMOE_TMA_PRODUCER_REGS=56", "fp8 FMOE_TMA_FP8_BN=256",
            "fp8 FMOE_TMA_CONSUMER_TRAP=1", "fp8 FMOE_H_FROM_ACC=1", "fp8 FMOE_FP8_IDLE_WG=1",
            "fp8 FMOE_TMA_FP8_BN=256 FMOE_H_FROM_ACC=0", "fp8 FMOE_TMA_FP8_BN=256 FMOE_FP8_IDLE_WG=0",
            "fp8 FMOE_FP8_SMEM_SCALES=1", "fp8 FMOE_TMA_FP8_BN=256 FMOE_FP8_SMEM_SCALES=0",
            "fp8 FMOE_TMA_FP8_BN=256 FMOE_QUANT_PIPE=1",
          ])
    func tmaSwitchesCompile(setting: String) throws {
        let compiler = KernelCompiler(backend: TestEnvironment.nvrtc!, cache: nil)
        let target = try GPUArchitecture(parsing: "sm_90a")
        var config = Self.gated
        if setting.hasPrefix("fp8 ") { config.precision = .fp8 }
        let settings = setting.split(separator: " ").filter { $0.contains("=") }.map {
            $0.split(separator: "=").map(String.init)
        }
        // fp8's switches without tile rows are those of 128-row tiles.
        let plain = try FusedSpecialization(
            config: config, arch: target, experimentalFP8: true, tmaEngine: true, tmaFP8TileRows: 128).kernelSpec
        // The tile rows also size the ring (RING_BN), so the host's shared memory follows them: the specialisation
        // sets both. The other switches are compared with the kernel of the same tile rows.
        var sized = plain
        if let rows = settings.first(where: { $0[0] == "FMOE_TMA_FP8_BN" }).map({ Int($0[1])! }) {
            sized = try FusedSpecialization(
                config: config, arch: target, experimentalFP8: true, tmaEngine: true, tmaFP8TileRows: rows
            ).kernelSpec
        }
        var spec = sized
        let switches = settings.filter { $0[0] != "FMOE_TMA_FP8_BN" }
        for s in switches { spec.defines[s[0]] = s[1] }
        let base = try compiler.compile(switches.isEmpty ? plain : sized, arch: target, sources: .embedded)
        let k = try compiler.compile(spec, arch: target, sources: .embedded)
        #expect(k.cubin != base.cubin, "\(setting) compiled the default TMA kernel")
        let usage = try #require(k.resources.first { $0.name == FusedSpecialization.kernelName })
        #expect(usage.registers <= 168)
        #expect(!k.log.contains("C7512") && !k.log.contains("C7518"), "wgmma serialised with \(setting)")
        if switches.contains(where: { $0[0] == "FMOE_TMA_CONSUMER_TRAP" }) {
            // With the trap in the consumers' loop ptxas caps them below setmaxnreg's registers (phase_experts_tma.cuh).
            let without = try #require(base.resources.first { $0.name == FusedSpecialization.kernelName })
            #expect(usage.spillStoreBytes > without.spillStoreBytes, "\(usage) against \(without)")
        }
    }
}
