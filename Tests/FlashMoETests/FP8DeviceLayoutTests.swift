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

/// The fp8 kernel's reads of one expert image, mirrored from Sources/CKernels/kernels (moe_params.cuh's sizes,
/// `expert_tile_fp8` in phase_fp8.cuh, `fp8_load_stage` and `Fp8WgmmaEngine::promote` in wgmma_fp8.cuh), so a
/// test can check that each (tile column, K index) meets the weight and scale the oracle uses for it.
struct FP8KernelReads {
    /// The image of one expert (`FusedDeviceWeights.fp8Image`).
    let image: [UInt8]
    /// B rows of the image (moe_params.cuh: N0 for W1, H for W2) and K (H for W1, I for W2).
    let rows: Int
    let kdim: Int

    /// `round16(rows · K)`: where the scales start (W1_CODES / W2_CODES).
    var codeBytes: Int { (rows * kdim + 15) / 16 * 16 }
    /// K blocks (KB_H / KB_I) and 64-row granules (G0 / G1).
    var kBlocks: Int { (kdim + 127) / 128 }
    var granules: Int { (rows + 63) / 64 }

    /// The E4M3 code and B scale the kernel multiplies at column `col` (0..<128) of expert tile `n` and K index
    /// `kk`: rows past `rows` and K past `kdim` are zero-filled by cp.async; the scale is
    /// `b_scale[(col < 64 ? 0 : kb_count) + kt]` with `b_scale = scales + 2n·kb`, and 0 for a missing granule 1.
    func read(tile n: Int, column col: Int, k kk: Int) -> (code: UInt8, scale: Float) {
        let row = n * 128 + col, kt = kk / 128
        let code = row < rows && kk < kdim ? image[row * kdim + kk] : 0
        let granule1 = 2 * n + 1 < granules
        let index = 2 * n * kBlocks + (col < 64 ? kt : kBlocks + kt)
        let scale: Float = col >= 64 && !granule1 ? 0 : image.withUnsafeBytes {
            $0.loadUnaligned(fromByteOffset: codeBytes + 4 * index, as: Float.self)
        }
        return (code, scale)
    }
}

extension FP8DeviceLayoutTests {
    /// `experts` matrices [rows, cols] whose 128×128 blocks each get their own scale (factors 2^(−3…3)), so a
    /// scale read from a neighbouring block, granule or matrix differs.
    static func distinctBlocks(experts: Int, rows: Int, cols: Int, seed: UInt64) -> FP8Blocks {
        var v = SeededRandom(seed: seed).uniformArray(count: experts * rows * cols, stream: 3, scale: 1)
        for m in 0..<experts {
            for r in 0..<rows {
                for c in 0..<cols {
                    let f = Float(sign: .plus, exponent: (m + 3 * (r / 128) + 5 * (c / 128) + Int(seed)) % 7 - 3, significand: 1)
                    v[(m * rows + r) * cols + c] *= f
                }
            }
        }
        return FP8Blocks(shape: [experts, rows, cols], quantizing: v)
    }

    /// Checks every (tile, column, K index) the kernel reads from expert `m`'s image against `expected`, the
    /// oracle's (matrix, row) for that tile column, or nil for padding (whose products must be zero).
    static func checkReads(
        _ reads: FP8KernelReads, tiles: Int, label: String, expected: (Int, Int) -> (FP8Blocks, Int)?, matrix m: Int
    ) {
        var mismatches = 0
        for n in 0..<tiles {
            for col in 0..<128 {
                let want = expected(n, col)
                for kk in 0..<(reads.kBlocks * 128) {
                    let got = reads.read(tile: n, column: col, k: kk)
                    let ok: Bool
                    if let (b, row) = want, kk < b.cols {
                        let i = (m * b.rows + row) * b.cols + kk
                        ok = got.code == b.codes[i].bitPattern && got.scale == b.scale(at: i)
                    } else {
                        ok = got.code == 0 || got.scale == 0  // padding: no contribution
                    }
                    if !ok {
                        mismatches += 1
                        if mismatches <= 3 { Issue.record("\(label): tile \(n), column \(col), k \(kk)") }
                    }
                }
            }
        }
        #expect(mismatches == 0, "\(label): \(mismatches) reads differ from the oracle's weight or scale")
    }

    @Test func kernelReadsOfTheGatedW1ImageAreTheOraclesWeightsAndScales() {
        let (inner, h, experts) = (208, 272, 2)
        let gate = Self.distinctBlocks(experts: experts, rows: inner, cols: h, seed: 1)
        let up = Self.distinctBlocks(experts: experts, rows: inner, cols: h, seed: 2)
        let rows = FusedDeviceWeights.fp8FirstRows(inner: inner, gated: true, packRows: 64)
        #expect(rows == (inner + 63) / 64 * 128, "N0 = n0_cols(I) in moe_params.cuh")
        let source = FusedDeviceWeights.fp8FirstSource(gate: gate, up: up, inner: inner, packRows: 64)
        for m in 0..<experts {
            let image = FusedDeviceWeights.fp8Image(matrix: m, rows: rows, k: h, source: source)
            let reads = FP8KernelReads(image: image, rows: rows, kdim: h)
            #expect(image.count == (reads.codeBytes + reads.granules * reads.kBlocks * 4 + 15) / 16 * 16)
            // gemm0_task's gated epilogue: tile column c < 64 is gate feature n·64 + c, c ≥ 64 up feature n·64 + c − 64.
            Self.checkReads(reads, tiles: (rows + 127) / 128, label: "gated W1, expert \(m)", expected: { n, c in
                let f = n * 64 + c % 64
                return f < inner ? (c < 64 ? gate : up, f) : nil
            }, matrix: m)
        }
    }

    @Test func kernelReadsOfThePlainW1AndW2ImagesAreTheOraclesWeightsAndScales() {
        let (inner, h, experts) = (208, 272, 2)
        let w1 = Self.distinctBlocks(experts: experts, rows: inner, cols: h, seed: 3)
        let w2 = Self.distinctBlocks(experts: experts, rows: h, cols: inner, seed: 4)
        let rows1 = FusedDeviceWeights.fp8FirstRows(inner: inner, gated: false, packRows: 64)
        let source1 = FusedDeviceWeights.fp8FirstSource(gate: w1, up: nil, inner: inner, packRows: 64)
        for m in 0..<experts {
            let first = FP8KernelReads(
                image: FusedDeviceWeights.fp8Image(matrix: m, rows: rows1, k: h, source: source1), rows: rows1, kdim: h)
            Self.checkReads(first, tiles: (rows1 + 127) / 128, label: "plain W1, expert \(m)", expected: { n, c in
                n * 128 + c < inner ? (w1, n * 128 + c) : nil
            }, matrix: m)
            let second = FP8KernelReads(
                image: FusedDeviceWeights.fp8Image(
                    matrix: m, rows: h, k: inner, source: FusedDeviceWeights.fp8SecondSource(down: w2, hidden: h)),
                rows: h, kdim: inner)
            Self.checkReads(second, tiles: (h + 127) / 128, label: "W2, expert \(m)", expected: { n, c in
                n * 128 + c < h ? (w2, n * 128 + c) : nil
            }, matrix: m)
        }
    }
}
