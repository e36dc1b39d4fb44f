/// The second kernel of an fp8 operator on sm_90a: the TMA engine's build (`FusedSpecialization.prefillVariant`),
/// launched for prefill while decode keeps the cp.async tiles' kernel.
///
/// Why two kernels: the token count is a launch argument, not a compile-time constant, and neither engine wins
/// everywhere. On the H200 the TMA build is 5 – 10 % slower at decode (qwen3-30b-a3b S = 64 and 1) and from 256
/// tokens on faster at every preset, 4 – 17 % at 128 and 256 experts and 2.6 – 12 % at 8 to 64 (mixtral-8x7b S = 256
/// alone 1.5 % slower; Benchmarks/RESULTS.md, rounds 26 and 27). So fp8 layers get the second kernel, for launches of
/// at least `FusedOptions.prefillEngineTokens` tokens. Both builds compute the same bits (the same wgmma instructions
/// in the same K order, `phase_experts_tma_fp8.cuh`), read and write the same `Params`, workspace and counters, and
/// keep the device epoch the same way, so launches of either can follow each other on one stream or in one CUDA
/// graph.
///
/// The operator keeps the second kernel only where it is sound and clean; otherwise every launch runs the first, and
/// `FusedOperator.prefillSkipReason` says why:
/// - it must build: a compile or load error of the TMA build leaves the operator with the first kernel;
/// - its compile must not spill: the TMA build's consumers run every phase within the registers the producer gives
///   up, and at some small shapes ptxas spills there (24 B at E = 256, H = 128, I = 64; RESULTS, round 25), which the
///   cp.async build does not;
/// - its launch facts must equal the first kernel's (grid, gate tiles and decode gate, router rows, gated packing):
///   the workspace, the gate split and the weights' layout are the first kernel's.
/// An fp8 TMA build of 256-row tiles (`FusedSpecialization.tmaFP8TileRows`) that fails a rule is followed by the same
/// build with 128-row tiles before the operator gives up the second kernel (`narrowedBecause` says why it runs 128
/// rows).
struct FusedPrefillEngine {
    /// The TMA build's constants.
    let specialization: FusedSpecialization
    /// The loaded kernel.
    let kernel: FusedKernel
    /// Launches of at least this many tokens run it.
    let minTokens: Int
    /// Why the operator runs 128-row fp8 tiles rather than 256 (the wider build failed, spilled or did not match),
    /// or nil when it runs the build it asked for first.
    var narrowedBecause: String? = nil

    /// Whether a launch of `tokens` tokens runs this kernel.
    func runs(tokens: Int) -> Bool { tokens >= minTokens }

    /// The outcome of `load`: the engine, why there is none, or `notApplicable` when the layer gets none.
    enum Outcome {
        case engine(FusedPrefillEngine)
        case skipped(String)
        case notApplicable
    }

    /// The prefill build an operator of `baseSpec` with `options` compiles, or nil: `baseSpec.prefillVariant` (fp8,
    /// sm_90a, one GPU, not `FLASHMOE_TMA=0`) when `options.prefillEngineTokens` is set. What the operator, the
    /// catalog and the precompile steps agree on.
    static func specialization(
        for baseSpec: FusedSpecialization, options: FusedOptions = FusedOptions(), sharedMemoryPerBlock: Int? = nil,
        refused: Bool = FusedSpecialization.tmaEngineRefused
    ) throws -> FusedSpecialization? {
        try checkTokens(options)
        guard options.prefillEngineTokens != nil else { return nil }
        return try baseSpec.prefillVariant(
            sharedMemoryPerBlock: sharedMemoryPerBlock, stages: options.stages, refused: refused)
    }

    /// Loads an operator's kernels: `baseSpec`'s, and its prefill build (`specialization(for:options:)`, within
    /// `sharedMemoryPerBlock`, nil: the architecture's). `load` compiles
    /// and loads specialisations, all in one call so that it can compile them side by side; `resources` compiles
    /// one without loading it and returns what ptxas reported.
    ///
    /// A tracing build keeps its prefill kernel exactly when the normal build would, so that a trace shows the
    /// kernel a normal operator runs: the stamps cost registers, and the traced TMA kernel spills at shapes where the
    /// normal one does not (qwen3-30b-a3b: 8 B; RESULTS, round 26), so the spill test reads the normal build's
    /// compile (`resources`, from the cache after the normal operator's).
    static func load(
        baseSpec: FusedSpecialization, options: FusedOptions, sharedMemoryPerBlock: Int?,
        load: ([FusedSpecialization]) throws -> [FusedKernel],
        resources: (FusedSpecialization) throws -> [KernelResourceUsage]
    ) throws -> (base: FusedKernel, prefill: Outcome) {
        try checkTokens(options)  // a bad option is the caller's error, not a reason to skip the kernel
        let wanted: FusedSpecialization?
        do {
            wanted = try specialization(for: baseSpec, options: options, sharedMemoryPerBlock: sharedMemoryPerBlock)
        } catch {
            // A TMA build that does not fit (e.g. stages fixed by FusedOptions.stages, with its larger static shared
            // memory) leaves the operator its first kernel, as a failed compile does.
            return (
                try load([baseSpec])[0],
                .skipped("no TMA engine's kernel for this layer (\(error)): every launch runs the cp.async tiles")
            )
        }
        guard let spec = wanted, let minTokens = options.prefillEngineTokens else {
            return (try load([baseSpec])[0], .notApplicable)
        }
        // The builds to try, widest first: 256-row fp8 tiles where asked for, then 128 rows where those fail to
        // build, spill or do not match the first kernel (the same bits: FusedSpecialization.tmaFP8TileRows).
        var rungs = [spec]
        if let narrower = try? spec.narrowerFP8Tiles(
            sharedMemoryPerBlock: sharedMemoryPerBlock, stages: options.stages)
        {
            rungs.append(narrower)
        }
        var base: FusedKernel?
        var refusals: [String] = []
        for rung in rungs {
            let label = "the TMA engine's \(rung.tmaFP8TileRows)-row kernel"
            let kernels: [FusedKernel]
            do {
                // The first kernel is compiled beside the first rung, so the two compile side by side.
                kernels = try load(base == nil ? [baseSpec, rung] : [rung])
            } catch {
                // The first kernel alone decides whether the operator can run: a prefill build that fails to compile
                // or load costs its speed, not the operator (an error of the first kernel is thrown again below).
                refusals.append("\(label) did not build (\(error))")
                continue
            }
            let first = base ?? kernels[0]
            base = first
            let prefill = kernels[kernels.endIndex - 1]  // the rung's kernel, last of what was loaded
            let usage = rung.trace ? try resources(try rung.untraced()) : prefill.compiled.resources
            if let reason = mismatch(
                base: first, prefill: prefill, prefillResources: usage, entry: FusedSpecialization.kernelName,
                label: label)
            {
                refusals.append(reason)
                continue
            }
            let engine = FusedPrefillEngine(
                specialization: rung, kernel: prefill, minTokens: minTokens,
                narrowedBecause: refusals.isEmpty ? nil : refusals.joined(separator: "; "))
            return (first, .engine(engine))
        }
        return (
            try base ?? load([baseSpec])[0],
            .skipped(refusals.joined(separator: "; ") + ": every launch runs the cp.async tiles")
        )
    }

    /// Refuses a `prefillEngineTokens` below 1.
    private static func checkTokens(_ options: FusedOptions) throws(MoEError) {
        if let minTokens = options.prefillEngineTokens, minTokens < 1 {
            throw MoEError(.invalidConfig, "prefillEngineTokens must be at least 1 (or nil for one kernel), not \(minTokens)")
        }
    }

    /// Why `prefill` cannot stand in for `base` at launch, or nil; `prefillResources`: ptxas' report of the build
    /// whose spills decide (the prefill kernel's own, or a tracing build's normal twin); `label` names the prefill
    /// build in the reason.
    static func mismatch(
        base: FusedKernel, prefill: FusedKernel, prefillResources: [KernelResourceUsage], entry: String, label: String
    ) -> String? {
        if let usage = prefillResources.first(where: { $0.name == entry }), usage.spills {
            return "\(label) spills at this shape (\(usage.spillStoreBytes) B stored, \(usage.spillLoadBytes) B loaded)"
        }
        let facts: [(String, Int, Int)] = [
            ("grid blocks", base.gridLimit, prefill.gridLimit), ("gate tiles", base.gateTiles, prefill.gateTiles),
            ("decode gate tokens", base.gateGemvTokens, prefill.gateGemvTokens),
            ("router rows", base.routerRows, prefill.routerRows), ("gated packing rows", base.packRows, prefill.packRows),
        ]
        if let (name, a, b) = facts.first(where: { $0.1 != $0.2 }) {
            return "\(label) has \(b) \(name), the cp.async kernel \(a)"
        }
        return nil
    }
}

extension FusedSpecialization {
    /// The builds an operator of this specialisation with `options` compiles: this one, then its prefill build where
    /// the layer gets one (`FusedPrefillEngine.specialization`; one that cannot be built is left out, as the operator
    /// leaves it out). What the catalog and the precompile steps compile.
    public func operatorBuilds(options: FusedOptions = FusedOptions(), sharedMemoryPerBlock: Int? = nil)
        -> [FusedSpecialization]
    {
        let prefill = try? FusedPrefillEngine.specialization(
            for: self, options: options, sharedMemoryPerBlock: sharedMemoryPerBlock)
        return [self] + (prefill.map { [$0] } ?? [])
    }
}
