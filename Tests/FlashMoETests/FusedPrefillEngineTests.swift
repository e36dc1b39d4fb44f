import CCUDA
import Testing

@testable import FlashMoE

/// The fp8 operator's two kernels (`FusedPrefillEngine`): which layers get a prefill build, which launches run it,
/// and when the operator keeps one kernel instead. On the fake driver: no GPU, no NVRTC. That the two builds give the
/// same bits on a GPU is `flashmoe verify`'s device-forward check and Benchmarks/RESULTS.md's, round 26.
@Suite struct FusedPrefillEngineTests {
    static let sm90a = GPUArchitecture(major: 9, minor: 0)
    static let fp8 = MoEConfig(
        hiddenSize: 256, intermediateSize: 128, experts: 128, topK: 8, ffn: .gated, activation: .silu, precision: .fp8)

    static func base(_ config: MoEConfig = fp8, arch: GPUArchitecture = sm90a) throws -> FusedSpecialization {
        try FusedSpecialization(config: config, arch: arch, experimentalFP8: true, tmaEngine: false)
    }

    @Test func onlyFP8OnSm90aGetsAPrefillBuild() throws {
        let variant = try #require(try Self.base().prefillVariant(refused: false))
        #expect(variant.tmaEngine && variant.defines["FMOE_TMA"] == "1")
        #expect(variant.config == Self.fp8 && variant.arch == Self.sm90a)
        // Everything but the engine (its tile rows, the ring they size, and the 256-row tiles' fresh %tid.x reads)
        // is the first build's.
        var same = variant.defines
        var first = try Self.base().defines
        for key in ["FMOE_TMA", "FMOE_TMA_FP8_BN", "FMOE_FRESH_TID", "FMOE_STAGES", "FMOE_DYNAMIC_SMEM"] {
            same[key] = nil
            first[key] = nil
        }
        #expect(same == first)
        // A tracing build's prefill kernel stands for the normal one: without the stamps, the same kernel.
        let traced = try FusedSpecialization(
            config: Self.fp8, arch: Self.sm90a, trace: true, experimentalFP8: true, tmaEngine: false)
        let tracedVariant = try #require(try traced.prefillVariant(refused: false))
        #expect(tracedVariant.trace && tracedVariant.defines["FMOE_TRACE"] == "1")
        #expect(try tracedVariant.untraced().kernelSpec == variant.kernelSpec)
        // FLASHMOE_TMA=0 refuses it; a build already on the TMA engine (FLASHMOE_TMA=1) needs none.
        #expect(try Self.base().prefillVariant(refused: true) == nil)
        let tma = try FusedSpecialization(config: Self.fp8, arch: Self.sm90a, experimentalFP8: true, tmaEngine: true)
        #expect(try tma.prefillVariant(refused: false) == nil)
        // Other precisions and targets: one kernel.
        var bf16 = Self.fp8
        bf16.precision = .bf16
        #expect(try Self.base(bf16).prefillVariant(refused: false) == nil)
        #expect(try Self.base(arch: GPUArchitecture(major: 8, minor: 9)).prefillVariant(refused: false) == nil)
        #expect(try Self.base(arch: GPUArchitecture(parsing: "sm_90"))
            .prefillVariant(refused: false) == nil)
    }

    /// The operator's rule on top of the variant: a token threshold set, at any expert count (RESULTS, round 27: with
    /// h quantized per group the TMA build is faster from 256 tokens at 8 to 256 experts, or within 2 %).
    @Test func everyFP8LayerBuildsOneUnlessTheThresholdIsUnset() throws {
        func build(experts: Int, _ options: FusedOptions = FusedOptions()) throws -> FusedSpecialization? {
            var c = Self.fp8
            c.experts = experts
            return try FusedPrefillEngine.specialization(for: try Self.base(c), options: options, refused: false)
        }
        for experts in [8, 32, 64, 128, 256] {
            let spec = try build(experts: experts)
            #expect(spec?.tmaEngine == true && spec?.config.experts == experts)
        }
        var none = FusedOptions()
        none.prefillEngineTokens = nil
        #expect(try build(experts: 128, none) == nil)
        none.prefillEngineTokens = 0
        #expect(throws: MoEError.self) { _ = try build(experts: 128, none) }
    }

    @Test func theCatalogCompilesBothBuildsOfAnFP8Layer() throws {
        let specs = KernelCatalog.specializations(for: Self.fp8, arch: Self.sm90a, experimentalFP8: true)
        let bf16 = KernelCatalog.specializations(for: MoEConfig(hiddenSize: 256, intermediateSize: 128, experts: 128, topK: 8))
        var few = Self.fp8
        few.experts = 8
        let mixtralLike = KernelCatalog.specializations(for: few, arch: Self.sm90a, experimentalFP8: true)
        #expect(bf16.count == 2)
        // fp8 layers end with the GPU's weight quantizer (quantize.cu: BF16 experts given as device memory).
        #expect(specs.last == KernelCatalog.fp8Quantizer && mixtralLike.last == KernelCatalog.fp8Quantizer)
        #expect(!bf16.contains(KernelCatalog.fp8Quantizer))
        if FusedSpecialization.tmaEngineRefused || FusedSpecialization.tmaEngineRequested {
            // FLASHMOE_TMA=0 or 1: one build, on the engine the environment names.
            #expect(specs.count == 3 && (specs[1].defines["FMOE_TMA"] == "1") == FusedSpecialization.tmaEngineRequested)
            #expect(mixtralLike.count == 3)
        } else {
            #expect(specs.count == 4 && specs[1].defines["FMOE_TMA"] == nil && specs[2].defines["FMOE_TMA"] == "1")
            #expect(mixtralLike.count == 4 && mixtralLike[2].defines["FMOE_TMA"] == "1")
        }
    }

    /// A fake kernel with the launch facts `FusedPrefillEngine.mismatch` compares.
    static func kernel(
        on device: CUDADevice, threads: Int, mapBytes: Int, sharedBytes: Int, grid: Int = 8, spills: Int = 0
    ) throws -> FusedKernel {
        let module = try CUDAModule(device: device, cubin: [0x7F])
        var usage = KernelResourceUsage(name: FusedSpecialization.kernelName, arch: "sm_90a")
        usage.spillStoreBytes = spills
        let compiled = CompiledKernel(
            name: "moe.cu", arch: sm90a, cubin: [0x7F], log: "", resources: [usage], cache: .miss,
            cacheWriteFailure: nil, time: .zero, key: [])
        return FusedKernel(
            device: device, compiled: compiled, module: module,
            function: try module.function(named: FusedSpecialization.kernelName), dynamicSharedBytes: sharedBytes,
            packRows: 64, gateTiles: 1, routerRows: 8, gateGemvTokens: 8, gridLimit: grid, blockThreads: threads,
            tensorMapBytes: mapBytes)
    }

    struct Rig {
        let fake: FakeDriver
        let op: FusedOperator
        let x: DeviceBuffer<UInt8>
        let y: DeviceBuffer<UInt8>
    }

    /// An fp8 operator on the fake driver with a first kernel (256 threads, 1 KiB) and, from `minTokens` on, a prefill
    /// kernel (384 threads, 2 KiB, the tensor maps as its second parameter).
    static func rig(minTokens: Int = 256) throws -> Rig {
        let fake = FakeDriver(kernels: [FusedSpecialization.kernelName], parameterSizes: [FusedParams.byteCount])
        let device = try CUDADevice(ordinal: 0, driver: fake)
        let first = try kernel(on: device, threads: 256, mapBytes: 0, sharedBytes: 1024)
        let second = try kernel(on: device, threads: 384, mapBytes: FusedTensorMaps.byteCount, sharedBytes: 2048)
        let spec = try base()
        let prefillSpec = try #require(try spec.prefillVariant(refused: false))
        let layer = try MoELayer(config: fp8, weights: MoEWeights.random(config: fp8, seed: 5))
        let weights = try FusedDeviceWeights(layer: layer, device: device, packRows: first.packRows)
        let op = try FusedOperator(
            specialization: spec, options: FusedOptions(), maxTokens: 512, kernel: first, weights: weights,
            prefill: .engine(FusedPrefillEngine(specialization: prefillSpec, kernel: second, minTokens: minTokens)))
        let bytes = 512 * fp8.hiddenSize * 4
        return Rig(
            fake: fake, op: op, x: try DeviceBuffer(device: device, count: bytes),
            y: try DeviceBuffer(device: device, count: bytes))
    }

    @Test func launchesFromTheThresholdRunThePrefillKernel() throws {
        let r = try Self.rig(minTokens: 256)
        #expect(r.op.prefillTokens == 256 && r.op.prefillSpecialization?.tmaEngine == true)
        #expect(r.op.prefillSkipReason == nil)
        r.fake.clearCalls()
        for s in [1, 255, 256, 512, 64] {
            try r.op.forward(DeviceForward(input: r.x.address, output: r.y.address, tokens: s))
            #expect(r.op.specialization(forTokens: s).tmaEngine == (s >= 256))
        }
        let launches = r.fake.launches
        #expect(launches.count == 5 && launches.allSatisfy(\.cooperative))
        #expect(launches.map { Int($0.block.0) } == [256, 256, 384, 384, 256])
        #expect(launches.map { Int($0.sharedBytes) } == [1024, 1024, 2048, 2048, 1024])
        // One grid and one workspace for both: the Params differ only in the token count (and the gate split).
        func without(_ l: FakeDriver.Launch, _ names: [String]) -> [UInt8] {
            var bytes = l.parameters[0]
            for name in names {
                let offset = FusedParams.offsets[FusedParams.fieldNames.firstIndex(of: name)!]
                for i in offset..<offset + 4 { bytes[i] = 0 }
            }
            return bytes
        }
        #expect(Set(launches.map { Int($0.grid.0) }).count == 1)
        let masked = Set(launches.map { without($0, ["tokens", "gate_ksplit"]) })
        #expect(masked.count == 1)
        // Nothing besides the launches: the choice is made on the host, per call.
        #expect(r.fake.calls.filter { FusedOperatorTests.forbidden.contains($0) }.isEmpty, "\(r.fake.calls)")
    }

    @Test func aSpillingOrMismatchedPrefillKernelIsNotUsed() throws {
        let fake = FakeDriver(kernels: [FusedSpecialization.kernelName], parameterSizes: [FusedParams.byteCount])
        let device = try CUDADevice(ordinal: 0, driver: fake)
        let first = try Self.kernel(on: device, threads: 256, mapBytes: 0, sharedBytes: 1024)
        // `second`: the prefill build of 256-row tiles; `narrow`: that of 128 rows (default: the same kernel).
        func outcome(
            _ second: FusedKernel, narrow: FusedKernel? = nil, tokens: Int? = 256, trace: Bool = false,
            twinSpills: Int = 0, rows: Int = 256
        ) throws -> FusedPrefillEngine.Outcome {
            var options = FusedOptions()
            options.prefillEngineTokens = tokens
            let base = try FusedSpecialization(
                config: Self.fp8, arch: Self.sm90a, trace: trace, experimentalFP8: true, tmaEngine: false,
                tmaFP8TileRows: rows)
            var twinAsked = false
            var loads: [[Int]] = []
            let (loaded, result) = try FusedPrefillEngine.load(
                baseSpec: base, options: options, sharedMemoryPerBlock: nil
            ) { specs in
                #expect(specs.allSatisfy { $0.trace == trace })
                loads.append(specs.map { $0.tmaEngine ? $0.tmaFP8TileRows : 0 })
                return specs.map { !$0.tmaEngine ? first : $0.tmaFP8TileRows == 256 ? second : narrow ?? second }
            } resources: { spec in
                // Only a tracing build asks for its normal twin's compile: the TMA build without the stamps.
                #expect(trace && spec.tmaEngine && !spec.trace && spec.defines["FMOE_TRACE"] == nil)
                twinAsked = true
                var usage = KernelResourceUsage(name: FusedSpecialization.kernelName, arch: "sm_90a")
                usage.spillStoreBytes = twinSpills
                return [usage]
            }
            // The first kernel compiles beside the first rung; a second rung (128 rows) only after the first failed.
            if tokens == nil { #expect(loads == [[0]]) }
            else { #expect(loads.first == [0, rows] && loads.dropFirst().allSatisfy { $0 == [128] } && loads.count <= 2) }
            #expect(twinAsked == (trace && tokens != nil))
            #expect(loaded.blockThreads == 256)
            return result
        }
        let clean = try Self.kernel(on: device, threads: 384, mapBytes: FusedTensorMaps.byteCount, sharedBytes: 2048)
        let spilling = try Self.kernel(
            on: device, threads: 384, mapBytes: FusedTensorMaps.byteCount, sharedBytes: 2048, spills: 24)
        let otherGrid = try Self.kernel(
            on: device, threads: 384, mapBytes: FusedTensorMaps.byteCount, sharedBytes: 2048, grid: 4)
        guard !FusedSpecialization.tmaEngineRefused else { return }  // FLASHMOE_TMA=0: no prefill build at all
        if case .engine(let e) = try outcome(clean) {
            #expect(e.minTokens == 256 && e.specialization.tmaFP8TileRows == 256 && e.narrowedBecause == nil)
        } else { Issue.record("no engine") }
        // A 256-row build that spills or mismatches gives way to the 128-row build, which says why.
        if case .engine(let e) = try outcome(spilling, narrow: clean) {
            #expect(e.specialization.tmaFP8TileRows == 128 && e.kernel.gridLimit == clean.gridLimit)
            #expect(e.narrowedBecause?.contains("256-row kernel spills") == true)
        } else { Issue.record("the 128-row build was not tried after a spilling 256-row one") }
        if case .engine(let e) = try outcome(otherGrid, narrow: clean) {
            #expect(e.specialization.tmaFP8TileRows == 128 && e.narrowedBecause?.contains("grid blocks") == true)
        } else { Issue.record("the 128-row build was not tried after a mismatched 256-row one") }
        // Both rungs refused: one kernel, and both reasons.
        if case .skipped(let why) = try outcome(spilling) {
            #expect(why.contains("256-row kernel spills") && why.contains("128-row kernel spills") && why.contains("24 B"))
        } else { Issue.record("a spilling kernel was kept") }
        if case .skipped(let why) = try outcome(otherGrid) { #expect(why.contains("grid blocks")) }
        else { Issue.record("a kernel of another grid was kept") }
        // Asked for 128 rows (FLASHMOE_TMA_FP8_BN=128): no narrower rung.
        if case .skipped(let why) = try outcome(spilling, rows: 128) {
            #expect(why.contains("128-row kernel spills") && !why.contains("256-row"))
        } else { Issue.record("a spilling 128-row kernel was kept") }
        if case .notApplicable = try outcome(clean, tokens: nil) {} else { Issue.record("nil tokens still built one") }
        // A TMA build that fails to compile or load costs the operator its speed, not its first kernel.
        // Each rung's failure is tried alone after the pair (the first kernel with the 256-row build) fails: the
        // 128-row build with the first kernel again, then the first kernel alone.
        var calls: [Int] = []
        let (kept, failed) = try FusedPrefillEngine.load(
            baseSpec: try Self.base(), options: FusedOptions(), sharedMemoryPerBlock: nil
        ) { specs in
            calls.append(specs.count)
            if specs.contains(where: \.tmaEngine) { throw CUDAError.invalidArgument("NVRTC: error in the TMA build") }
            return [first]
        } resources: { _ in [] }
        #expect(kept.blockThreads == 256)
        #expect(calls == (try Self.base().tmaFP8TileRows == 256 ? [2, 2, 1] : [2, 1]))
        if case .skipped(let why) = failed { #expect(why.contains("did not build") && why.contains("NVRTC")) }
        else { Issue.record("a failed prefill build was not reported") }
        // A 256-row build that fails to compile gives way to the 128-row one.
        let wide = try FusedSpecialization(
            config: Self.fp8, arch: Self.sm90a, experimentalFP8: true, tmaEngine: false, tmaFP8TileRows: 256)
        let (_, second) = try FusedPrefillEngine.load(
            baseSpec: wide, options: FusedOptions(), sharedMemoryPerBlock: nil
        ) { specs in
            if specs.contains(where: { $0.tmaEngine && $0.tmaFP8TileRows == 256 }) {
                throw CUDAError.invalidArgument("NVRTC: error in the 256-row build")
            }
            return specs.map { $0.tmaEngine ? clean : first }
        } resources: { _ in [] }
        if case .engine(let e) = second {
            #expect(e.specialization.tmaFP8TileRows == 128 && e.narrowedBecause?.contains("did not build") == true)
        } else { Issue.record("the 128-row build was not tried after a failed 256-row build") }
        // A TMA build that cannot fit the block (the stages fixed, its static shared memory 1 KiB larger) is skipped.
        let tight = try Self.base()
        var fixed = FusedOptions()
        fixed.stages = tight.stages
        let limit = tight.sharedMemory.totalBytes
        #expect(throws: MoEError.self) { _ = try tight.prefillVariant(sharedMemoryPerBlock: limit, stages: tight.stages, refused: false) }
        let (_, unfit) = try FusedPrefillEngine.load(baseSpec: tight, options: fixed, sharedMemoryPerBlock: limit) { specs in
            #expect(specs.count == 1)
            return [first]
        } resources: { _ in [] }
        if case .skipped(let why) = unfit { #expect(why.contains("no TMA engine's kernel")) }
        else { Issue.record("a TMA build that does not fit was not reported") }
        // A tracing build follows its normal twin: kept though its own compile spills, left out when the twin spills.
        if case .engine = try outcome(spilling, trace: true) {} else { Issue.record("a trace build lost its twin's kernel") }
        if case .skipped(let why) = try outcome(clean, trace: true, twinSpills: 16) { #expect(why.contains("16 B")) }
        else { Issue.record("a trace build kept a kernel its twin would not") }
        #expect(throws: MoEError.self) { _ = try outcome(clean, tokens: 0) }
    }
}
