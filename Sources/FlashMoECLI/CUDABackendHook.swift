import FlashMoE

/// Builds the CUDA backend for `layer` on GPU `deviceOrdinal`: the one place the commands construct it.
///
/// This build has no fused GPU operator, so it always throws; `--backend auto` then falls back to the CPU and
/// `--backend cuda` reports the error.
func makeCUDABackend(layer: MoELayer, deviceOrdinal: Int) throws -> any BenchmarkableBackend {
    throw CUDAError.invalidArgument(
        "the fused CUDA operator is not available in this build of flashmoe: use --backend cpu (or auto)")
}
