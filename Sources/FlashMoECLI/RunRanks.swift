import ArgumentParser
import FlashMoE

#if canImport(Glibc)
import Glibc
#endif

/// `flashmoe run`'s options for one rank of an expert-parallel layer whose ranks run in separate processes.
struct RankProcessOptions: ParsableArguments {
    @Option(help: """
        Ranks in separate processes (one per GPU, or several sharing one GPU): this process runs one rank of an \
        expert-parallel layer. Needs --rank and --rendezvous; every rank gets the same layer and token options.
        """)
    var worldSize: Int?

    @Option(help: "This process's rank (0 ..< --world-size).")
    var rank: Int?

    @Option(help: "Where the ranks meet: tcp://HOST:PORT (rank 0 serves a small store there) or dir:/PATH (an empty directory every rank can reach).")
    var rendezvous: String?

    @Option(help: "Seconds a rendezvous step waits for the slowest rank before naming the missing ones.")
    var rendezvousTimeout: Double = 120

    @Option(help: "Forward calls back to back (ranks: every rank must give the same); each must give the first one's bits.")
    var calls = 1

    @Option(help: "Ranks: how peers' buffers are reached: ipc (CUDA IPC, one node) or nvshmem (NVSHMEM's symmetric heap; needs nvJitLink and the nvidia-nvshmem-cu13 wheel, see docs/multinode.md).")
    var transport: RankTransport = .ipc

    @Flag(help: "Ranks: compare this rank's part with the single-rank operator on the same global tokens, bit for bit.")
    var verify = false

    @Option(help: ArgumentHelp(
        "Ranks, for tests: restart the epoch after this many calls (every rank clears its flags between two barriers).",
        visibility: .hidden))
    var epochWrap: UInt64?

    /// Whether any option of the ranks mode was given.
    var isActive: Bool { worldSize != nil || rank != nil || rendezvous != nil }
}

/// The global tokens split over the ranks: rank r gets a share proportional to r + 1 (uneven on purpose; rank 0
/// may get none), the last rank the remainder.
func rankTokenSplit(tokens: Int, ranks: Int) -> [Int] {
    let weight = ranks * (ranks + 1) / 2
    var split = (0..<ranks).map { tokens * ($0 + 1) / weight }
    split[ranks - 1] += tokens - split.reduce(0, +)
    return split
}

extension RunCommand {
    /// One rank of a `--world-size` group: joins the others, runs `--calls` forwards on its share of the global
    /// tokens, reports its part and, with `--verify`, compares it with the single-rank operator.
    func executeRanks(context: MachineContext, emit rawEmit: (String) -> Void) throws -> MoEOutput {
        try withoutActuallyEscaping(rawEmit) { raw in
            // The GPU script follows the ranks' logs while they run: flush every line.
            try runRank {
                raw($0)
                fflush(nil)  // every open output stream
            }
        }
    }

    private func runRank(emit: (String) -> Void) throws -> MoEOutput {
        let opts = ranks
        guard let world = opts.worldSize, let me = opts.rank, let where_ = opts.rendezvous else {
            throw CLIError(
                .missingOption, "--world-size, --rank and --rendezvous go together: give all three to run one rank")
        }
        guard common.backend == .auto || common.backend == .cuda else {
            throw CLIError(.conflictingOptions, "ranks in separate processes run on the GPU: drop --backend \(common.backend)")
        }
        guard opts.calls >= 1 else { throw CLIError(.invalidValue, "--calls must be at least 1 (got \(opts.calls))") }
        guard opts.rendezvousTimeout > 0 else {
            throw CLIError(.invalidValue, "--rendezvous-timeout must be positive (got \(opts.rendezvousTimeout))")
        }
        guard world >= 1 else { throw CLIError(.invalidValue, "--world-size must be at least 1 (got \(world))") }
        let address = try RendezvousAddress(parsing: where_)
        let progress = common.progress
        let source = try layerSource()
        let config = source.config
        let given = try readInput(hidden: config.hiddenSize)
        let total = try given?.shape[0] ?? randomTokenCount(source)
        let layer = try source.build(progress: progress)
        let x = given ?? randomInput(tokens: total, hidden: config.hiddenSize, seed: common.seed)
        let split = rankTokenSplit(tokens: total, ranks: max(world, 1))
        guard (0..<world).contains(me) else {
            // Join anyway: it tells the other ranks why this one is not coming.
            _ = try address.join(rank: me, worldSize: world, timeout: .seconds(opts.rendezvousTimeout))
            throw CLIError(.invalidValue, "--rank \(me) is outside 0 ..< \(world)")
        }
        let start = split[..<me].reduce(0, +)
        let mine = try x.slice(start..<start + split[me])

        emit("rank \(me) of \(world) (pid \(getpid()), GPU \(common.device)), rendezvous \(address)")
        emit("layer: \(source.origin): \(LayerReport.describe(config))")
        let rendezvous = try progress.step("joining \(world) ranks at \(address)") {
            try address.join(rank: me, worldSize: world, timeout: .seconds(opts.rendezvousTimeout))
        }
        var options = cudaOptions(deviceOrdinal: common.device)
        options.poisonOutput = opts.verify
        if let wrap = opts.epochWrap {
            guard wrap >= 1 else { throw CLIError(.invalidValue, "--epoch-wrap must be at least 1") }
            options.epochWrap = wrap
        }
        let op: RankProcessMoE
        do {
            op = try progress.step("creating rank \(me)") {
                try RankProcessMoE.create(
                    rendezvous: rendezvous, layer: layer, maxTokens: max(split.max() ?? 1, 1), options: options,
                    transport: opts.transport)
            }
        } catch {
            rendezvous.close()
            throw error
        }
        defer { try? op.close() }
        let experts = op.placement.experts(of: me)
        emit("tokens: [\(start), \(start + split[me])) of \(total) global tokens (split \(split)); experts "
            + "[\(experts.lowerBound), \(experts.upperBound)) of \(config.experts); \(op.blocksPerRank) blocks; "
            + "transport \(op.transport)")
        emit("ready: \(world) ranks joined")
        let clock = ContinuousClock()
        var times: [Double] = []
        var first: MoEOutput?
        var identical = true
        for _ in 0..<opts.calls {
            let t0 = clock.now
            let out = try op.forward(mine, tokensPerRank: split)
            times.append((clock.now - t0).milliseconds)
            if let first { identical = identical && RankProcessMoE.sameBits(out, first) } else { first = out }
        }
        let result = first!
        emit("output: y [\(split[me]), \(config.hiddenSize)] F32 (this rank's tokens)")
        emit(LoadSummary(result.routing).text)
        let sorted = times.sorted()
        emit("time: \(formatDecimal(sorted[sorted.count / 2], 2)) ms per call (median of \(opts.calls), wall clock)")
        emit(OutputNorms(result.output.floats()).text)
        if opts.calls > 1 {
            guard identical else {
                throw CLIError(.invalidValue, "calls: a repeated call gave other bits than the first (rank \(me))")
            }
            emit("calls: \(opts.calls) back to back, every one bitwise equal to the first")
        }
        if opts.verify {
            var single = cudaOptions(deviceOrdinal: common.device)
            single.poisonOutput = true
            single.gateSplit = op.gateSplit(totalTokens: total)
            let reference = try progress.step("running the single-rank operator on all \(total) tokens") {
                try FusedMoE(layer: layer, options: single).forward(x)
            }
            let part = try RankProcessMoE.rows(of: reference, start..<start + split[me])
            if let difference = Verifier.firstBitDifference(result, part) {
                throw CLIError(
                    .invalidValue,
                    "verify: rank \(me)'s output differs from the single-rank operator's rows [\(start), "
                        + "\(start + split[me])) (gate split \(single.gateSplit ?? 0)): \(difference)")
            }
            emit("verify: bitwise equal to the single-rank operator on the same \(total) tokens (y, ids, weights, slots)")
        }
        try op.close()
        return result
    }
}
