import Testing
@testable import FlashMoE

/// The host half of the GPU's fp8 path: the per-expert images the kernel reads (`FusedDeviceWeights+FP8.swift`,
/// `W1_EXPERT_BYTES` / `W2_EXPERT_BYTES` in moe_params.cuh), checked element by element without a GPU, and the
/// specialisation's refusals.
@Suite struct FP8DeviceLayoutTests {
    /// Two experts of [inner = 200, k = 272] (partial row and K blocks), gate and up.
    static func blocks(seed: UInt64) throws -> FP8Blocks {
        let v = SeededRandom(seed: seed).uniformArray(count: 2 * 200 * 272, stream: 1, scale: 1)
        return try #require(try HostTensor(shape: [2, 200, 272], values: v, as: .float8E4M3).fp8Blocks)
    }

    @Test func gatedImageInterleavesGateAndUpRowsWithTheirScales() throws {
        let (gate, up) = (try Self.blocks(seed: 1), try Self.blocks(seed: 2))
        let rows = FusedDeviceWeights.fp8FirstRows(inner: 200, gated: true, packRows: 64)
        #expect(rows == 4 * 128)
        let source = FusedDeviceWeights.fp8FirstSource(gate: gate, up: up, inner: 200, packRows: 64)
        let (codeBytes, total) = FusedDeviceWeights.fp8ExpertBytes(rows: rows, k: 272)
        #expect(codeBytes == 512 * 272 && total == codeBytes + 8 * 3 * 4)
        let image = FusedDeviceWeights.fp8Image(matrix: 1, rows: rows, k: 272, source: source)
        #expect(image.count == total)
        for r in 0..<rows {
            let (block, within) = r.quotientAndRemainder(dividingBy: 128)
            let row = block * 64 + within % 64
            for c in stride(from: 0, to: 272, by: 37) {
                let expected: UInt8 =
                    row < 200 ? (within < 64 ? gate : up).codes[(200 + row) * 272 + c].bitPattern : 0
                #expect(image[r * 272 + c] == expected, "packed row \(r), column \(c)")
            }
        }
        let scales = image[codeBytes...].withUnsafeBytes { Array($0.bindMemory(to: Float.self).prefix(8 * 3)) }
        for g in 0..<8 {
            let row = (g / 2) * 64
            for j in 0..<3 {
                let expected: Float = row < 200 ? (g % 2 == 0 ? gate : up).scales[(1 * 2 + row / 128) * 3 + j] : 0
                #expect(scales[g * 3 + j] == expected, "granule \(g), K block \(j)")
            }
        }
    }

    @Test func refusalsWhileTheGPUPathIsOffAndForShapesItCannotTake() {
        let c = MoEConfig(hiddenSize: 256, intermediateSize: 200, experts: 4, topK: 2, precision: .fp8)
        if !FusedSpecialization.supportsFP8 {
            #expect(throws: MoEError.self) { try FusedSpecialization(config: c) }
        } else {
            #expect(throws: MoEError.self, "I = 200 is not a multiple of 16") { try FusedSpecialization(config: c) }
        }
    }
}
