/// The fused kernel's shared memory for one specialisation, computed on the host with the kernel's own formulas,
/// and the choice of pipeline stages that makes it fit a GPU.
///
/// The formulas are those of `moe_params.cuh` (`DYNAMIC_SMEM`, `ROUTE_CHUNK`) and `gemm_tile.cuh` (`stage_bytes`,
/// `c_bytes`): the larger of the two engines' rings (stages × (128 + BN) rows of 128 bytes) and staged FP32 tiles
/// (128 × (BN + 4) floats), plus 1 KiB to align the stages. The host passes its value to NVRTC as
/// `FMOE_DYNAMIC_SMEM` and the kernel `static_assert`s that its own formula gives the same bytes
/// (`launch_limits.cuh`), so every `flashmoe compile` proves the two agree. Static shared memory (the task layout,
/// the scan's per-expert counts, a ranks launch's `Params` copy) is bounded from above here and reported exactly
/// by ptxas; a test compiles specialisations and checks the bound.
public struct FusedSharedMemory: Sendable, Hashable, CustomStringConvertible {
    /// The kernel's tile engine for the experts, which the target decides (`FMOE_WGMMA` in moe_params.cuh).
    public enum Engine: String, Sendable, Hashable {
        /// Hopper warpgroup MMA, 128×256 tiles (`sm_90a` only).
        case wgmma
        /// mma.sync tensor cores, 128×128 tiles.
        case mmaSync = "mma.sync"
        /// Exact FP32 fused multiply-adds, 128×128 tiles (fp32 mode).
        case ffma
    }

    /// The expert GEMMs' engine.
    public let engine: Engine
    /// Expert tile width (`EBN`).
    public let expertTileWidth: Int
    /// Weight rows a stage of the expert ring holds (`RING_BN`): the tile width, or for fp8 on the TMA engine that
    /// engine's weight rows a tile (`FusedSpecialization.tmaFP8TileRows`: 128, or 256 for its tiles of two 128-wide
    /// task tiles, tma_fp8_engine.cuh).
    public let ringTileWidth: Int
    /// Gate tile width (`GBN`): the expert engine's in 16-bit modes, FFMA's (128) in fp32 and tf32 modes.
    public let gateTileWidth: Int
    /// Pipeline stages of the shared-memory ring.
    public let stages: Int
    /// Dynamic shared memory per block (the kernel's `DYNAMIC_SMEM`).
    public let dynamicBytes: Int
    /// An upper bound of the kernel's static shared memory per block.
    public let staticBytesBound: Int
    /// Tokens whose logits routing stages at once (`ROUTE_CHUNK`: 128, 64 or 32); the kernel needs room for 32.
    public let routeChunk: Int

    /// The most stages the operator uses: the count the H200 numbers of `Benchmarks/RESULTS.md` were measured with.
    public static let preferredStages = 4
    /// The most stages the kernel accepts.
    public static let maxStages = 6
    /// Tile rows (`BM`) and bytes per k-slice row (`ROW_BYTES`) of `gemm_tile.cuh`.
    static let tileRows = 128, rowBytes = 128

    /// The fewest stages `engine`'s mainloop runs with: the wgmma pipeline keeps one group in flight while it loads
    /// two ahead (3); the cp.async ring of mma.sync and FFMA double-buffers with 2.
    public static func minStages(_ engine: Engine) -> Int { engine == .wgmma ? 3 : 2 }

    /// The engine `config` compiles to on `arch`: wgmma where the target has it (`sm_90a`), FFMA in fp32 mode.
    public static func engine(for config: MoEConfig, arch: GPUArchitecture) -> Engine {
        if config.precision == .fp32 { return .ffma }
        let hopper = arch.architectureSpecific && arch.computeCapability == ComputeCapability(major: 9, minor: 0)
        return hopper ? .wgmma : .mmaSync
    }

    /// The shared memory of `config` on `arch` with `stages` stages (any count; `fits` says whether it runs);
    /// `tmaEngine`: the kernel is built for the sm_90a TMA engine (`FusedSpecialization.tmaEngine`), whose fp8 tiles
    /// have `tmaFP8TileRows` weight rows (128 or 256).
    public init(
        config: MoEConfig, arch: GPUArchitecture, stages: Int, ranks: Int = 1, tmaEngine: Bool = false,
        tmaFP8TileRows: Int = 128
    ) {
        engine = Self.engine(for: config, arch: arch)
        let fp8 = config.precision == .fp8
        // fp8 (wgmma_fp8.cuh): 128-wide E4M3 expert tiles, a BF16 mma.sync gate and shared expert of the same width.
        expertTileWidth = engine == .wgmma && !fp8 ? 256 : 128
        ringTileWidth = fp8 && tmaEngine ? tmaFP8TileRows : expertTileWidth
        gateTileWidth = config.precision.storage.byteSize == 2 ? expertTileWidth : 128
        self.stages = stages
        func stageBytes(_ bn: Int) -> Int { (Self.tileRows + bn) * Self.rowBytes }
        func stagedTileBytes(_ bn: Int) -> Int { Self.tileRows * (bn + 4) * 4 }
        // fp8's stages are the 128-wide tiles' (wgmma_fp8.cuh): a 128-wide K block of E4M3 A and B rows is 128 bytes
        // a row, as a k-slice of BF16 rows.
        dynamicBytes =
            max(stages * stageBytes(ringTileWidth), stages * stageBytes(gateTileWidth),
                stagedTileBytes(expertTileWidth), stagedTileBytes(gateTileWidth)) + 1024
        let e = config.experts, k = config.topK
        let routerRows = e + (config.sharedExpert?.gated == true ? 1 : 0)
        // The largest of 128, 64 and 32 rows that fits beside the masks and ids, as the kernel chooses it; below 32
        // nothing fits (routeChunk is then the fit, which `fits` rejects). Integer division truncates toward zero in
        // C and Swift alike.
        let fit = (dynamicBytes - 1024 - e * 16 - Self.tileRows * k * 4) / ((routerRows + 1) * 4)
        routeChunk = fit >= 128 ? 128 : fit >= 64 ? 64 : fit >= 32 ? 32 : fit
        // Layout (xs + three [E + 2] tables, three more [E] with ranks), the scan's kept[E], a ranks launch's
        // Params copy (compiled into every cubin), fp8's row scales without wgmma (two K blocks', mma_fp8.cuh), block
        // indices and the phase-local flags (256 B of slack); ptxas pads static shared memory to whole KiB so the
        // 1024-aligned dynamic array starts aligned.
        let layout = 4 + 3 * (e + 2) * 4 + 3 * (ranks > 1 ? e : 1) * 4
        // The TMA builds add phase_experts_tma.cuh's TmaShared and what their phases keep beside it: ptxas reports
        // their static shared memory 0 – 1 KiB above the cp.async builds' (the fp8 presets, NVRTC 13.0), so 1 KiB is
        // allowed; SharedMemoryFitTests checks the bound against ptxas.
        let fp8RowScales = fp8 && engine == .mmaSync ? 2 * Self.tileRows * 4 : 0
        let tmaShared = tmaEngine ? 1024 : 0
        // The fp8 TMA engine's 256-row tiles carry their scales in the ring (FMOE_FP8_SMEM_SCALES,
        // tma_fp8_tasks.cuh): each stage's 128 rows' A scales and 4 granule scales, as floats.
        let ringStages = (dynamicBytes - 1024) / stageBytes(ringTileWidth)
        let ringScales = fp8 && tmaEngine && ringTileWidth == 256 ? ringStages * (Self.tileRows + 4) * 4 : 0
        staticBytesBound =
            (layout + e * 4 + FusedParams.byteCount + fp8RowScales + tmaShared + ringScales + 256 + 1023) / 1024 * 1024
    }

    /// Static bound plus dynamic bytes: what must fit the GPU's opt-in limit per block.
    public var totalBytes: Int { dynamicBytes + staticBytesBound }

    /// Whether a block fits `limit` bytes of shared memory and routing has room for its 32-token chunks.
    public func fits(limit: Int) -> Bool { totalBytes <= limit && routeChunk >= 32 }

    /// The engine, tile shape and stages, then dynamic and bounded static bytes: "wgmma 128×256 tiles, 4 stages:
    /// N B dynamic + ≤ M B static shared memory per block".
    public var description: String {
        "\(engine.rawValue) \(Self.tileRows)×\(ringTileWidth) tiles, \(stages) stages: \(dynamicBytes) B dynamic + "
            + "≤ \(staticBytesBound) B static shared memory per block"
    }

    /// The configuration of `config` on `arch` for a block limit of `limit` bytes: `stages` when given (an error
    /// when it does not fit), else the most stages up to `preferredStages` that fit.
    public static func choose(
        config: MoEConfig, arch: GPUArchitecture, limit: Int, ranks: Int = 1, stages requested: Int? = nil,
        tmaEngine: Bool = false, tmaFP8TileRows: Int = 128
    ) throws(MoEError) -> FusedSharedMemory {
        let engine = engine(for: config, arch: arch)
        let lowest = minStages(engine)
        if let requested {
            guard (lowest...maxStages).contains(requested) else {
                throw MoEError(
                    .unsupported, "pipeline stages must be \(lowest) to \(maxStages) for the \(engine.rawValue) engine; "
                        + "got \(requested)")
            }
            let m = FusedSharedMemory(
                config: config, arch: arch, stages: requested, ranks: ranks, tmaEngine: tmaEngine,
                tmaFP8TileRows: tmaFP8TileRows)
            guard m.fits(limit: limit) else { throw tooLarge(m, arch: arch, limit: limit, hint: "use fewer stages") }
            return m
        }
        for s in stride(from: preferredStages, through: lowest, by: -1) {
            let m = FusedSharedMemory(
                config: config, arch: arch, stages: s, ranks: ranks, tmaEngine: tmaEngine,
                tmaFP8TileRows: tmaFP8TileRows)
            if m.fits(limit: limit) { return m }
        }
        let smallest = FusedSharedMemory(
            config: config, arch: arch, stages: lowest, ranks: ranks, tmaEngine: tmaEngine,
            tmaFP8TileRows: tmaFP8TileRows)
        throw tooLarge(smallest, arch: arch, limit: limit, hint: "use fewer experts or a smaller top-k")
    }

    private static func tooLarge(_ m: FusedSharedMemory, arch: GPUArchitecture, limit: Int, hint: String) -> MoEError {
        if m.routeChunk < 32 {
            return MoEError(
                .unsupported, "on \(arch) with \(m.stages) stages the routing of E experts has room for "
                    + "\(max(0, m.routeChunk)) tokens' logits, it needs 32 (\(m)): \(hint)")
        }
        return MoEError(
            .unsupported, "the fused kernel needs \(m.totalBytes) B of shared memory per block on \(arch) (\(m)); the "
                + "GPU allows \(limit) B: \(hint)")
    }
}
