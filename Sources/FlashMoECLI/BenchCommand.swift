import ArgumentParser
import FlashMoE
import Logging

/// `flashmoe bench`: times the forward pass of a preset layer (random weights, random input) on one backend and
/// reports the median and minimum time, the FLOP rate and, on the GPU, the roofline floor; `--json` saves it.
struct BenchCommand: ReportingCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Time the forward pass of a preset layer: median/min ms, FLOP rate, roofline floor.",
        discussion: """
            The layer has random weights (--seed) and a random input of --tokens tokens (default: the preset's). \
            Timed runs: \(Defaults.cudaIterations) after \(Defaults.cudaWarmup) warm-ups on the GPU (CUDA events), \
            \(Defaults.cpuIterations) after \(Defaults.cpuWarmup) on the CPU (wall clock). The floor is \
            max(FLOPs / matmul rate, bytes / copy bandwidth) with the \(Roofline.referenceDevice)'s measured rates \
            (docs/performance.md): bf16/fp16 773, tf32 415, fp32 50 TFLOP/s, 4.2 TB/s; the bytes are the weights of the \
            experts the input touches, the router, the shared expert, the input and the FP32 output. \
            It is reported for the GPU only.

            --json FILE writes a list of one object with the keys backend, preset, tokens, precision, median_ms, \
            min_ms, tflops, gflops, floor_ms, workspace_bytes, date, device, method, config, samples_ms (every timed \
            run in run order) \
            (Benchmarks/compare.py reads it).
            """)

    /// Default run counts per backend.
    enum Defaults {
        static let cudaWarmup = 5
        static let cudaIterations = 20
        static let cpuWarmup = 1
        static let cpuIterations = 5
    }

    @Option(help: "The preset layer shape.")
    var preset = "paper-e32"

    @OptionGroup(title: "Preset overrides")
    var shape: ShapeOverrides

    @Option(help: "Tokens S per forward pass (default: the preset's).")
    var tokens: Int?

    @Option(
        help:
            "Untimed forward passes first (default: \(Defaults.cudaWarmup) on CUDA, \(Defaults.cpuWarmup) on the CPU).")
    var warmup: Int?

    @Option(
        help:
            "Timed forward passes (default: \(Defaults.cudaIterations) on CUDA, \(Defaults.cpuIterations) on the CPU).")
    var iterations: Int?

    @OptionGroup
    var common: CommonOptions

    @Option(help: "Write the result as JSON (a list of one object) to this file.")
    var json: String?

    @Option(help: "Also run the layer as R expert-parallel ranks on the GPU (tokens split evenly) and compare.")
    var ranks: Int?

    @Option(help: ArgumentHelp(
        "With --ranks: the GPU of each kernel launch, comma-separated (default: one launch on --device). A GPU may "
            + "repeat: 0,0 runs two launches side by side on GPU 0.", valueName: "ordinals"))
    var rankDevices: String?

    @Flag(help: "With --ranks: also time each rank's phases in one launch (a timing build of the kernel).")
    var phaseTimes = false

    @Flag(help: "With --ranks (bf16/fp16): expert outputs travel back in the storage type instead of FP32.")
    var storageReturns = false

    @Option(help: ArgumentHelp(
        "Also run one launch of a tracing build of the kernel and write each block's timeline (phases, gate, GEMM0, "
            + "GEMM1 and combine tasks) to this file as Chrome-trace JSON (open it in ui.perfetto.dev).",
        valueName: "file.json"))
    var trace: String?

    @Option(help: "With --trace: events each block can record (more are counted as dropped).")
    var traceEvents = 4096

    /// Runs the benchmark on `context`, passing each report line to `emit`; returns the record `--json` writes.
    @discardableResult
    func execute(context: MachineContext, emit: (String) -> Void) throws -> BenchmarkRecord {
        let progress = common.progress
        let source = try LayerSource.preset(named: preset, overrides: shape, options: common)
        let config = source.config
        let tokens = try tokenCount(source)
        if let warmup, warmup < 0 { throw CLIError(.invalidValue, "--warmup must be 0 or more (got \(warmup))") }
        if let iterations, iterations < 1 {
            throw CLIError(.invalidValue, "--iterations must be 1 or more (got \(iterations))")
        }
        let (engine, plan) = try common.prepare(source, tokens: tokens, context: context, progress: progress)
        let onGPU = plan.kind == .cuda
        if trace != nil {
            guard onGPU else { throw CLIError(.invalidValue, "--trace needs the CUDA backend (a tracing build of the kernel)") }
            guard traceEvents >= 1 else { throw CLIError(.invalidValue, "--trace-events must be 1 or more (got \(traceEvents))") }
        }
        let x = randomInput(tokens: tokens, hidden: config.hiddenSize, seed: common.seed)
        let warm = warmup ?? (onGPU ? Defaults.cudaWarmup : Defaults.cpuWarmup)
        let runs = iterations ?? (onGPU ? Defaults.cudaIterations : Defaults.cpuIterations)

        emit("backend: \(engine.name) (\(plan.reason))")
        emit("layer: \(source.origin): \(LayerReport.describe(config))")
        // The floor needs the experts this input touches: one forward pass tells (it also warms up).
        let touched =
            try onGPU
            ? progress.step("routing the input") { try engine.forward(x).routing.expertRows.filter { $0 > 0 }.count }
            : nil
        let result = try progress.step("timing \(warm) warm-up and \(runs) timed forward passes") {
            try engine.benchmark(input: x, warmup: warm, iterations: runs)
        }
        let device = plan.deviceName ?? cpuDescription(context)
        let record = BenchmarkRecord(
            backend: engine.name, preset: source.presetLabel, tokens: tokens, precision: config.precision.rawValue,
            medianMilliseconds: result.medianMilliseconds, minimumMilliseconds: result.minimumMilliseconds,
            flops: config.flops(tokens: tokens),
            floorMilliseconds: touched.map {
                Roofline.floorMilliseconds(config: config, tokens: tokens, expertsTouched: $0)
            },
            workspaceBytes: result.workspaceBytes, date: HostMachine.utcTimestamp(), device: device,
            method: result.method, config: LayerReport.describe(config), samplesMilliseconds: result.samples)
        emit("device: \(device)")
        if let fused = engine as? FusedMoE {
            let launched = fused.core.specialization(forTokens: tokens)
            emit("kernel: \(launched.arch), \(launched.sharedMemory)" + Self.engineNote(fused.core, tokens: tokens))
        }
        emit(
            "runs: \(warm) warm-up, \(runs) timed (\(result.method)), \(tokens) tokens, "
                + "\(formatNumber(record.flops / 1e9)) GFLOP per forward pass")
        let (median, minimum) = (record.medianMilliseconds, record.minimumMilliseconds)
        emit("median \(formatDecimal(median, 3)) ms, min \(formatDecimal(minimum, 3)) ms, \(rateText(record))")
        emit(Self.spreadText(result.samples))
        if let floor = record.floorMilliseconds, let touched {
            emit(
                "floor: \(formatDecimal(floor, 3)) ms (\(Roofline.referenceDevice) rates, \(touched) of "
                    + "\(config.experts) experts touched); median / floor = \(formatDecimal(median / floor, 2))")
        }
        if let bytes = record.workspaceBytes { emit("workspace: \(formatByteCount(bytes))") }
        if let gpu = engine as? FusedMoE { emit("weights on the GPU: \(formatByteCount(gpu.weightBytes))") }
        var records = [record]
        if let ranks, ranks > 1 {
            guard onGPU else { throw CLIError(.invalidValue, "--ranks needs the CUDA backend") }
            records.append(
                try benchRanks(ranks, layer: engine.layer, input: x, single: record, warmup: warm, runs: runs, emit: emit))
        }
        if let trace {
            try BenchTrace.run(
                layer: engine.layer, input: x, deviceOrdinal: common.device, eventsPerBlock: traceEvents, path: trace,
                emit: emit)
        }
        if let json {
            try HostMachine.writeTextFile(BenchmarkRecord.json(records), to: json)
            emit("wrote \(json)")
        }
        return record
    }

    /// How the timed runs spread: the 10th and 90th percentiles (nearest rank) and the medians of the first and the
    /// second half in run order, where a drift (a clock that falls as the GPU heats) shows.
    static func spreadText(_ samples: [Double]) -> String {
        guard samples.count >= 2 else { return "spread: \(samples.count) run" }
        let sorted = samples.sorted()
        func percentile(_ q: Double) -> Double {
            sorted[max(0, min(sorted.count - 1, Int((q * Double(sorted.count)).rounded(.up)) - 1))]
        }
        let half = samples.count / 2
        let (early, late) = (median(Array(samples[..<half])), median(Array(samples[half...])))
        return "spread: p10 \(formatDecimal(percentile(0.1), 3)) ms, p90 \(formatDecimal(percentile(0.9), 3)) ms; "
            + "median of the first \(half) runs \(formatDecimal(early, 3)) ms, of the last \(samples.count - half) "
            + "\(formatDecimal(late, 3)) ms"
    }

    /// What the "kernel:" line adds about the operator's two kernels (fp8 on sm_90a, `FusedPrefillEngine`): which
    /// one this token count runs, or why there is only one.
    static func engineNote(_ op: FusedOperator, tokens: Int) -> String {
        if let from = op.prefillTokens {
            let rows = op.prefillSpecialization.map { "\($0.tmaFP8TileRows)-row tiles" } ?? "tiles"
            let narrowed = op.prefillNarrowedReason.map { "; not the 256 rows asked for: \($0)" } ?? ""
            return tokens >= from
                ? " (the prefill kernel, \(rows): launches of \(from) tokens or more\(narrowed))"
                : " (the decode kernel; launches of \(from) tokens or more run the TMA engine's, \(rows)\(narrowed))"
        }
        return op.prefillSkipReason.map { " (one kernel: \($0))" } ?? ""
    }

    /// The same tokens split evenly over `ranks` ranks (one launch per entry of `--rank-devices`): time against the
    /// single-rank operator (on one GPU, the protocol's overhead) and the bytes each rank moved. Returns the record
    /// `--json` adds after the single-rank one (`ranks`, `rank_devices` set; no floor).
    private func benchRanks(
        _ ranks: Int, layer: MoELayer, input x: HostTensor, single: BenchmarkRecord, warmup: Int, runs: Int,
        emit: (String) -> Void
    ) throws -> BenchmarkRecord {
        let devices = try rankDevices.map(RankDevices.parse) ?? [common.device]
        var options = cudaOptions(deviceOrdinal: common.device)
        options.storageReturns = storageReturns
        let dist = try DistributedMoE(layer: layer, ranks: ranks, devices: devices, options: options)
        let s = x.shape[0]
        var parts: [HostTensor] = []
        for r in 0..<ranks {
            let lo = r * s / ranks, hi = (r + 1) * s / ranks
            parts.append(try x.slice(lo..<hi))
        }
        let traffic = dist.traffic(of: try dist.forward(parts))
        let result = try dist.benchmark(inputs: parts, warmup: warmup, iterations: runs)
        let (m, m1) = (result.medianMilliseconds, single.medianMilliseconds)
        var record = single
        record.medianMilliseconds = m
        record.minimumMilliseconds = result.minimumMilliseconds
        record.samplesMilliseconds = result.samples
        record.floorMilliseconds = nil
        record.workspaceBytes = result.workspaceBytes
        record.method = result.method
        record.date = HostMachine.utcTimestamp()
        record.ranks = ranks
        record.rankDevices = devices
        let placement = devices.count == 1 ? "in one launch on GPU \(devices[0])" : "in \(devices.count) launches on GPUs \(devices)"
        emit("ranks: \(ranks) \(placement) (\(dist.blocksPerRank) blocks each): median \(formatDecimal(m, 3)) ms vs one rank "
            + "\(formatDecimal(m1, 3)) ms " + (Set(devices).count == 1
                ? "(\(formatDecimal((m / m1 - 1) * 100, 1)) % protocol overhead)"
                : "on GPU \(common.device) alone (\(formatDecimal(m1 / m, 2))× faster on \(Set(devices).count) GPUs)"))
        let h = layer.config.hiddenSize, half = layer.config.precision.storage.byteSize
        emit("bytes per rank" + (storageReturns ? " (storage returns: expert outputs sent back as \(layer.config.precision.storage))" : "")
            + "; return bytes with FP32 / storage-type returns alongside")
        for t in traffic {
            emit("  rank \(t.rank): \(t.remoteRows) remote rows, dispatch \(t.dispatchBytes) B + return \(t.returnBytes) B "
                + "+ signals \(t.signalBytes) B = \(formatByteCount(t.totalBytes)) (return: FP32 \(t.remoteRows * h * 4) B, "
                + (half == 2 ? "storage \(t.remoteRows * h * half) B)" : "storage returns need bf16/fp16)"))
        }
        if phaseTimes {
            var options = cudaOptions(deviceOrdinal: common.device)
            options.recordPhaseTimes = true
            let timed = try DistributedMoE(layer: layer, ranks: ranks, devices: devices, options: options)
            let r = try timed.benchmark(inputs: parts, warmup: warmup, iterations: 5)
            emit("phase times of the last of \(warmup + 5) launches of the timing build (median "
                + "\(formatDecimal(r.medianMilliseconds, 3)) ms), µs since the first rank started: start, gate done, "
                + "counts sent, all counts in, block 0 dispatched, first GEMM0, end")
            for t in try timed.phaseTimes() {
                let cols = [t.start, t.gateDone, t.countsSent, t.countsIn, t.dispatchDone, t.firstExpertTask, t.end]
                emit("  rank \(t.rank): " + cols.map { formatDecimal($0, 1) }.joined(separator: "  "))
            }
        }
        return record
    }

    private func tokenCount(_ source: LayerSource) throws(CLIError) -> Int {
        guard let tokens else { return source.defaultTokens ?? 0 }
        guard tokens >= 1 else {
            throw CLIError(.invalidValue, "--tokens must be 1 or more for a benchmark (got \(tokens))")
        }
        return tokens
    }

    private func cpuDescription(_ context: MachineContext) -> String {
        "\(context.cpuModel() ?? "unknown CPU"), \(cpuWorkerCount) threads"
    }

    private func rateText(_ r: BenchmarkRecord) -> String {
        guard let g = r.gflops else { return "rate unknown (zero time)" }
        return g >= 1000 ? "\(formatDecimal(g / 1000, 2)) TFLOP/s" : "\(formatDecimal(g, 1)) GFLOP/s"
    }
}
