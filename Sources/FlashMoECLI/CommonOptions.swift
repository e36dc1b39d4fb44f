import ArgumentParser
import FlashMoE

/// A command that prints a report line by line and returns a result, so tests can run it on a fake machine.
protocol ReportingCommand: ParsableCommand {
    associatedtype Result
    /// Runs the command on `context`, passing each report line to `emit`.
    func execute(context: MachineContext, emit: (String) -> Void) throws -> Result
}

extension ReportingCommand {
    /// Runs on this machine, printing the report to standard output.
    func run() throws {
        _ = try execute(context: .live) { print($0) }
    }
}

/// The options `run` and `bench` share: backend, GPU, precision, capacity, seed and verbosity.
struct CommonOptions: ParsableArguments {
    @Option(help: "auto: CUDA when a GPU is usable and the operator starts, else the CPU.")
    var backend: BackendKind = .auto

    @Option(help: "The GPU to run on.")
    var device = 0

    @Option(help: "Storage and multiply precision (fp32 on every backend unless given).")
    var precision: Precision = .fp32

    @Option(help: "Per-expert capacity factor (default: dropless).")
    var capacityFactor: Double?

    @Option(help: "Seed of the random weights and of the random input.")
    var seed: UInt64 = 0

    @Flag(help: "Log each step and its details to standard error.")
    var verbose = false

    /// The capacity rule the options ask for.
    var capacity: Capacity { capacityFactor.map(Capacity.factor) ?? .dropless }

    /// Progress and diagnostics on standard error, at the verbosity asked for.
    var progress: Progress { Progress(logger: .commandLine(verbose: verbose)) }

    /// Decides the backend, checks that the layer fits in memory, makes or loads the layer and starts the
    /// backend (falling back to the CPU under `auto` when CUDA fails to start, after checking memory again).
    func prepare(_ source: LayerSource, tokens: Int, context: MachineContext, progress: Progress) throws
        -> (backend: any BenchmarkableBackend, plan: BackendPlan)
    {
        let config = source.config
        func checkMemory(_ plan: BackendPlan) throws(CLIError) {
            let estimate = MemoryEstimate(
                config: config, tokens: tokens, backend: plan.kind, randomWeights: source.isRandom)
            progress.logger.debug("memory estimate on \(plan.kind): \(formatByteCount(estimate.total))")
            try estimate.check(
                available: context.availableMemory(),
                subject: "\(source.origin) at \(config.precision) on the \(plan.kind) backend with \(tokens) tokens")
        }
        let planned = try BackendPlan.decide(backend, device: device, gpu: context.gpu)
        progress.logger.debug("backend plan: \(planned.kind) (\(planned.reason))")
        try checkMemory(planned)
        let plan = try planned.checkingDeviceMemory(
            config: config, tokens: tokens, device: device, context: context, progress: progress,
            beforeCPUFallback: checkMemory)
        let layer = try source.build(progress: progress)
        progress.logger.debug("layer weights: \(formatByteCount(layer.weights.byteCount))")
        return try plan.build(
            layer: layer, device: device, context: context, progress: progress, beforeCPUFallback: checkMemory)
    }
}
