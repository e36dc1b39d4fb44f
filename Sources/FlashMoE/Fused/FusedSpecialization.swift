/// The compile-time constants the fused kernel (`moe.cu`) is specialised on, derived from a layer's config.
///
/// Shapes, precision, FFN, activation, router and shared expert are baked in by NVRTC as `-D` defines, so every
/// loop bound is a constant; the token count and the capacity are launch arguments, so a new S never recompiles.
/// The tile engine follows the architecture: wgmma (128×256 tiles) where the cubin targets `sm_90a`, mma.sync
/// (128×128) elsewhere, exact FFMA in fp32 mode; the kernel picks it from the target's feature macro. The pipeline
/// stages are chosen for the target's shared memory per block (`FusedSharedMemory.choose`): 4 on Hopper and A100,
/// fewer on the GPUs with 99 KiB per block (sm_86, sm_89, sm_120).
public struct FusedSpecialization: Sendable, Hashable {
    /// The layer configuration.
    public let config: MoEConfig
    /// The target the specialisation is for (its engine and shared-memory budget follow from it).
    public let arch: GPUArchitecture
    /// The kernel's shared memory: engine, stages, dynamic bytes (checked against the kernel's own formula).
    public let sharedMemory: FusedSharedMemory
    /// Pipeline stages of the shared-memory ring.
    public var stages: Int { sharedMemory.stages }
    /// Ranks sharing a launch (expert parallelism); 1 is the single-GPU operator.
    public let ranks: Int
    /// Test builds only: 1 never publishes GEMM1 row block 0; 2 makes the last rank never deliver its rows for
    /// expert 0. Either way a bounded wait must expire (exercises the hang safety).
    public let injectFault: Int
    /// Timing builds only: 1 stops after routing, 2 after placement (no valid output).
    public let stopAfterPhase: Int
    /// Timing builds: the kernel records %globaltimer at its phase boundaries (`FMOE_TIMING`); results unchanged.
    public let phaseTimes: Bool
    /// 16-bit layers: the routed experts' output rows are stored in the storage type instead of FP32
    /// (`FMOE_RET_STORAGE`): one GPU, the rows GEMM1 writes and the combine reads (half their bytes); ranks, the
    /// rows sent back to the source (half the return bytes). y then differs from FP32 rows' by one rounding of each
    /// expert output, the same on one GPU and with ranks, so one rank's y equals the ranks' with it on both sides.
    public let returnStorage: Bool

    /// Bytes of one element of the routed expert rows (one GPU) or of a source's return buffer (ranks).
    public var returnElementBytes: Int { returnStorage ? config.precision.storage.byteSize : 4 }

    /// Tracing builds: every block records its phases and tasks into a buffer (`FMOE_TRACE`, `KernelTrace`).
    public let trace: Bool

    /// Whether the expert GEMMs run on the sm_90a TMA engine (`FMOE_TMA`: 384-thread blocks, a producer warpgroup
    /// loading weights and h by TMA, phase_experts_tma.cuh) instead of the cp.async wgmma engine. Asked for with
    /// `tmaEngine` (default: `FLASHMOE_TMA=1`), and built only where it runs: an `sm_90a` target, bf16, fp16 or fp8,
    /// one GPU. Same bits as the cp.async engine (fp8: tma_fp8_engine.cuh, as the cp.async fp8 tiles).
    public let tmaEngine: Bool

    /// Weight rows of the fp8 TMA engine's tiles (`FMOE_TMA_FP8_BN`, tma_fp8_tasks.cuh), which also size the
    /// boxes of the fp8 weight maps (`FusedTensorMaps`): 256 (the default since round 33: half the activation bytes
    /// a FLOP and h quantized straight from the tile's registers; the same bits as 128 rows and the cp.async tiles,
    /// the fuzzer and compute-sanitizer clean, 9 – 22 % faster on an H100, Benchmarks/RESULTS.md), or 128
    /// (`FLASHMOE_TMA_FP8_BN=128`). Where a 256-row build fails or spills, the operator tries the 128-row build
    /// (`FusedPrefillEngine`). Fixed with the specialisation, so the kernel it names and the maps encoded for it
    /// agree (a box of more rows than the kernel's stage holds overruns it).
    public let tmaFP8TileRows: Int

    /// `tmaFP8TileRows` as the environment asks: 128 with `FLASHMOE_TMA_FP8_BN=128`, else 256.
    public static var tmaFP8TileRowsRequested: Int {
        ProcessEnvironment.current()["FLASHMOE_TMA_FP8_BN"] == "128" ? 128 : 256
    }

    /// Whether `tmaEngine` is asked for by the environment (`FLASHMOE_TMA=1`: every launch on the TMA engine). Off by
    /// default: bf16's TMA engine is slower than the cp.async engine; fp8's is faster at prefill but slower at decode
    /// (Benchmarks/RESULTS.md, rounds 25 – 27), so fp8 operators run it for prefill launches only, as a second kernel
    /// (`FusedPrefillEngine`).
    public static var tmaEngineRequested: Bool { ProcessEnvironment.current()["FLASHMOE_TMA"] == "1" }

    /// Whether the environment refuses the TMA engine (`FLASHMOE_TMA=0`): no prefill kernel either.
    public static var tmaEngineRefused: Bool { ProcessEnvironment.current()["FLASHMOE_TMA"] == "0" }

    /// Whether the TMA engine can be built for this target, precision and rank count.
    static func tmaEngineFits(arch: GPUArchitecture, precision: Precision, ranks: Int) -> Bool {
        arch.number == 90 && arch.architectureSpecific && [.bf16, .fp16, .fp8].contains(precision) && ranks == 1
    }

    /// The kernel's entry point on one GPU.
    public static let kernelName = "fmoe_forward"
    /// The entry point for ranks: blocks split into rank groups, parameters from a device-side table.
    public static let ranksKernelName = "fmoe_forward_ranks"
    /// The kernel file.
    public static let file = "moe.cu"
    /// Whether the kernel's FP8 path (docs/fp8.md; sm_90a, one GPU) is enabled. On the H200 it passes its verify
    /// cases (2e-3 to 8e-3 from the exact fp8 oracle: the FP8 tensor cores' accumulation) and is faster than bf16 at
    /// decode, but at prefill from 4 – 5 % faster (deepseek-v3 S = 4096: 8.39 ms against bf16's 8.56 – 8.78,
    /// mixtral-8x7b 4.95 against 5.15 – 5.19) to 1.5× slower (paper-e64 S = 8192: 1.03 against 0.69) and short of
    /// its speed targets (Benchmarks/RESULTS.md: fp8 rounds 25 and 26, bf16 rounds 18, 19 and 21), so it is off
    /// unless `FLASHMOE_EXPERIMENTAL_FP8=1`; while off, `init` refuses precision fp8 and `flashmoe verify` reports
    /// its fp8 cases as skipped.
    public static var supportsFP8: Bool { ProcessEnvironment.current()["FLASHMOE_EXPERIMENTAL_FP8"] == "1" }

    /// Whether the kernel has an fp8 engine for `arch`: sm_90a (E4M3 wgmma, wgmma_fp8.cuh) and sm_89 (E4M3 mma.sync,
    /// mma_fp8.cuh), which plain sm_90 also runs (how FLASHMOE_EMULATE_ARCH=sm_89 checks sm_89's path on a Hopper
    /// GPU). Blackwell's targets would run mma.sync too, but that build has never run, so they have none.
    static func hasFP8Engine(_ arch: GPUArchitecture) -> Bool { arch.number == 89 || arch.number == 90 }

    /// The target `flashmoe compile` and the tests assume when none is given: the H200's.
    public static let defaultArch = GPUArchitecture(major: 9, minor: 0)

    /// Checks the GPU kernel's limits on top of `MoEConfig.validate()`; the error says what to change.
    ///
    /// `sharedMemoryPerBlock` is the GPU's opt-in limit (nil: `ArchitectureLimits`' value for `arch`); `stages`
    /// nil chooses the most that fit (at most `FusedSharedMemory.preferredStages`); `experimentalFP8`: whether the
    /// experimental fp8 path may be built (default: `supportsFP8`, the environment's switch); `tmaFP8TileRows`: the
    /// fp8 TMA engine's tile rows, 128 or 256 (default: the environment's, `tmaFP8TileRowsRequested`).
    public init(
        config: MoEConfig, arch: GPUArchitecture = defaultArch, sharedMemoryPerBlock: Int? = nil, stages: Int? = nil,
        ranks: Int = 1, injectFault: Int = 0, stopAfterPhase: Int = 0, phaseTimes: Bool = false, trace: Bool = false,
        returnStorage: Bool = false, experimentalFP8: Bool = FusedSpecialization.supportsFP8,
        tmaEngine: Bool = FusedSpecialization.tmaEngineRequested,
        tmaFP8TileRows: Int = FusedSpecialization.tmaFP8TileRowsRequested
    ) throws(MoEError) {
        try config.validate()
        func fail(_ m: String) -> MoEError { MoEError(.unsupported, m) }
        guard config.hiddenSize % 8 == 0 else {
            throw fail("the GPU kernel needs H to be a multiple of 8 (16-byte rows); got H = \(config.hiddenSize)")
        }
        guard config.intermediateSize % 8 == 0 else {
            throw fail("the GPU kernel needs I to be a multiple of 8; got I = \(config.intermediateSize)")
        }
        if let s = config.sharedExpert, s.intermediateSize % 8 != 0 {
            throw fail("the GPU kernel needs the shared expert's I to be a multiple of 8; got \(s.intermediateSize)")
        }
        guard config.experts <= 512 else {
            throw fail("the GPU kernel supports up to 512 experts; got E = \(config.experts)")
        }
        guard config.topK <= 16 else { throw fail("the GPU kernel supports top-k up to 16; got k = \(config.topK)") }
        guard config.router.groups <= 128 else {
            throw fail("the GPU kernel supports up to 128 router groups; got \(config.router.groups)")
        }
        // FP8 (docs/fp8.md): refused on targets without an fp8 engine, then off unless FLASHMOE_EXPERIMENTAL_FP8=1
        // until it is fast (it meets its GPU tolerance: docs/fp8.md, Tolerances). With ranks the sources send x's
        // E4M3 codes and scales (phase_dispatch.cuh).
        if config.precision == .fp8 {
            guard Self.hasFP8Engine(arch) else {
                throw fail(
                    "precision fp8 runs on sm_90a (Hopper, wgmma) and sm_89 (Ada, mma.sync) only; the target is \(arch) (docs/fp8.md): run fp8 on the CPU backends or use --precision bf16")
            }
            for (name, v) in [("H", config.hiddenSize), ("I", config.intermediateSize)] where v % 16 != 0 {
                throw fail("precision fp8 on the GPU needs \(name) to be a multiple of 16 (16-byte rows of E4M3); got \(name) = \(v)")
            }
            guard experimentalFP8 else {
                throw fail(
                    "precision fp8 is experimental on the GPU: the kernel's FP8 path is correct within its tolerance on sm_90a and faster than bf16 at decode, but at prefill still up to 1.5× slower than bf16 (sm_89's path has not run on a GPU), so it is off unless FLASHMOE_EXPERIMENTAL_FP8=1 (docs/fp8.md); run fp8 with --backend cpu or oracle, or use --precision bf16 on the GPU")
            }
        }
        guard ranks >= 1 && ranks <= 64 else { throw fail("ranks must be between 1 and 64; got \(ranks)") }
        guard ranks <= config.experts else {
            throw fail("\(ranks) ranks need at least \(ranks) experts to place (got E = \(config.experts))")
        }
        if returnStorage {
            guard config.precision.storage.byteSize == 2 else {
                throw fail("storage returns need a 16-bit layer (bf16 or fp16); this one stores \(config.precision)")
            }
        }
        self.returnStorage = returnStorage
        let limit: Int
        if let sharedMemoryPerBlock {
            limit = sharedMemoryPerBlock
        } else {
            do { limit = try ArchitectureLimits.of(arch).sharedMemoryPerBlockOptIn } catch { throw fail(error.description) }
        }
        guard tmaFP8TileRows == 128 || tmaFP8TileRows == 256 else {
            throw fail("the fp8 TMA engine's tiles have 128 or 256 weight rows; got \(tmaFP8TileRows)")
        }
        let tma = tmaEngine && Self.tmaEngineFits(arch: arch, precision: config.precision, ranks: ranks)
        sharedMemory = try FusedSharedMemory.choose(
            config: config, arch: arch, limit: limit, ranks: ranks, stages: stages, tmaEngine: tma,
            tmaFP8TileRows: tmaFP8TileRows)
        self.arch = arch
        self.ranks = ranks
        self.config = config
        self.injectFault = injectFault
        self.stopAfterPhase = stopAfterPhase
        self.phaseTimes = phaseTimes
        self.trace = trace
        self.tmaEngine = tma
        self.tmaFP8TileRows = tmaFP8TileRows
    }

    /// The TMA engine's build of this specialisation, which an operator launches for prefill (`FusedPrefillEngine`):
    /// for precision fp8 where the engine runs (sm_90a, one GPU) and this build is not already it, unless
    /// `refused` (default: `FLASHMOE_TMA=0`); nil otherwise. Everything else is this build's; the stages are chosen
    /// for the TMA ring unless `stages` fixes them, within `sharedMemoryPerBlock` (nil: the architecture's).
    public func prefillVariant(
        sharedMemoryPerBlock: Int? = nil, stages: Int? = nil, refused: Bool = FusedSpecialization.tmaEngineRefused
    ) throws(MoEError) -> FusedSpecialization? {
        guard config.precision == .fp8, !tmaEngine, !refused,
            Self.tmaEngineFits(arch: arch, precision: config.precision, ranks: ranks)
        else { return nil }
        return try rebuilt(tmaEngine: true, trace: trace, stages: stages, sharedMemoryPerBlock: sharedMemoryPerBlock)
    }

    /// This TMA build with 128-row fp8 tiles, when it has 256 (the operator's next try where the wider build fails,
    /// spills or does not match the first kernel: `FusedPrefillEngine.load`); nil for any other build. Stages and
    /// shared memory as `prefillVariant`.
    func narrowerFP8Tiles(sharedMemoryPerBlock: Int? = nil, stages: Int? = nil) throws(MoEError)
        -> FusedSpecialization?
    {
        guard tmaEngine, config.precision == .fp8, tmaFP8TileRows == 256 else { return nil }
        return try rebuilt(
            tmaEngine: true, trace: trace, stages: stages, sharedMemoryPerBlock: sharedMemoryPerBlock, tileRows: 128)
    }

    /// This specialisation without the tracing build's stamps (`trace` false), everything else the same: the
    /// kernel a tracing build stands for.
    func untraced() throws(MoEError) -> FusedSpecialization {
        try rebuilt(tmaEngine: tmaEngine, trace: false, stages: stages, sharedMemoryPerBlock: nil)
    }

    /// This specialisation built again with another engine, tracing, stages or fp8 tile rows, everything else the
    /// same (fp8 is allowed: this one exists).
    private func rebuilt(
        tmaEngine: Bool, trace: Bool, stages: Int?, sharedMemoryPerBlock: Int?, tileRows: Int? = nil
    ) throws(MoEError) -> FusedSpecialization {
        try FusedSpecialization(
            config: config, arch: arch, sharedMemoryPerBlock: sharedMemoryPerBlock, stages: stages, ranks: ranks,
            injectFault: injectFault, stopAfterPhase: stopAfterPhase, phaseTimes: phaseTimes, trace: trace,
            returnStorage: returnStorage, experimentalFP8: true, tmaEngine: tmaEngine,
            tmaFP8TileRows: tileRows ?? tmaFP8TileRows)
    }

    /// The `-D` defines of this specialisation.
    public var defines: [String: String] {
        let c = config
        let precision: Int
        switch c.precision {
        case .fp32: precision = 0
        case .tf32: precision = 1
        case .bf16: precision = 2
        case .fp16: precision = 3
        case .fp8: precision = 4  // reserved for the kernel's FP8 path; init refuses fp8 until it exists
        }
        let activation: Int
        switch c.activation {
        case .relu: activation = 0
        case .gelu: activation = 1
        case .geluTanh: activation = 2
        case .silu: activation = 3
        }
        var d: [String: String] = [
            "FMOE_H": "\(c.hiddenSize)", "FMOE_I": "\(c.intermediateSize)", "FMOE_E": "\(c.experts)",
            "FMOE_K": "\(c.topK)", "FMOE_PREC": "\(precision)", "FMOE_ACT": "\(activation)",
            "FMOE_GATED": c.ffn == .gated ? "1" : "0", "FMOE_BIAS": c.bias ? "1" : "0",
            "FMOE_SCORING": c.router.scoring == .softmax ? "0" : "1", "FMOE_GROUPS": "\(c.router.groups)",
            "FMOE_GROUPS_KEPT": "\(c.router.groupsKept)", "FMOE_RENORM": c.router.renormalize ? "1" : "0",
            // The exact float: 9 significant digits round-trip any Float.
            "FMOE_SCALE": Self.floatLiteral(c.router.scalingFactor),
            "FMOE_SHARED_I": "\(c.sharedExpert?.intermediateSize ?? 0)",
            "FMOE_SHARED_GATED": c.sharedExpert?.gated == true ? "1" : "0",
            "FMOE_STAGES": "\(stages)",
            // The host's value of the kernel's DYNAMIC_SMEM: the kernel static_asserts they agree.
            "FMOE_DYNAMIC_SMEM": "\(sharedMemory.dynamicBytes)",
        ]
        if ranks > 1 { d["FMOE_RANKS"] = "\(ranks)" }
        if injectFault != 0 { d["FMOE_INJECT_FAULT"] = "\(injectFault)" }
        if stopAfterPhase != 0 { d["FMOE_STOP_AFTER"] = "\(stopAfterPhase)" }
        if phaseTimes { d["FMOE_TIMING"] = "1" }
        if returnStorage { d["FMOE_RET_STORAGE"] = "1" }
        if trace { d["FMOE_TRACE"] = "1" }
        if tmaEngine { d["FMOE_TMA"] = "1" }
        if tmaEngine && c.precision == .fp8 {
            d["FMOE_TMA_FP8_BN"] = "\(tmaFP8TileRows)"
            // 256-row tiles read %tid.x afresh at each use (common.cuh's fmoe_tid): one read kept across the kernel
            // made ptxas spill its predicates around those tiles' mainloops.
            if tmaFP8TileRows == 256 { d["FMOE_FRESH_TID"] = "1" }
        }
        return d
    }

    /// The catalog entry `flashmoe compile` and the operator build.
    public var kernelSpec: KernelSpec {
        KernelSpec(file: Self.file, defines: defines, kernels: [Self.kernelName, Self.ranksKernelName])
    }

    /// Router rows in the kernel: E, plus one for the shared expert's sigmoid gate.
    public var routerRows: Int { config.experts + (config.sharedExpert?.gated == true ? 1 : 0) }

    static func floatLiteral(_ v: Float) -> String {
        // Swift prints the shortest representation that round-trips; the C parser reads it back exactly.
        var s = "\(v)"
        if !s.contains(".") && !s.contains("e") && !s.contains("inf") && !s.contains("nan") { s += ".0" }
        return "(" + s + "f)"
    }
}
