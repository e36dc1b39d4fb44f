/// Counter-based pseudo-random numbers: value i of stream s is a pure function of (seed, s, i).
///
/// Any element can be generated independently, so large tensors fill in parallel and give the same bits on any
/// machine and thread count.
public struct SeededRandom: Sendable, Hashable {
    /// The user-visible seed.
    public let seed: UInt64

    /// The generator whose every value is a function of `seed`, the stream and the index.
    public init(seed: UInt64) { self.seed = seed }

    /// SplitMix64's finaliser: a bijective 64-bit mix with good avalanche.
    @inlinable
    public static func mix(_ z0: UInt64) -> UInt64 {
        var z = z0 &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// 64 random bits for element `index` of stream `stream`.
    @inlinable
    public func bits(stream: UInt64, index: UInt64) -> UInt64 {
        Self.mix(Self.mix(seed ^ Self.mix(stream)) ^ index)
    }

    /// A uniform value in [−1, 1) for element `index` of stream `stream` (24 random bits).
    @inlinable
    public func uniform(stream: UInt64, index: UInt64) -> Float {
        let b = bits(stream: stream, index: index) >> 40  // 24 bits
        return Float(b) * (2.0 / 16_777_216.0) - 1.0
    }

    /// `count` uniform values in [−scale, scale), filled in parallel.
    public func uniformArray(count: Int, stream: UInt64, scale: Float) -> [Float] {
        [Float](unsafeUninitializedCapacity: count) { buf, initialized in
            // Each chunk writes a disjoint range of the buffer.
            nonisolated(unsafe) let base = buf.baseAddress!
            parallelChunks(count: count, minimumChunk: 1 << 16) { range in
                for i in range { base[i] = scale * uniform(stream: stream, index: UInt64(i)) }
            }
            initialized = count
        }
    }
}
