import Testing

@testable import FlashMoE

/// Rounding to BF16 and FP16: round to nearest even, NaN kept, infinities, overflow, subnormals, signed zero.
@Suite struct ElementTypeTests {
    static func f(_ bits: UInt32) -> Float { Float(bitPattern: bits) }

    @Test func bfloat16RoundsToNearestEven() {
        // 1 + 2⁻⁸ is halfway between 1 (even) and 1 + 2⁻⁷: down. 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ (odd)
        // and 1 + 2⁻⁶: up.
        #expect(BFloat16(Float(1 + 0x1p-8)).bitPattern == 0x3F80)
        #expect(BFloat16(Float(1 + 3 * 0x1p-8)).bitPattern == 0x3F82)
        // Just above and below halfway.
        #expect(BFloat16(Self.f(0x3F80_8001)).bitPattern == 0x3F81)
        #expect(BFloat16(Self.f(0x3F80_7FFF)).bitPattern == 0x3F80)
        // Negative values mirror.
        #expect(BFloat16(Float(-(1 + 3 * 0x1p-8))).bitPattern == 0xBF82)
        #expect(BFloat16(Float(-(1 + 0x1p-8))).bitPattern == 0xBF80)
        // A carry into the exponent.
        #expect(BFloat16(Self.f(0x3FFF_8000)).bitPattern == 0x4000)
    }

    @Test func bfloat16SpecialValues() {
        // A NaN whose payload sits only in the low 16 bits would truncate to ∞; it must stay NaN, sign kept.
        for bits: UInt32 in [0x7F80_0001, 0xFF80_0001, 0x7FC0_0000, 0x7F80_FFFF] {
            let b = BFloat16(Self.f(bits))
            #expect(b.float.isNaN)
            #expect((b.bitPattern & 0x8000 != 0) == (bits & 0x8000_0000 != 0))
        }
        #expect(BFloat16(Float.infinity).bitPattern == 0x7F80)
        #expect(BFloat16(-Float.infinity).bitPattern == 0xFF80)
        // Past the largest finite BF16 (0x7F7F) by at least half an ulp: ∞.
        #expect(BFloat16(Float.greatestFiniteMagnitude).bitPattern == 0x7F80)
        #expect(BFloat16(Self.f(0x7F7F_8000)).bitPattern == 0x7F80)
        #expect(BFloat16(Self.f(0x7F7F_7FFF)).bitPattern == 0x7F7F)
        // Subnormals round like any other value; halfway cases to even.
        #expect(BFloat16(Self.f(0x0001_0000)).bitPattern == 0x0001)
        #expect(BFloat16(Self.f(0x0001_8000)).bitPattern == 0x0002)
        #expect(BFloat16(Self.f(0x0000_8000)).bitPattern == 0x0000)
        #expect(BFloat16(Self.f(0x0000_8001)).bitPattern == 0x0001)
        #expect(BFloat16(Float.leastNonzeroMagnitude).bitPattern == 0x0000)
        // Signed zero.
        #expect(BFloat16(Float(-0.0)).bitPattern == 0x8000)
        #expect(BFloat16(Float(0.0)).bitPattern == 0x0000)
        #expect(BFloat16(bitPattern: 0x8000).float.sign == .minus)
    }

    @Test func float16Rounding() {
        #expect(Float16(Float(1 + 0x1p-11)) == 1)
        #expect(Float16(Float(1 + 3 * 0x1p-11)) == Float16(1 + 0x1p-9))
        #expect(Float16(Float(-(1 + 3 * 0x1p-11))) == -Float16(1 + 0x1p-9))
        for bits: UInt32 in [0x7F80_0001, 0xFF80_0001, 0x7FC0_0000] {
            #expect(Float16(Self.f(bits)).isNaN)
        }
        #expect(Float16(Float.infinity) == .infinity)
        #expect(Float16(-Float.infinity) == -.infinity)
        // 65504 is the largest finite FP16; 65520 is halfway to the next (2¹⁶): even, so ∞.
        #expect(Float16(Float(65519)) == 65504)
        #expect(Float16(Float(65520)) == .infinity)
        #expect(Float16(Float(1e6)) == .infinity)
        // Subnormals: 2⁻²⁴ is the least; halfway cases to even.
        #expect(Float16(Float(0x1p-24)) == .leastNonzeroMagnitude)
        #expect(Float16(Float(0x1p-25)) == 0)
        #expect(Float16(Float(3 * 0x1p-25)) == Float16(0x1p-23))
        #expect(Float16(Float(0x1p-26)) == 0)
        #expect(Float16(Float(-0.0)).sign == .minus)
        #expect(Float16(Float(-0x1p-26)).sign == .minus)
    }

    @Test func elementTypeRound() {
        let x = Float(1 + 3 * 0x1p-11)
        #expect(ElementType.float32.round(x) == x)
        #expect(ElementType.bfloat16.round(x) == 1)
        #expect(ElementType.float16.round(x) == Float(1 + 0x1p-9))
        #expect(ElementType.bfloat16.round(.nan).isNaN)
        #expect(ElementType.float16.round(.nan).isNaN)
        #expect(ElementType.float16.round(1e6) == .infinity)
        // Tensors round the same way.
        let t = try? HostTensor(shape: [2], values: [x, -x], as: .bfloat16)
        #expect(t?.floats() == [1, -1])
    }
}

/// `relativeError`'s definition, including the cases that must never pass a tolerance check.
@Suite struct RelativeErrorTests {
    @Test func values() {
        #expect(relativeError([1, 2, 3], [1, 2, 3]) == 0)
        #expect(abs(relativeError([4, 3], [1, -1]) - 5 / 2.0.squareRoot()) < 1e-12)
        #expect(abs(relativeError([1, 1], [1, 0]) - 1) < 1e-12)
        #expect(relativeError([], []) == 0)
        #expect(relativeError([0, 0], [0, 0]) == 0)
        #expect(relativeError([1, 0], [0, 0]) == .infinity)
    }

    @Test func nonFiniteValues() {
        #expect(relativeError([.nan, 1], [1, 1]).isNaN)
        #expect(relativeError([.infinity, 1], [1, 1]).isNaN)
        #expect(relativeError([1, 1], [.nan, 1]).isNaN)
        #expect(relativeError([.infinity, 1], [-.infinity, 1]).isNaN)
        // Matching special values are not errors.
        #expect(relativeError([.nan, 2], [.nan, 2]) == 0)
        #expect(relativeError([.infinity, 2], [.infinity, 2]) == 0)
        #expect(relativeError([1, 2], [1]).isNaN)
    }
}
