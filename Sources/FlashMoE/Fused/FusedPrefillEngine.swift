/// The second kernel of an fp8 operator on sm_90a: the TMA engine's build (`FusedSpecialization.prefillVariant`),
/// launched for prefill while decode keeps the cp.async tiles' kernel.
///
/// Why two kernels: the token count is a launch argument, not a compile-time constant, and neither engine wins
/// everywhere. On the H200 the TMA build is 3 – 16 % faster from S = 256 on, but 2 – 5 % slower at S = 64 and 2 – 6
/// µs at S = 1 (Benchmarks/RESULTS.md, rounds 25 and 26). Both builds compute the same bits (the same wgmma
/// instructions in the same K order, `phase_experts_tma_fp8.cuh`), read and write the same `Params`, workspace and
/// counters, and keep the device epoch the same way, so launches of either can follow each other on one stream or
/// in one CUDA graph.
///
/// The operator keeps the second kernel only where it is sound and clean; otherwise every launch runs the first, and
/// `skipReason` says why:
/// - its compile must not spill: the TMA build's consumers run every phase within the registers the producer gives
///   up, and at some small shapes ptxas spills there (24 B at E = 256, H = 128, I = 64; RESULTS, round 25), which the
///   cp.async build does not;
/// - its launch facts must equal the first kernel's (grid, gate tiles and decode gate, router rows, gated packing):
///   the workspace, the gate split and the weights' layout are the first kernel's.
struct FusedPrefillEngine {
    /// The TMA build's constants.
    let specialization: FusedSpecialization
    /// The loaded kernel.
    let kernel: FusedKernel
    /// Launches of at least this many tokens run it.
    let minTokens: Int

    /// Whether a launch of `tokens` tokens runs this kernel.
    func runs(tokens: Int) -> Bool { tokens >= minTokens }

    /// The outcome of `make`: the engine, or why there is none (nil when the operator never asks for one).
    enum Outcome {
        case engine(FusedPrefillEngine)
        case skipped(String)
        case notApplicable
    }

    /// Loads an operator's kernels: `baseSpec`'s, and its prefill build when `options.prefillEngineTokens` asks for
    /// one and `baseSpec` has a TMA variant (within `sharedMemoryPerBlock`, nil: the architecture's). `load` compiles
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
        let minTokens = options.prefillEngineTokens
        if let minTokens, minTokens < 1 {
            throw MoEError(.invalidConfig, "prefillEngineTokens must be at least 1 (or nil for one kernel), not \(minTokens)")
        }
        guard minTokens != nil,
            let spec = try baseSpec.prefillVariant(sharedMemoryPerBlock: sharedMemoryPerBlock, stages: options.stages)
        else { return (try load([baseSpec])[0], .notApplicable) }
        let kernels = try load([baseSpec, spec])
        let usage = spec.trace ? try resources(try spec.untraced()) : kernels[1].compiled.resources
        if let reason = mismatch(
            base: kernels[0], prefill: kernels[1], prefillResources: usage, entry: FusedSpecialization.kernelName)
        {
            return (kernels[0], .skipped(reason))
        }
        return (kernels[0], .engine(FusedPrefillEngine(specialization: spec, kernel: kernels[1], minTokens: minTokens!)))
    }

    /// Why `prefill` cannot stand in for `base` at launch, or nil; `prefillResources`: ptxas' report of the build
    /// whose spills decide (the prefill kernel's own, or a tracing build's normal twin).
    static func mismatch(
        base: FusedKernel, prefill: FusedKernel, prefillResources: [KernelResourceUsage], entry: String
    ) -> String? {
        if let usage = prefillResources.first(where: { $0.name == entry }), usage.spills {
            return "the TMA engine's kernel spills at this shape (\(usage.spillStoreBytes) B stored, "
                + "\(usage.spillLoadBytes) B loaded): every launch runs the cp.async tiles"
        }
        let facts: [(String, Int, Int)] = [
            ("grid blocks", base.gridLimit, prefill.gridLimit), ("gate tiles", base.gateTiles, prefill.gateTiles),
            ("decode gate tokens", base.gateGemvTokens, prefill.gateGemvTokens),
            ("router rows", base.routerRows, prefill.routerRows), ("gated packing rows", base.packRows, prefill.packRows),
        ]
        if let (name, a, b) = facts.first(where: { $0.1 != $0.2 }) {
            return "the TMA engine's kernel has \(b) \(name), the cp.async kernel \(a): every launch runs the cp.async tiles"
        }
        return nil
    }
}
