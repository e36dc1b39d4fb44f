import CCUDA
import Testing

@testable import FlashMoE

/// The GPU's weight quantizer for precision fp8 (kernels/quantize.cu, `FP8DeviceQuantizer`) without a GPU: it
/// compiles without spills where fp8 runs, is part of an fp8 layer's catalog, and launches with the arguments the
/// kernel reads; bad arguments are refused before any launch. Its codes against the host's are checked on a GPU by
/// `flashmoe verify` (`Verifier.fp8QuantizerChecks`: every BF16 value, per-block binade windows, fp8 layers from
/// device pointers, byte for byte).
@Suite struct FP8DeviceQuantizerTests {
    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason), arguments: ["sm_89", "sm_90a"])
    func compilesWithoutSpills(arch: String) throws {
        let compiler = KernelCompiler(backend: TestEnvironment.nvrtc!, cache: nil)
        let k = try compiler.compile(KernelCatalog.fp8Quantizer, arch: try GPUArchitecture(parsing: arch), sources: .embedded)
        let usage = try #require(k.resources.first { $0.name == "fmoe_quantize_e4m3_blocks" })
        #expect(usage.spillStoreBytes == 0 && usage.spillLoadBytes == 0, "\(arch): \(usage)")
    }

    /// The kernel's parameters: source, matrix stride, rows, cols, matrices, codes, scales.
    static let parameterSizes = [8, 8, 4, 4, 4, 8, 8]

    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason))
    func launchesOneBlockPer128x128BlockUpToSixteenPerSM() throws {
        let driver = FakeDriver(kernels: ["fmoe_quantize_e4m3_blocks"], parameterSizes: Self.parameterSizes)
        let device = try CUDADevice(ordinal: 0, driver: driver)
        let q = try FP8DeviceQuantizer(device: device)
        // 3 matrices of 200 × 260: 2 × 3 blocks each, 18 in all (under 16 per SM on the fake's 4 SMs).
        try q.quantize(source: 0x1000, matrixStride: 2 * 200 * 260, matrices: 3, rows: 200, cols: 260, codes: 0x2000,
                       scales: 0x3000)
        // 128 matrices of 768 × 2048: 12,288 blocks, capped at 64.
        try q.quantize(source: 0x1000, matrixStride: 768 * 2048, matrices: 128, rows: 768, cols: 2048, codes: 0x2000,
                       scales: 0x3000)
        let launches = driver.launches
        try #require(launches.count == 2)
        #expect(launches[0].grid == (18, 1, 1) && launches[0].block == (256, 1, 1) && launches[1].grid == (64, 1, 1))
        func int(_ bytes: [UInt8]) -> Int {
            bytes.reversed().reduce(0) { $0 << 8 | Int($1) }
        }
        let p = launches[0].parameters.map(int)
        #expect(p == [0x1000, 2 * 200 * 260, 200, 260, 3, 0x2000, 0x3000])
    }

    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason))
    func refusesOverlappingMatricesAndOddAddressesWithoutLaunching() throws {
        let driver = FakeDriver(kernels: ["fmoe_quantize_e4m3_blocks"], parameterSizes: Self.parameterSizes)
        let q = try FP8DeviceQuantizer(device: try CUDADevice(ordinal: 0, driver: driver))
        #expect(throws: MoEError.self) {
            try q.quantize(source: 0x1001, matrixStride: 64, matrices: 1, rows: 8, cols: 8, codes: 0, scales: 0)
        }
        #expect(throws: MoEError.self) {
            try q.quantize(source: 0x1000, matrixStride: 63, matrices: 2, rows: 8, cols: 8, codes: 0, scales: 0)
        }
        try q.quantize(source: 0x1000, matrixStride: 64, matrices: 0, rows: 8, cols: 8, codes: 0, scales: 0)
        #expect(driver.launches.isEmpty)
    }
}
