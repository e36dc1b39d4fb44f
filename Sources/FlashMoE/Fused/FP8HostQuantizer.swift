import CCUDA

/// `FP8MatrixQuantizing` through host memory: each call reads its BF16 matrices from the device, quantizes them with
/// `FP8Blocks(quantizing:)` (on all cores) and writes the codes and scales back: the reference verify compares the
/// GPU's (`FP8DeviceQuantizer`, the default) with, the fake driver's tests' (it runs no kernel), and the quantizer
/// of fp8 layers from BF16 device pointers with `FLASHMOE_FP8_QUANTIZER=host`. Host memory: one call's matrices in
/// BF16 and FP32 plus their codes.
struct FP8HostQuantizer: FP8MatrixQuantizing {
    /// The GPU the matrices are on.
    let device: CUDADevice

    /// The environment variable that chooses the quantizer of fp8 layers from BF16 device pointers: `host` for
    /// this one; unset or anything else, the GPU's (`FP8DeviceQuantizer`).
    static let selector = "FLASHMOE_FP8_QUANTIZER"

    /// Whether `environment` asks for this quantizer instead of the GPU's. The GPU's is the default since
    /// `flashmoe verify`'s "fp8 quantizer" checks (its codes and scales against this one's, byte for byte) passed
    /// on an H100; it built a Qwen3-30B-A3B-shaped layer 27 times faster (Benchmarks/RESULTS.md, "Round 49").
    static func hostRequested(environment: [String: String] = ProcessEnvironment.current()) -> Bool {
        environment[selector] == "host"
    }

    func quantize(
        source: UInt64, matrixStride: Int, matrices: Int, rows: Int, cols: Int, codes: UInt64, scales: UInt64
    ) throws {
        guard matrices > 0, rows > 0, cols > 0 else { return }
        let per = rows * cols
        var values = [BFloat16](repeating: BFloat16(bitPattern: 0), count: matrices * per)
        try device.makeCurrent()
        for m in 0..<matrices {
            let result = values.withUnsafeMutableBytes {
                device.driver.memcpyDtoH($0.baseAddress! + m * per * 2, source + UInt64(m * matrixStride * 2), per * 2, nil)
            }
            try device.driver.check(result, "cuMemcpyDtoH_v2 (BF16 matrix \(m) to quantize)")
        }
        let q = FP8Blocks(quantizing: try HostTensor(shape: [matrices, rows, cols], bfloat16: values))
        let written = q.codes.withUnsafeBytes { device.driver.memcpyHtoD(codes, $0.baseAddress!, $0.count, nil) }
        try device.driver.check(written, "cuMemcpyHtoD_v2 (E4M3 codes)")
        let scaled = q.scales.withUnsafeBytes { device.driver.memcpyHtoD(scales, $0.baseAddress!, $0.count, nil) }
        try device.driver.check(scaled, "cuMemcpyHtoD_v2 (block scales)")
    }
}
