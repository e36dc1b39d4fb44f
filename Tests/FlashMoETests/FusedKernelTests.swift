import Testing
@testable import FlashMoE

/// The fused kernel's host-side contract, without a GPU: specialisation limits, expert placement, traffic
/// accounting, and (with NVRTC) that every variant compiles for sm_80 and sm_90a with no register spills.
@Suite struct FusedKernelTests {
    @Test func gpuLimitsAreTypedErrors() {
        var c = MoEConfig(hiddenSize: 100, intermediateSize: 64, experts: 8, topK: 2)
        #expect(throws: MoEError.self) { try FusedSpecialization(config: c) }
        c.hiddenSize = 64
        c.experts = 600
        #expect(throws: MoEError.self) { try FusedSpecialization(config: c) }
        c.experts = 8
        #expect(throws: MoEError.self) { try FusedSpecialization(config: c, ranks: 9) }
        #expect(throws: Never.self) { try FusedSpecialization(config: c, ranks: 8) }
    }

    /// The fp8 compile tests' layers: gated with a shared expert, and plain with a bias (H and I not powers of two).
    static let fp8Gated = MoEConfig(
        hiddenSize: 256, intermediateSize: 192, experts: 8, topK: 2, ffn: .gated, activation: .silu,
        sharedExpert: SharedExpertConfig(intermediateSize: 64), precision: .fp8)
    static let fp8Plain = MoEConfig(
        hiddenSize: 384, intermediateSize: 208, experts: 16, topK: 4, bias: true, activation: .gelu, precision: .fp8)

    /// fp8 with ranks (expert parallelism): the sources send x's E4M3 codes and scales (phase_dispatch.cuh), so the
    /// ranks kernel of sm_90a (cp.async wgmma tiles: the TMA engine is one GPU's) and of sm_89 (mma.sync) builds at
    /// 2 and 8 ranks, gated with a shared expert and plain with a bias, with no spills in either entry point.
    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason), arguments: ["sm_89", "sm_90a"])
    func fp8RanksCompileWithoutSpills(arch: String) throws {
        let compiler = KernelCompiler(backend: TestEnvironment.nvrtc!, cache: nil)
        let target = try GPUArchitecture(parsing: arch)
        let (gated, plain) = (Self.fp8Gated, Self.fp8Plain)
        for (config, ranks) in [(gated, 2), (plain, 8)] {
            let spec = try FusedSpecialization(config: config, arch: target, ranks: ranks, experimentalFP8: true)
            #expect(!spec.tmaEngine, "ranks run the cp.async tiles")
            #expect(spec.kernelSpec.defines["FMOE_RANKS"] == "\(ranks)")
            let k = try compiler.compile(spec.kernelSpec, arch: target, sources: .embedded)
            for name in [FusedSpecialization.kernelName, FusedSpecialization.ranksKernelName] {
                let usage = try #require(k.resources.first { $0.name == name })
                #expect(usage.spillStoreBytes == 0 && usage.spillLoadBytes == 0,
                        "fp8 R=\(ranks) spills \(usage.spillStoreBytes) B in \(name) on \(arch)")
            }
        }
    }

    /// fp8 has an engine on sm_90a (wgmma) and sm_89 (mma.sync, also plain sm_90 for FLASHMOE_EMULATE_ARCH=sm_89);
    /// other targets get a typed error naming both, before the experimental switch is asked.
    @Test func fp8TargetsAreSm90aAndSm89() throws {
        let c = MoEConfig(hiddenSize: 256, intermediateSize: 128, experts: 8, topK: 2, precision: .fp8)
        for name in ["sm_80", "sm_86", "sm_120", "sm_100a"] {
            let arch = try GPUArchitecture(parsing: name)
            #expect {
                try FusedSpecialization(config: c, arch: arch)
            } throws: { error in
                "\(error)".contains("sm_90a (Hopper, wgmma) and sm_89 (Ada, mma.sync) only") && "\(error)".contains(name)
            }
        }
        for name in ["sm_89", "sm_90", "sm_90a"] {
            let arch = try GPUArchitecture(parsing: name)
            do {
                _ = try FusedSpecialization(config: c, arch: arch)
                #expect(FusedSpecialization.supportsFP8, "\(name): built without FLASHMOE_EXPERIMENTAL_FP8")
            } catch {
                #expect(!FusedSpecialization.supportsFP8 && "\(error)".contains("FLASHMOE_EXPERIMENTAL_FP8"), "\(name): \(error)")
            }
        }
    }

    @Test func definesCarryTheShapeAndRanks() throws {
        let spec = try FusedSpecialization(config: Preset.deepSeekV3.config, ranks: 4)
        let d = spec.defines
        #expect(d["FMOE_H"] == "7168" && d["FMOE_E"] == "256" && d["FMOE_K"] == "8")
        #expect(d["FMOE_SCORING"] == "1" && d["FMOE_GROUPS"] == "8" && d["FMOE_GROUPS_KEPT"] == "4")
        #expect(d["FMOE_SHARED_I"] == "2048" && d["FMOE_RANKS"] == "4" && d["FMOE_SCALE"] == "(2.5f)")
        #expect(try FusedSpecialization(config: Preset.paperE64.config).defines["FMOE_RANKS"] == nil)
    }

    @Test(arguments: [(30, 4), (64, 8), (8, 3), (5, 5), (7, 1)])
    func placementCoversEveryExpertOnce(experts: Int, ranks: Int) throws {
        let p = try ExpertPlacement(experts: experts, ranks: ranks)
        var seen = 0
        for r in 0..<ranks {
            let mine = p.experts(of: r)
            #expect(mine.lowerBound == seen)
            #expect(mine.count == experts / ranks || mine.count == experts / ranks + 1)
            for e in mine { #expect(p.owner(of: e) == r) }
            seen = mine.upperBound
        }
        #expect(seen == experts)
    }

    @Test func placementRejectsMoreRanksThanExperts() {
        #expect(throws: MoEError.self) { try ExpertPlacement(experts: 4, ranks: 5) }
        #expect(throws: MoEError.self) { try ExpertPlacement(experts: 4, ranks: 0) }
    }

    /// fp8 arenas hold a GEMM0 counter per row block and 128-channel group of h (`hq_done`: phase_experts.cuh's
    /// count_h_groups), the last region and `Params`' last pointer; other precisions keep a placeholder.
    @Test func fp8ArenasHoldTheGroupCounters() throws {
        var c = MoEConfig(hiddenSize: 256, intermediateSize: 208, experts: 16, topK: 4, ffn: .gated, precision: .fp8)
        let spec = try FusedSpecialization(
            config: c, arch: GPUArchitecture(major: 9, minor: 0), experimentalFP8: true, tmaEngine: false)
        let ws = FusedWorkspace(spec: spec, tokens: 300, rowCapacity: 1200, partRows: 300)
        #expect(FusedWorkspace.Region.allCases.last == .hqDone && FusedParams.pointerFields.last == "hq_done")
        // ⌈208 / 128⌉ = 2 groups a row block, 4 bytes each, up to the next 256-byte boundary.
        let bytes = ws.byteCount - ws.offset(.hqDone)
        #expect(bytes >= ws.rowBlocks * 2 * 4 && bytes < ws.rowBlocks * 2 * 4 + 256)
        c.precision = .bf16
        let bf16 = FusedWorkspace(spec: try FusedSpecialization(config: c), tokens: 300, rowCapacity: 1200, partRows: 300)
        #expect(bf16.byteCount - bf16.offset(.hqDone) == 256)
    }

    @Test func paramsLayoutMatchesTheKernelStructs() throws {
        // 46 pointers + 10 ints + 3 u64 (moe.cu Params), 10 pointers (Peer); the kernel's probe reports the size
        // and every offset at load time.
        #expect(FusedParams.byteCount == 432)
        #expect(FusedParams.peerByteCount == 80)
        #expect(FusedParams.layout.count == 60)
        let bytes = FusedParams.encode(
            pointers: [UInt64](repeating: 7, count: 46),
            FusedParams.Scalars(tokens: 5, capacity: 9, rank: 2, gateSplit: 3, rowBlocks: 4, maxTokens: 6, partRows: 8,
                                yStorage: true, injectFault: true, epoch: 11, budgetNanoseconds: 13, epochWrap: 17))
        #expect(bytes.count == FusedParams.byteCount)
        let off = Dictionary(uniqueKeysWithValues: zip(FusedParams.fieldNames, FusedParams.offsets))
        #expect(bytes[off["tokens"]!] == 5 && bytes[off["rank"]!] == 2 && bytes[off["max_tokens"]!] == 6)
        #expect(bytes[off["part_rows"]!] == 8 && bytes[off["y_storage"]!] == 1 && bytes[off["inject_fault"]!] == 1)
        #expect(bytes[off["epoch"]!] == 11 && bytes[off["budget_ns"]!] == 13 && bytes[off["epoch_wrap"]!] == 17)
        // The load-time check passes the host's own layout and names the first field that differs.
        try FusedParams.checkLayout(kernel: FusedParams.layout)
        var shifted = FusedParams.layout
        shifted[1 + FusedParams.fieldNames.firstIndex(of: "max_tokens")!] += 4
        #expect {
            try FusedParams.checkLayout(kernel: shifted)
        } throws: { error in
            "\(error)".contains("max_tokens")
        }
    }

    /// fp8 (experimental) where it has an engine, wgmma on sm_90a (the cp.async tiles and the TMA engine's tiles of
    /// 128 and 256 weight rows) and mma.sync on sm_89 (one GPU only), plain and traced, and at k = 16 with a shared
    /// expert, with no spills.
    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason), arguments: ["sm_89", "sm_90a"])
    func fp8CompilesWithoutSpills(arch: String) throws {
        let compiler = KernelCompiler(backend: TestEnvironment.nvrtc!, cache: nil)
        let target = try GPUArchitecture(parsing: arch)
        let (gated, plain) = (Self.fp8Gated, Self.fp8Plain)
        // The largest k with a shared expert: its combine keeps the most loads in flight (at 256 rows it spilled 8 B
        // until phase_combine.cuh's combine_cols capped them).
        let widest = MoEConfig(hiddenSize: 512, intermediateSize: 64, experts: 16, topK: 16, ffn: .gated,
                               activation: .silu,
                               sharedExpert: SharedExpertConfig(intermediateSize: 64, gated: true), precision: .fp8)
        // sm_90a has two engines: the cp.async tiles and the TMA engine (the prefill kernel), whose tiles have 128 or
        // (FLASHMOE_TMA_FP8_BN=256) 256 weight rows.
        var specs: [FusedSpecialization] = []
        let forms: [(tma: Bool, rows: Int)] =
            arch == "sm_90a" ? [(false, 128), (true, 128), (true, 256)] : [(false, 128)]
        for (tma, rows) in forms {
            specs += [
                try FusedSpecialization(
                    config: gated, arch: target, experimentalFP8: true, tmaEngine: tma, tmaFP8TileRows: rows),
                try FusedSpecialization(
                    config: plain, arch: target, experimentalFP8: true, tmaEngine: tma, tmaFP8TileRows: rows),
                try FusedSpecialization(
                    config: gated, arch: target, trace: true, experimentalFP8: true, tmaEngine: tma,
                    tmaFP8TileRows: rows),
                try FusedSpecialization(
                    config: widest, arch: target, experimentalFP8: true, tmaEngine: tma, tmaFP8TileRows: rows),
            ]
        }
        for spec in specs {
            let k = try compiler.compile(spec.kernelSpec, arch: target, sources: .embedded)
            let usage = try #require(k.resources.first { $0.name == FusedSpecialization.kernelName })
            let engine = spec.tmaEngine ? " (TMA engine, \(spec.tmaFP8TileRows) rows)" : ""
            let defines = spec.kernelSpec.defines.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
            #expect(
                usage.spillStoreBytes == 0 && usage.spillLoadBytes == 0,
                "fp8 spills \(usage.spillStoreBytes) B on \(arch)\(engine): \(defines)")
            // ptxas serialises the warpgroup MMAs of a function that calls another while they may be in flight
            // (C7510), silently but for this line of its log: a warpgroup MMA placed in a called function (round 47
            // tried the decode GEMV's in gemv_task, Benchmarks/RESULTS.md) made it serialise the tiles' in the
            // kernels themselves.
            let entries = [FusedSpecialization.kernelName, FusedSpecialization.ranksKernelName]
            let serialised = k.log.split(separator: "\n").filter { line in
                line.contains("C7510") && entries.contains { line.contains("'\($0)'") }
            }
            #expect(serialised.isEmpty, "fp8 on \(arch)\(engine): \(serialised.joined(separator: "; "))")
        }
    }

    /// fp8's A/B switches (`FMOE_FP8_SCALES_AHEAD=0`: a K block's scales loaded in the block, as before round 10;
    /// `FMOE_QUANT_GROUPS` away from the architecture's default, 1 on sm_90a and 8 on sm_89: x's and h's quantization
    /// with that many groups a warp in flight, phase_fp8.cuh; `FMOE_FP8_SHARED_WGMMA=0`: the shared expert's BF16
    /// tiles on mma.sync, as before round 35, moe_params.cuh; `FMOE_FP8_SHARED_WIDE=0`: a shared ticket's two column
    /// tiles as two 128-wide tiles instead of one 128 × 256 tile, as before round 36, phase_experts_tma_fp8.cuh, in the
    /// 256-row TMA kernel: settings ending in "tma"; `FMOE_FP8_SPLIT_HALVES=0`: tiles of at most 64 rows on one
    /// consumer warpgroup while the other idles, as before round 40, tma_fp8_engine.cuh; `FMOE_FP8_ORDERED_ISSUE=1`:
    /// warpgroup 0 issues each K block's first MMAs before warpgroup 1, round 41, and `=2` warpgroup 1 only once
    /// warpgroup 0's have completed, round 42, tma_fp8_engine.cuh) compile on
    /// sm_90a (wgmma) and sm_89 (mma.sync) without spills and change the code of a kernel with a shared expert.
    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason),
          arguments: ["sm_90a FMOE_FP8_SCALES_AHEAD=0", "sm_90a FMOE_QUANT_GROUPS=1", "sm_89 FMOE_QUANT_GROUPS=8",
                     "sm_90a FMOE_FP8_SHARED_WGMMA=0", "sm_90a FMOE_FP8_SHARED_WIDE=0 tma",
                     "sm_90a FMOE_FP8_SPLIT_HALVES=0 tma", "sm_90a FMOE_FP8_ORDERED_ISSUE=1 tma",
                     "sm_90a FMOE_FP8_ORDERED_ISSUE=2 tma"])
    func fp8SwitchesCompileWithoutSpills(setting: String) throws {
        let compiler = KernelCompiler(backend: TestEnvironment.nvrtc!, cache: nil)
        let words = setting.split(separator: " ")
        let target = try GPUArchitecture(parsing: String(words[0]))
        let parts = words[1].split(separator: "=").map(String.init)
        let gated = MoEConfig(hiddenSize: 256, intermediateSize: 192, experts: 8, topK: 2, ffn: .gated,
                              activation: .silu, sharedExpert: SharedExpertConfig(intermediateSize: 128),
                              precision: .fp8)
        let tma = words.count > 2 && words[2] == "tma"
        let plain = try FusedSpecialization(config: gated, arch: target, experimentalFP8: true, tmaEngine: tma,
                                            tmaFP8TileRows: 256).kernelSpec
        var spec = plain
        spec.defines[parts[0]] = parts[1]
        let k = try compiler.compile(spec, arch: target, sources: .embedded)
        let base = try compiler.compile(plain, arch: target, sources: .embedded)
        #expect(k.cubin != base.cubin, "\(setting) compiled the default kernel")
        let usage = try #require(k.resources.first { $0.name == FusedSpecialization.kernelName })
        #expect(usage.spillStoreBytes == 0 && usage.spillLoadBytes == 0, "fp8 spills with \(setting)")
    }

    /// The kernel's A/B switches that the GPU measurements compare (`scripts/gpu-variants`), each away from its
    /// default: the decode prefix and the decode ring turned off, the combine one or four columns a lane at once,
    /// decode tiles of one width only, 128 weight rows (m64n64 instructions a warpgroup) or 64, instead of both widths
    /// chosen per launch, the decode prefix placing a thread per token instead of a thread per pair, decode
    /// weights read with the normal L2 policy instead of evict-first, route tasks of 8 tokens whatever the grid,
    /// prefill placing a thread per token, the wide tiles' epilogues both staged or both stored from registers
    /// (instead of GEMM1's alone), GEMM1 tickets of two column tiles, chosen by the shape or always, and
    /// row blocks of at most 64 rows run as 128 × 256 tiles instead of 64 × 256 half tiles, every thread's fence.sc
    /// before a count instead of the barrier and thread 0's fence, the launch's GEMM1 work counted per tile, and
    /// the routed expert rows in the storage type (`FusedOptions.storageReturns`, one GPU and ranks).
    /// Each must still compile on sm_90a, one GPU and ranks, with no spills, and change the code of a single-GPU
    /// bf16 kernel (a misspelt switch would compile the default).
    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason),
          arguments: ["FMOE_DECODE_PREFIX=0", "FMOE_DECODE_RING=0", "FMOE_COMBINE_COLS=1", "FMOE_COMBINE_COLS=4",
                     "FMOE_DECODE_ROWS=128", "FMOE_DECODE_ROWS=64", "FMOE_DECODE_PLACE_PAIRS=0",
                     "FMOE_DECODE_EVICT_FIRST=0", "FMOE_ROUTE_FIT=0", "FMOE_PLACE_PAIRS=0", "FMOE_REG_EPILOGUE=0",
                     "FMOE_REG_EPILOGUE=2", "FMOE_CHAIN1=0", "FMOE_CHAIN1=2", "FMOE_HALF_TILES=0",
                     "FMOE_RELEASE_FENCE=0", "FMOE_COUNT_BLOCKS1=0", "FMOE_RET_STORAGE=1"])
    func theABSwitchesCompileWithoutSpills(setting: String) throws {
        let compiler = KernelCompiler(backend: TestEnvironment.nvrtc!, cache: nil)
        let target = try GPUArchitecture(parsing: "sm_90a")
        let parts = setting.split(separator: "=").map(String.init)
        let configs = [
            MoEConfig(hiddenSize: 256, intermediateSize: 192, experts: 16, topK: 4, ffn: .gated, activation: .silu,
                      sharedExpert: SharedExpertConfig(intermediateSize: 64), precision: .bf16),
            MoEConfig(hiddenSize: 128, intermediateSize: 96, experts: 8, topK: 2, bias: true, activation: .gelu,
                      precision: .fp16),
            // Two GEMM1 column tiles and no shared expert: a kernel FMOE_CHAIN1=0 runs with chains.
            MoEConfig(hiddenSize: 512, intermediateSize: 128, experts: 16, topK: 4, ffn: .gated, activation: .silu,
                      precision: .bf16),
        ]
        var changedAny = false
        for config in configs {
            for ranks in [1, 4] {
                let plain = try FusedSpecialization(config: config, arch: target, ranks: ranks).kernelSpec
                var spec = plain
                spec.defines[parts[0]] = parts[1]
                let k = try compiler.compile(spec, arch: target, sources: .embedded)
                if ranks == 1 && config.precision == .bf16 {
                    let base = try compiler.compile(plain, arch: target, sources: .embedded)
                    changedAny = changedAny || k.cubin != base.cubin  // (a Bool: a failure prints no cubins)
                }
                for name in [FusedSpecialization.kernelName, FusedSpecialization.ranksKernelName] {
                    let usage = try #require(k.resources.first { $0.name == name })
                    #expect(usage.spillStoreBytes == 0 && usage.spillLoadBytes == 0, "\(name) spills with \(setting)")
                }
            }
        }
        #expect(changedAny, "\(setting) compiled the default kernel of every bf16 configuration")
    }

    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason),
          arguments: ["sm_80", "sm_90a"], [1, 4])
    func everyVariantCompilesWithoutSpills(arch: String, ranks: Int) throws {
        let compiler = KernelCompiler(backend: TestEnvironment.nvrtc!, cache: nil)
        let configs = [
            MoEConfig(hiddenSize: 64, intermediateSize: 96, experts: 8, topK: 2, bias: true, activation: .gelu,
                      precision: .fp32),
            MoEConfig(hiddenSize: 128, intermediateSize: 40, experts: 16, topK: 4, ffn: .gated, activation: .silu,
                      router: .deepSeek(groups: 4, groupsKept: 2, scalingFactor: 2.5),
                      sharedExpert: SharedExpertConfig(intermediateSize: 56, gated: true), precision: .bf16),
            // Issue 12, defect 7: fp32 tiles at E = 256 (route_tile's chunk must divide the token tile).
            MoEConfig(hiddenSize: 616, intermediateSize: 120, experts: 256, topK: 2, activation: .gelu,
                      router: .deepSeek(groups: 2, groupsKept: 2, scalingFactor: 1), precision: .fp32),
            MoEConfig(hiddenSize: 256, intermediateSize: 128, experts: 320, topK: 3, precision: .tf32),
            // The largest k with a shared expert: the combine holds FMOE_COMBINE_COLS × (k + 1) float4 a lane.
            MoEConfig(hiddenSize: 512, intermediateSize: 64, experts: 16, topK: 16, ffn: .gated, activation: .silu,
                      sharedExpert: SharedExpertConfig(intermediateSize: 64, gated: true), precision: .bf16),
        ]
        let target = try GPUArchitecture(parsing: arch)
        var specs = try configs.map { try FusedSpecialization(config: $0, arch: target, ranks: ranks) }
        // The instrumented builds compile the same phase code with their hooks: the timing stamps, the per-block
        // trace and the fault injection (ranks: a source that stops sending).
        specs += [
            try FusedSpecialization(config: configs[1], arch: target, ranks: ranks, phaseTimes: true),
            try FusedSpecialization(config: configs[1], arch: target, ranks: ranks, trace: true),
            try FusedSpecialization(config: configs[1], arch: target, ranks: ranks, injectFault: ranks > 1 ? 2 : 1),
        ]
        for spec in specs {
            let k = try compiler.compile(spec.kernelSpec, arch: target, sources: .embedded)
            for name in [FusedSpecialization.kernelName, FusedSpecialization.ranksKernelName] {
                let usage = try #require(k.resources.first { $0.name == name })
                #expect(usage.spillStoreBytes == 0 && usage.spillLoadBytes == 0, "\(name) spills on \(arch)")
            }
        }
    }
}
