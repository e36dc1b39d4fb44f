/// Quantizes BF16 matrices in device memory to precision fp8's E4M3 codes and 128×128 block scales on the GPU
/// (`Sources/CKernels/kernels/quantize.cu`), meant to write what `FP8Blocks(quantizing:)` writes on the host, byte
/// for byte: an fp8 layer built from BF16 CUDA tensors (`FusedDeviceWeights.fp8Experts`) quantizes its experts here
/// instead of reading them to the host, unless `FLASHMOE_FP8_QUANTIZER=host` asks for the host's (docs/fp8.md,
/// "Backends": the C ABI and Python paragraph). `flashmoe verify` compares it with the host's
/// (`Verifier.fp8QuantizerChecks`).
struct FP8DeviceQuantizer {
    /// The GPU the matrices are on.
    let device: CUDADevice
    /// `fmoe_quantize_e4m3_blocks` (its module stays loaded with it).
    let function: CUDAFunction

    /// Threads per block of the kernel (its `Q_THREADS`): 8 warps over a 128 × 128 block.
    static let threadsPerBlock = 256

    /// Compiles (or finds in the cubin cache) `quantize.cu` for `device`'s architecture and loads it. The kernel
    /// converts to E4M3, so the GPU must be sm_89 or later.
    init(device: CUDADevice, environment: [String: String] = ProcessEnvironment.current()) throws {
        let arch = device.properties.architecture
        guard arch.number >= 89 else {
            throw MoEError(
                .unsupported,
                "quantizing weights to fp8 on the GPU needs E4M3 conversions (sm_89 or later); \(device.properties.name) is \(arch)")
        }
        let compiler = KernelCompiler(backend: try NVRTC.shared.get(), environment: environment)
        let kernel = try compiler.compile(
            KernelCatalog.fp8Quantizer, arch: arch, sources: KernelSources.current(environment: environment))
        let module = try CUDAModule(device: device, cubin: kernel.cubin)
        self.device = device
        self.function = try module.function(named: KernelCatalog.fp8Quantizer.kernels[0])
    }

    /// Quantizes `matrices` BF16 matrices [rows, cols] (row-major; matrix m starts `matrixStride` elements after
    /// matrix m − 1, at device address `source`) into dense `codes` [matrices, rows, cols] (one byte each) and
    /// `scales` [matrices, ⌈rows/128⌉, ⌈cols/128⌉] (FP32), on the legacy default stream: ordered after earlier
    /// copies and before later ones, not waited for. `gridLimit`: the most blocks launched (default 16 per SM);
    /// each takes every `gridLimit`-th 128 × 128 block.
    func quantize(
        source: UInt64, matrixStride: Int, matrices: Int, rows: Int, cols: Int, codes: UInt64, scales: UInt64,
        gridLimit: Int? = nil
    ) throws {
        guard matrices > 0, rows > 0, cols > 0 else { return }
        guard source % 2 == 0, matrixStride >= rows * cols,
              let rows32 = Int32(exactly: rows), let cols32 = Int32(exactly: cols),
              let matrices32 = Int32(exactly: matrices)
        else {
            throw MoEError(
                .invalidInput,
                "cannot quantize \(matrices) BF16 matrices [\(rows), \(cols)] at 0x\(String(source, radix: 16)), "
                    + "\(matrixStride) elements apart: the address must be 2-byte aligned and the matrices must not overlap")
        }
        let b = FP8Scaling.blockSize
        let blocks = matrices * ((rows + b - 1) / b) * ((cols + b - 1) / b)
        // Enough blocks to fill every SM several times over; each loops over the rest.
        let grid = max(1, min(blocks, gridLimit ?? device.properties.multiprocessorCount * 16))
        try function.launch(
            grid: Dim3(grid), block: Dim3(Self.threadsPerBlock),
            arguments: [
                .pointer(source), .int64(Int64(matrixStride)), .int32(rows32), .int32(cols32), .int32(matrices32),
                .pointer(codes), .pointer(scales),
            ])
    }
}
