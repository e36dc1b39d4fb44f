import FlashMoE

/// Builds the CUDA backend for `layer` on GPU `deviceOrdinal`: the one place the commands construct it.
///
/// It is the fused operator (`FusedMoE`): compiling or loading the specialised kernel, uploading the weights.
/// Any failure (no driver, no NVRTC, an unsupported shape, out of memory) is thrown as is; `--backend auto` then
/// falls back to the CPU with the error as its reason. `FLASHMOE_WAIT_BUDGET_MS` overrides the kernel's wait budget
/// (for runs under compute-sanitizer, whose instrumentation slows kernels 10–100×).
func makeCUDABackend(layer: MoELayer, deviceOrdinal: Int) throws -> any BenchmarkableBackend {
    try FusedMoE(layer: layer, options: cudaOptions(deviceOrdinal: deviceOrdinal))
}

/// The GPU operators' options for the commands: GPU `deviceOrdinal`, `FLASHMOE_WAIT_BUDGET_MS` when set, and
/// `FLASHMOE_GATE_SPLIT` (1 ... 16, for experiments: the gate's K split instead of the automatic choice, e.g. to
/// compare the bits of two builds that choose differently) and `FLASHMOE_STAGES` (the pipeline stages instead of
/// the automatic choice, for A/B timing; a count that does not fit is a typed error at setup) and
/// `FLASHMOE_STORAGE_ROWS=1` (16-bit layers keep the routed experts' output rows in the storage type:
/// `FusedOptions.storageReturns`, for A/B timing and error measurements; a 32-bit layer refuses it at setup).
func cudaOptions(deviceOrdinal: Int) -> FusedOptions {
    var options = FusedOptions(deviceOrdinal: deviceOrdinal)
    let environment = ProcessEnvironment.current()
    if let text = environment["FLASHMOE_WAIT_BUDGET_MS"], let ms = Int(text), ms > 0 {
        options.waitBudget = .milliseconds(ms)
    }
    if let text = environment["FLASHMOE_GATE_SPLIT"], let split = Int(text), (1...16).contains(split) {
        options.gateSplit = split
    }
    if let text = environment["FLASHMOE_STAGES"], let stages = Int(text) {
        options.stages = stages
    }
    if environment["FLASHMOE_STORAGE_ROWS"] == "1" {
        options.storageReturns = true
    }
    return options
}
