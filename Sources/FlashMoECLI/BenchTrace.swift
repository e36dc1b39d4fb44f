import FlashMoE

/// `flashmoe bench --trace FILE`: one launch of a tracing build of the fused kernel (`FMOE_TRACE`), its per-block
/// timeline written as Chrome-trace JSON (open it in ui.perfetto.dev) and summarised per event kind.
enum BenchTrace {
    /// Launches before the traced one, so the traced launch finds warm caches like a timed one.
    static let warmup = 3

    static func run(
        layer: MoELayer, input x: HostTensor, deviceOrdinal: Int, eventsPerBlock: Int, path: String,
        emit: (String) -> Void
    ) throws {
        var options = cudaOptions(deviceOrdinal: deviceOrdinal)
        options.traceEventsPerBlock = eventsPerBlock
        let traced = try FusedMoE(layer: layer, options: options)
        for _ in 0..<warmup { _ = try traced.forward(x) }
        try traced.clearTrace()
        let result = try traced.benchmark(input: x, warmup: 0, iterations: 1)
        let trace = try traced.recordedTrace()
        let launched = traced.core.specialization(forTokens: x.shape[0])
        let metadata = [
            ("layer", LayerReport.describe(layer.config)), ("tokens", "\(x.shape[0])"),
            ("device", traced.device.properties.name),
            ("launch_ms", formatDecimal(result.medianMilliseconds, 3)),
            ("stages", "\(launched.stages)"), ("engine", launched.tmaEngine ? "tma" : "cp.async"),
        ]
        try HostMachine.writeTextFile(trace.chromeJSON(metadata: metadata), to: path)
        emit("trace: launch \(warmup + 1) of a tracing build, \(formatDecimal(result.medianMilliseconds, 3)) ms "
            + "(stamps included; the timed runs above have none)"
            + BenchCommand.engineNote(traced.core, tokens: x.shape[0]))
        trace.summary().forEach(emit)
        if trace.droppedEvents > 0 {
            emit("  warning: \(trace.droppedEvents) events did not fit: raise --trace-events (now \(eventsPerBlock))")
        }
        emit("wrote \(path) (open it in ui.perfetto.dev)")
    }
}
