/// An 8-bit float in the E4M3 format that FP8 checkpoints use (`float8_e4m3fn`, safetensors `F8_E4M3`): a sign,
/// 4 exponent bits (bias 7) and 3 mantissa bits, no infinities, NaN only as `S.1111.111`.
///
/// Values: ±0; subnormals m·2⁻⁹ (m = 1…7, the smallest 2⁻⁹ ≈ 0.00195); normals (1 + m/8)·2^(e−7) for the
/// exponent field e = 1…15, the largest finite ±448 (`S.1111.110`). Every value is exact in FP32 and Float64.
///
/// Rounding from FP32 (`init(saturating:)`), the one definition every FlashMoE path follows (docs/fp8.md):
/// - round to nearest, ties to even, on the value's exact binary expansion (subnormals included);
/// - saturate: a magnitude that rounds above 448, and ±∞, become ±448 (what PTX `cvt.rn.satfinite` does);
/// - NaN becomes the NaN code with the input's sign (0x7F or 0xFF);
/// - the sign of zero is kept (−0 encodes as 0x80).
@frozen
public struct FP8E4M3: Sendable, Hashable, BitwiseCopyable, CustomStringConvertible {
    /// The raw bits.
    public var bitPattern: UInt8

    /// The largest finite magnitude, 448 = 1.75·2⁸.
    public static let greatestFiniteMagnitude: Float = 448

    /// Wraps raw bits.
    @inlinable
    public init(bitPattern: UInt8) { self.bitPattern = bitPattern }

    /// Rounds an FP32 value to the nearest E4M3 (ties to even), saturating to ±448; NaN stays NaN.
    ///
    /// On the FP32 bits: normal results keep 3 of the 23 mantissa bits, rounded to nearest even by integer
    /// addition (a carry into the exponent is the next binade's code), and rebias the exponent from 127 to 7. Every
    /// one of the 2³² inputs gives the code of the rule above (checked exhaustively when this replaced a
    /// floating-point form 4.7 times slower; `FP8ArithmeticTests` checks the midpoints between codes).
    @inlinable
    public init(saturating value: Float) {
        let bits = value.bitPattern
        let sign = UInt8(truncatingIfNeeded: bits >> 24) & 0x80
        let magnitude = bits & 0x7FFF_FFFF
        if magnitude >= 0x43E0_0000 {  // 448 and above, ±∞ (saturated), NaN (kept)
            bitPattern = sign | (magnitude > 0x7F80_0000 ? 0x7F : 0x7E)
            return
        }
        // Below 2⁻⁶ the spacing is 2⁻⁹: count whole steps (×512 is exact). Step 8 is the code of 2⁻⁶, so the
        // subnormal codes run straight into the first normal one.
        if magnitude < 0x3C80_0000 {
            bitPattern = sign | UInt8((Float(bitPattern: magnitude) * 512).rounded(.toNearestOrEven))
            return
        }
        // Normal: ties to even on bit 20 (the last kept mantissa bit); below 448 the sum stays below the NaN code.
        let rounded = (magnitude + 0x7_FFFF + ((magnitude >> 20) & 1)) >> 20
        bitPattern = sign | UInt8(truncatingIfNeeded: rounded - (120 << 3))
    }

    /// Whether this is the NaN code (`S.1111.111`).
    @inlinable
    public var isNaN: Bool { bitPattern & 0x7F == 0x7F }

    /// The exact value as FP32 (NaN for the NaN codes).
    @inlinable
    public var float: Float {
        let sign: Float = bitPattern & 0x80 != 0 ? -1 : 1
        let e = Int((bitPattern >> 3) & 0x0F)
        let m = Float(bitPattern & 0x07)
        if e == 15 && bitPattern & 0x07 == 7 { return .nan }
        if e == 0 { return sign * m * 0.001953125 }  // m·2⁻⁹
        return sign * (8 + m) * Float(sign: .plus, exponent: e - 10, significand: 1)  // (1 + m/8)·2^(e−7)
    }

    /// The exact value as Float64.
    @inlinable
    public var double: Double { Double(float) }

    /// The exact value as Swift prints the FP32 value, e.g. "448.0".
    public var description: String { float.description }
}

/// The block-scaled FP8 arithmetic of precision `fp8` (docs/fp8.md): weights in 128×128 blocks, activations in
/// groups of 128 channels per token, each with one FP32 scale, and a value = code × scale.
public enum FP8Scaling {
    /// The block edge for weights and the group width for activations (DeepSeek-V3's `weight_block_size`).
    public static let blockSize = 128

    /// The scale of a block or group from the largest finite magnitude `amax` among its values (NaN and ±∞ are
    /// left out of it): `amax / 448` rounded to FP32, or 1 when that is 0 (an all-zero block, or one whose
    /// values are so small that the quotient underflows; they quantize to 0 anyway).
    @inlinable
    public static func scale(amax: Float) -> Float {
        let s = amax / FP8E4M3.greatestFiniteMagnitude
        return s > 0 ? s : 1
    }

    /// The code of `value` in a block with scale `scale`: `value / scale` rounded to FP32, then to E4M3 (ties to
    /// even, saturating at ±448, NaN kept).
    @inlinable
    public static func encode(_ value: Float, scale: Float) -> FP8E4M3 {
        FP8E4M3(saturating: value / scale)
    }

    /// The largest finite magnitude among `count` values (0 when none is finite).
    @inlinable
    public static func amax(_ values: UnsafePointer<Float>, count: Int, stride: Int = 1) -> Float {
        var m: Float = 0
        for i in 0..<count {
            let a = values[i * stride].magnitude
            if a.isFinite && a > m { m = a }
        }
        return m
    }

    /// Quantizes one activation row of `count` values in groups of 128 channels: writes the codes and one scale
    /// per group (`(count + 127) / 128` of them).
    @inlinable
    public static func quantizeRow(
        _ row: UnsafePointer<Float>, count: Int, codes: UnsafeMutablePointer<FP8E4M3>,
        scales: UnsafeMutablePointer<Float>
    ) {
        var g = 0
        var start = 0
        while start < count {
            let n = min(blockSize, count - start)
            let s = scale(amax: amax(row + start, count: n))
            scales[g] = s
            for i in start..<(start + n) { codes[i] = encode(row[i], scale: s) }
            start += n
            g += 1
        }
    }

    /// Replaces each value of a row by its quantized value (code × group scale, rounded to FP32): the CPU fast
    /// path's view of an FP8 activation.
    @inlinable
    public static func fakeQuantizeRow(_ row: UnsafeMutablePointer<Float>, count: Int) {
        var start = 0
        while start < count {
            let n = min(blockSize, count - start)
            let s = scale(amax: amax(row + start, count: n))
            for i in start..<(start + n) { row[i] = encode(row[i], scale: s).float * s }
            start += n
        }
    }
}
