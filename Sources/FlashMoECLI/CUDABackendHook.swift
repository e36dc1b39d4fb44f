import FlashMoE

/// Builds the CUDA backend for `layer` on GPU `deviceOrdinal`: the one place the commands construct it.
///
/// It is the fused operator (`FusedMoE`): compiling or loading the specialised kernel, uploading the weights.
/// Any failure (no driver, no NVRTC, an unsupported shape, out of memory) is thrown as is; `--backend auto` then
/// falls back to the CPU with the error as its reason.
func makeCUDABackend(layer: MoELayer, deviceOrdinal: Int) throws -> any BenchmarkableBackend {
    try FusedMoE(layer: layer, options: FusedOptions(deviceOrdinal: deviceOrdinal))
}
