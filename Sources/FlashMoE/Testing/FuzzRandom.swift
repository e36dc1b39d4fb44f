#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The sequential random source of the fuzz case generator: SplitMix64 steps through `SeededRandom.mix`, so a
/// fuzz case is a pure function of its seeds on every machine.
struct FuzzRandom: RandomNumberGenerator {
    private var state: UInt64

    /// A stream from the parts of a key (a run seed, a case index, a purpose tag).
    init(_ parts: UInt64...) {
        state = parts.reduce(0x5A17_F022) { SeededRandom.mix($0 ^ $1) }
    }

    /// 64 random bits.
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        return SeededRandom.mix(state)
    }

    /// Uniform in [0, 1).
    mutating func unit() -> Double { Double(next() >> 11) / 9_007_199_254_740_992.0 }

    /// True with probability `p`.
    mutating func chance(_ p: Double) -> Bool { unit() < p }

    /// Uniform in `range` (the modulo bias is irrelevant for ranges this small).
    mutating func int(_ range: ClosedRange<Int>) -> Int {
        range.lowerBound + Int(next() % UInt64(range.count))
    }

    /// One element of a non-empty array.
    mutating func pick<T>(_ values: [T]) -> T { values[int(0...values.count - 1)] }

    /// Log-uniform in `range` (lower bound at least 1): small values as likely per octave as large ones.
    mutating func logUniform(_ range: ClosedRange<Int>) -> Int {
        let lo = log(Double(max(range.lowerBound, 1))), hi = log(Double(range.upperBound) + 1)
        let v = Int(exp(lo + unit() * (hi - lo)))
        return min(range.upperBound, max(range.lowerBound, v))
    }

    /// A multiple of 8 in 8…`maximum` (log-uniform), or 8 when `maximum` < 16.
    mutating func multipleOf8(upTo maximum: Int) -> Int { 8 * logUniform(1...max(1, maximum / 8)) }
}
