import Testing
@testable import FlashMoE

/// E4M3 encoding and decoding (`FP8E4M3`) and the block scaling of precision fp8 (`FP8Scaling`, `FP8Blocks`),
/// checked against an independent brute-force definition: the nearest of the 253 finite values, ties to the even
/// code, everything above 448 saturating.
@Suite struct FP8ArithmeticTests {
    /// The finite E4M3 values by code, from the format's definition (sign, exponent bias 7, 3 mantissa bits).
    static func definitionValue(_ code: UInt8) -> Double? {
        let e = Int((code >> 3) & 15), m = Double(code & 7)
        if e == 15 && m == 7 { return nil }
        let magnitude = e == 0 ? m / 8 * 0.015625 : (1 + m / 8) * Double(sign: .plus, exponent: e - 7, significand: 1)
        return code & 0x80 != 0 ? -magnitude : magnitude
    }

    /// The code the rounding rule gives for `v`, by search over every non-negative finite code.
    static func bruteForce(_ v: Float) -> UInt8 {
        let sign: UInt8 = v.sign == .minus ? 0x80 : 0
        if v.isNaN { return sign | 0x7F }
        let a = Double(v.magnitude)
        var best: UInt8 = 0
        var bestDistance = Double.infinity
        for code in UInt8(0)...0x7E {
            let d = abs(definitionValue(code)! - a)
            if d < bestDistance || (d == bestDistance && code & 1 == 0) {
                best = code
                bestDistance = d
            }
        }
        return sign | best
    }

    @Test func everyCodeDecodesToItsDefinitionAndEncodesBack() {
        for raw in 0...255 {
            let code = FP8E4M3(bitPattern: UInt8(raw))
            guard let expected = Self.definitionValue(UInt8(raw)) else {
                #expect(code.isNaN && code.float.isNaN, "code \(raw)")
                #expect(FP8E4M3(saturating: code.float).isNaN)
                continue
            }
            #expect(!code.isNaN)
            #expect(code.double == expected, "code \(raw)")
            #expect(code.float.sign == (raw & 0x80 != 0 ? .minus : .plus), "code \(raw): sign")
            #expect(FP8E4M3(saturating: code.float).bitPattern == UInt8(raw), "code \(raw) does not round-trip")
        }
    }

    @Test func edgeCases() {
        func enc(_ v: Float) -> UInt8 { FP8E4M3(saturating: v).bitPattern }
        #expect(enc(.nan) == 0x7F)
        #expect(enc(-Float.nan) == 0xFF)
        #expect(enc(.infinity) == 0x7E && enc(-.infinity) == 0xFE)
        #expect(enc(448) == 0x7E && enc(449) == 0x7E && enc(470) == 0x7E && enc(1e30) == 0x7E)
        #expect(enc(.greatestFiniteMagnitude) == 0x7E)
        #expect(enc(432) == 0x7E, "432 lies halfway between 416 (odd mantissa 5) and 448 (even 6)")
        #expect(enc(424) == 0x7D)
        #expect(enc(0.0009765625) == 0x00, "2⁻¹⁰ is halfway between 0 and 2⁻⁹: ties to even")
        #expect(enc(0.0029296875) == 0x02, "3·2⁻¹⁰ is halfway between 2⁻⁹ and 2·2⁻⁹: ties to even")
        #expect(enc(0.0146484375) == 0x08, "7.5·2⁻⁹ rounds up to 2⁻⁶, the first normal")
        #expect(enc(Float.leastNonzeroMagnitude) == 0x00 && enc(-Float.leastNonzeroMagnitude) == 0x80)
        #expect(enc(1e-30) == 0x00)
        #expect(enc(-0.0) == 0x80 && enc(0) == 0x00)
        #expect(enc(1) == 0x38 && enc(1.0625) == 0x38 && enc(1.1875) == 0x3A)
    }

    /// The values where rounding decides: every midpoint between two neighbouring codes and the FP32 values just
    /// below and above it, with both signs (the encoder rounds on the FP32 bits).
    @Test func midpointsBetweenCodesRoundAsTheRuleSays() {
        for code in UInt8(0)..<0x7E {
            let (low, high) = (Self.definitionValue(code)!, Self.definitionValue(code + 1)!)
            let mid = Float((low + high) / 2)  // exact in FP32: E4M3 values have 4 significant bits
            for v in [mid.nextDown, mid, mid.nextUp] {
                #expect(FP8E4M3(saturating: v).bitPattern == Self.bruteForce(v), "value \(v)")
                #expect(FP8E4M3(saturating: -v).bitPattern == Self.bruteForce(-v), "value \(-v)")
            }
        }
    }

    @Test func randomValuesRoundToTheNearestCode() {
        let rng = SeededRandom(seed: 5)
        let u = rng.uniformArray(count: 20_000, stream: 1, scale: 1)
        let e = rng.uniformArray(count: 20_000, stream: 2, scale: 1)
        for (a, b) in zip(u, e) {
            // Magnitudes log-uniform over 2⁻¹⁴…2¹⁰: subnormals, normals and saturation.
            let v = a * Float(sign: .plus, exponent: Int((b + 1) * 12) - 14, significand: 1)
            #expect(FP8E4M3(saturating: v).bitPattern == Self.bruteForce(v), "value \(v)")
        }
    }

    @Test func scalesOfGroups() {
        #expect(FP8Scaling.scale(amax: 0) == 1, "an all-zero group has scale 1")
        #expect(FP8Scaling.scale(amax: 448) == 1)
        #expect(FP8Scaling.scale(amax: Float.leastNonzeroMagnitude) == 1, "a quotient that underflows gives 1")
        var row: [Float] = [1, -2, .nan, .infinity, -.infinity, 0.5] + [Float](repeating: 0.25, count: 130)
        #expect(FP8Scaling.amax(&row, count: row.count) == 2, "NaN and ±∞ are left out of amax")
        var codes = [FP8E4M3](repeating: .init(bitPattern: 0), count: row.count)
        var scales: [Float] = [0, 0]
        FP8Scaling.quantizeRow(row, count: row.count, codes: &codes, scales: &scales)
        #expect(scales == [2 / 448, 0.25 / 448])
        #expect(codes[1].bitPattern == 0xFE, "the group's largest value encodes as −448")
        #expect(codes[2].isNaN)
        #expect(codes[3].bitPattern == 0x7E && codes[4].bitPattern == 0xFE, "±∞ saturates to ±448")
        #expect(codes[135].float == 448, "the second group has its own scale")
        var zeros = [Float](repeating: 0, count: 128)
        FP8Scaling.quantizeRow(zeros, count: 128, codes: &codes, scales: &scales)
        #expect(scales[0] == 1 && codes[0].bitPattern == 0)
        FP8Scaling.fakeQuantizeRow(&zeros, count: 128)
        #expect(zeros.allSatisfy { $0 == 0 })
    }

    @Test func blocksOfAStack() throws {
        // Two matrices of 130 × 200: blocks of 128×128, 128×72, 2×128 and 2×72, each with its own scale.
        let shape = [2, 130, 200]
        let n = shape.reduce(1, *)
        var v = SeededRandom(seed: 3).uniformArray(count: n, stream: 1, scale: 1)
        v[1 * 130 * 200 + 129 * 200 + 199] = 50  // the last block of matrix 1: amax 50
        let t = try HostTensor(shape: shape, values: v, as: .float8E4M3)
        let b = try #require(t.fp8Blocks)
        #expect(b.scales.count == 8 && FP8Blocks.scaleShape(shape) == [2, 2, 2])
        #expect(b.scales[7] == Float(50) / 448)
        #expect(t.byteCount == n + 8 * 4)
        for i in stride(from: 0, to: n, by: 7) {
            let s = b.scale(at: i)
            #expect(b.codes[i] == FP8Scaling.encode(v[i], scale: s))
            #expect(t.float(at: i) == b.codes[i].float * s)
        }
        for blockIndex in 0..<8 {
            let (m, rest) = blockIndex.quotientAndRemainder(dividingBy: 4)
            let (bi, bj) = rest.quotientAndRemainder(dividingBy: 2)
            var amax: Float = 0
            for r in (bi * 128)..<min(130, bi * 128 + 128) {
                for c in (bj * 128)..<min(200, bj * 128 + 128) { amax = max(amax, abs(v[(m * 130 + r) * 200 + c])) }
            }
            #expect(b.scales[blockIndex] == amax / 448, "block \(blockIndex)")
        }
        // A matrix of the stack keeps its codes and scales; a 2-D row range would split blocks.
        let one = try t.slice(1..<2)
        #expect(one.fp8Blocks?.scales == Array(b.scales[4..<8]))
        #expect(one.floats() == Array(t.floats()[(130 * 200)...]))
        #expect(throws: MoEError.self) { try one.reshaped([130 * 200]) }
        #expect(throws: MoEError.self) { try one.reshaped([130, 200]).slice(0..<1) }
        // FP8 → BF16 dequantizes.
        #expect(one.converted(to: .bfloat16).floats() == one.floats().map { BFloat16($0).float })
    }
}
