/// A 16-bit brain floating-point number: FP32's sign and 8-bit exponent with a 7-bit mantissa.
///
/// Conversion from `Float` rounds to nearest, ties to even; NaN stays NaN (quieted, sign kept), ±∞ stays ±∞,
/// values past the largest finite BF16 round to ±∞ exactly as IEEE rounding says, and subnormals round like any
/// other value (BF16 has FP32's exponent range, so there is no extra underflow).
@frozen
public struct BFloat16: Sendable, Hashable, BitwiseCopyable, CustomStringConvertible {
    /// The raw bits.
    public var bitPattern: UInt16

    /// Wraps raw bits.
    @inlinable
    public init(bitPattern: UInt16) { self.bitPattern = bitPattern }

    /// Rounds an FP32 value to the nearest BF16 (ties to even).
    @inlinable
    public init(_ value: Float) {
        let bits = value.bitPattern
        if value.isNaN {
            // Keep the sign and the top mantissa bits, force the quiet bit so a NaN never truncates to ∞.
            bitPattern = UInt16(truncatingIfNeeded: bits >> 16) | 0x0040
        } else {
            let lsb = (bits >> 16) & 1
            bitPattern = UInt16(truncatingIfNeeded: (bits &+ 0x7FFF &+ lsb) >> 16)
        }
    }

    /// Rounds a Float64 value to the nearest BF16 through FP32 (double rounding is exact enough here: the
    /// Float64 → Float32 step keeps 24 bits, far more than BF16's 8, except at exact halfway cases).
    @inlinable
    public init(_ value: Double) { self.init(Float(value)) }

    /// The exact FP32 value.
    @inlinable
    public var float: Float { Float(bitPattern: UInt32(bitPattern) << 16) }

    /// The exact FP32 value as Swift prints it, e.g. "1.0078125".
    public var description: String { float.description }
}

extension Float {
    /// The exact FP32 value of a BF16.
    @inlinable
    public init(_ value: BFloat16) { self = value.float }
}

extension ElementType {
    /// Rounds a value to this element type and back (the value the GPU would hold in storage; FP8 with scale 1,
    /// since a lone value has no block).
    @inlinable
    public func round(_ x: Float) -> Float {
        switch self {
        case .float32: x
        case .bfloat16: BFloat16(x).float
        case .float16: Float(Float16(x))
        case .float8E4M3: FP8E4M3(saturating: x).float
        }
    }
}
