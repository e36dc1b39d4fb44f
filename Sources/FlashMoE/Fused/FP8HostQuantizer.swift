import CCUDA

/// `FP8MatrixQuantizing` through host memory: each call reads its BF16 matrices from the device, quantizes them with
/// `FP8Blocks(quantizing:)` (on all cores) and writes the codes and scales back. The default quantizer of fp8 layers
/// from BF16 device pointers until the GPU's (`FP8DeviceQuantizer`, `FLASHMOE_FP8_QUANTIZER=gpu`) has been checked
/// on a GPU, the reference verify compares that one with, and the fake driver's tests' (it runs no kernel). Host
/// memory: one call's matrices in BF16 and FP32 plus their codes.
struct FP8HostQuantizer: FP8MatrixQuantizing {
    /// The GPU the matrices are on.
    let device: CUDADevice

    /// The environment variable that chooses the quantizer of fp8 layers from BF16 device pointers: `gpu` for the
    /// GPU's (`FP8DeviceQuantizer`); unset or anything else, this one.
    static let selector = "FLASHMOE_FP8_QUANTIZER"

    /// Whether `environment` asks for the GPU's quantizer. Not yet the default: its kernel (kernels/quantize.cu)
    /// has not run on a GPU (round 48 had no device time left for `flashmoe verify`'s "fp8 quantizer" checks, which
    /// compare it with this one byte for byte); once they pass on a GPU it should be.
    static func gpuRequested(environment: [String: String] = ProcessEnvironment.current()) -> Bool {
        environment[selector] == "gpu"
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
