import ArgumentParser
import FlashMoE

/// `flashmoe soak`: many forwards of a few small layers at cycling token counts in one process (see `Soak`):
/// the first call of each shape against the oracle, every later call bit-identical to it, no error, and on the GPU
/// the free device memory flat after the warm-up.
struct SoakCommand: ReportingCommand {
    static let configuration = CommandConfiguration(
        commandName: "soak",
        abstract: "Many calls with mixed shapes in one process: same bits per shape, flat device memory.",
        discussion: """
            Layers: \(Soak.standardTokenCounts.count) token counts (\(Soak.standardTokenCounts.map(String.init).joined(separator: ", "))) \
            cycle over four small layers (bf16 plain softmax, fp32 gated sigmoid groups with a shared expert, fp16 \
            plain with biases and capacity 1.0, tf32 gated with a gated shared expert) and, on the GPU, the bf16 layer \
            as --ranks expert-parallel ranks in one launch. The first call of each shape is checked against the \
            Float64 oracle; free device memory (cuMemGetInfo) is read after the warm-up and every 1,000 calls. The \
            last line is `soak: N calls, ...: passed` or `...: FAILED ...`.
            """)

    @Option(help: "Calls to make.")
    var calls = 10_000

    @Option(help: "Seed of the weights and inputs.")
    var seed: UInt64 = 1

    @Option(help: "auto: CUDA when a GPU is usable, else the CPU.")
    var backend: FuzzCommand.Backend = .auto

    @Option(help: "The GPU to run on.")
    var device = 0

    @Option(help: "On the GPU: also soak the bf16 layer as this many ranks in one launch (0: no ranks layer).")
    var ranks = 2

    @Option(help: "How far free device memory may move after the warm-up, in MiB.")
    var memoryToleranceMib = 2

    @Option(help: "Make no call after this many seconds (the summary says how many were made).")
    var maxSeconds: Double?

    @discardableResult
    func execute(context: MachineContext, emit: (String) -> Void) throws -> SoakReport {
        guard calls >= 0 else { throw CLIError(.invalidValue, "--calls must be 0 or more (got \(calls))") }
        guard ranks >= 0 else { throw CLIError(.invalidValue, "--ranks must be 0 or more (got \(ranks))") }
        let layers = try Soak.standardLayers(seed: seed)
        var useCUDA = backend == .cuda
        if backend == .auto {
            let status = context.gpu()
            useCUDA = status.unusableReason == nil && status.deviceNames.indices.contains(device)
        }
        var soakLayers: [SoakLayer] = []
        var freeMemory: (() throws -> Int)?
        let names = ["bf16 plain softmax", "fp32 gated sigmoid groups+shared", "fp16 plain bias capacity 1.0",
                     "tf32 gated gated-shared"]
        if useCUDA {
            let gpu = try CUDADevice(ordinal: device, driver: try CUDADriver.shared.get())
            emit("soak: \(calls) calls on cuda (GPU \(device): \(gpu.properties.name))")
            var options = cudaOptions(deviceOrdinal: device)
            options.poisonOutput = true  // an element a call fails to write cannot keep the last call's bits
            for (name, layer) in zip(names, layers) {
                soakLayers.append(SoakLayer(name: name, backend: try FusedMoE(layer: layer, options: options)))
            }
            if ranks > 0 {
                let dist = try DistributedMoE(layer: layers[0], ranks: ranks, options: options)
                soakLayers.append(SoakLayer(name: "bf16 plain softmax as \(ranks) ranks", ranks: dist))
            }
            freeMemory = { try gpu.memoryInfo().free }
        } else {
            emit("soak: \(calls) calls on the cpu backend (fast FP32; no device memory to watch)")
            for (name, layer) in zip(names, layers) {
                soakLayers.append(SoakLayer(name: name, backend: try CPUBackend(layer: layer, mode: .fast)))
            }
        }
        var soak = Soak(layers: soakLayers, tokenCounts: Soak.standardTokenCounts, seed: seed)
        soak.memoryTolerance = memoryToleranceMib << 20
        let logger = Progress(logger: .commandLine(verbose: false)).logger
        let report = soak.run(calls: calls, maxSeconds: maxSeconds, freeMemory: freeMemory) { n, r in
            logger.notice("soak: \(n) of \(calls) calls, \(r.mismatches) mismatches")
        }
        if report.stoppedEarly {
            emit("soak: stopped by --max-seconds after \(report.calls) of \(calls) calls")
        }
        emit(Self.summary(report, layers: soakLayers.count))
        if !report.passed { throw ExitCode.failure }
        return report
    }

    /// "soak: N calls, S shapes on L layers in T s (R calls/s), device memory flat (…), same bits per shape: passed".
    static func summary(_ r: SoakReport, layers: Int) -> String {
        let rate = formatDecimal(Double(r.calls) / max(r.seconds, 1e-9), 0)
        var memory = "device memory not watched"
        if let w = r.freeAfterWarmUp {
            memory = "free device memory \(formatByteCount(w)) after warm-up, drift \(formatByteCount(r.memoryDrift))"
        }
        let bits = r.mismatches == 0 ? "same bits per shape" : "\(r.mismatches) calls with other bits"
        return "soak: \(r.calls) calls, \(r.shapes) shapes on \(layers) layers in \(formatDecimal(r.seconds, 1)) s "
            + "(\(rate) calls/s), \(memory), \(bits): " + (r.failure.map { "FAILED: \($0)" } ?? "passed")
    }
}
