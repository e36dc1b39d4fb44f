#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension Verifier {
    /// The tolerance of the one-binade fp8 case (`VerificationCase.Values.fp8OneBinade`), for every backend: 1e-3.
    ///
    /// There the FP8 tensor cores sum GEMM0 exactly (below), so the GPU's h is the CPU's up to FP32 rounding and only
    /// GEMM1's truncated block sums remain: the bit-level model of the FP8 MMA (`scripts/fp8_tolerance.py --narrow`)
    /// puts the GPU at 1.3e-4 (the largest of 100 draws 3.1e-4); the CPU fast path measures 3e-5 (`FP8VerifyToleranceTests`). A scale taken from the
    /// wrong block, granule, matrix or token multiplies a block's contribution by the ratio of two scales (up to
    /// 2^±4): two of expert 0's blocks swapped already give 2e-2 to 4e-2, a systematic misplacement far more.
    /// 1e-3 leaves the GPU a margin of 3 over the model's worst draw and such a bug none.
    public static let oneBinadeTolerance = 1e-3

    /// The layer and input of a `.fp8OneBinade` case: the router (and any shared expert or biases) of
    /// `MoEWeights.random`, then the routed experts' w1, w3 and w2 replaced by E4M3 codes drawn from one binade,
    /// 256 to 448 (codes 0x78 to 0x7E, random signs), with each 128×128 block's scale f / (400·√fan_in); and x
    /// with |x| in [0.62, 1]·f per (token, 128-channel group), one element exactly ±f, random signs, rounded to
    /// BF16, so each group's codes (x / (f / 448) ≥ 0.61·448) are in the same binade. The factors f are distinct
    /// per block and per group (`distinctFactors`, 2⁻² to 2²), so is every scale.
    ///
    /// Why: a product of two such codes is a multiple of 2^10 below 2^17.6 (8 significant bits), and with random
    /// signs a 128-wide K block's partial sums stay far below 2^23, so an accumulator of 13 fraction bits (the FP8
    /// tensor cores') sums GEMM0 exactly; and since every block and group has its own scale, the output depends on
    /// each scale being applied to exactly its block.
    static func oneBinadeFP8(_ c: VerificationCase) throws -> (MoELayer, HostTensor) {
        guard c.config.precision == .fp8 else {
            throw MoEError(.unsupported, "case \(c.name): one-binade values are for precision fp8, not \(c.config.precision)")
        }
        let (e, h, i, s) = (c.config.experts, c.config.hiddenSize, c.config.intermediateSize, c.tokens)
        let rng = SeededRandom(seed: c.seed ^ 0xB1_4ADE)
        var weights = try MoEWeights.random(config: c.config, seed: c.seed)
        weights.w1 = try oneBinadeMatrices([e, i, h], rng: rng, stream: 21)
        if c.config.ffn == .gated { weights.w3 = try oneBinadeMatrices([e, i, h], rng: rng, stream: 22) }
        weights.w2 = try oneBinadeMatrices([e, h, i], rng: rng, stream: 23)

        let (b, groups) = (FP8Scaling.blockSize, (h + FP8Scaling.blockSize - 1) / FP8Scaling.blockSize)
        // Each group's largest |x| is its factor, a BF16 value: distinct factors give distinct scales.
        let factors = distinctFactors(s * groups, rng: rng, stream: 24).map { BFloat16($0).float }
        var x = [Float](repeating: 0, count: s * h)
        for t in 0..<s {
            for g in 0..<groups {
                let columns = (g * b)..<min(h, (g + 1) * b)
                let largest = columns.lowerBound + Int(rng.bits(stream: 25, index: UInt64(t * groups + g)) % UInt64(columns.count))
                for j in columns {
                    let index = UInt64(t * h + j)
                    let magnitude = j == largest ? 1 : 0.81 + 0.19 * rng.uniform(stream: 26, index: index)  // [0.62, 1]
                    let negative = rng.bits(stream: 27, index: index) & 1 == 1
                    x[t * h + j] = (negative ? -magnitude : magnitude) * factors[t * groups + g]
                }
            }
        }
        return (try MoELayer(config: c.config, weights: weights), try HostTensor(shape: [s, h], values: x, as: .bfloat16))
    }

    /// A stack of matrices [E, rows, cols] of one-binade E4M3 codes with a scale of its own per 128×128 block.
    private static func oneBinadeMatrices(_ shape: [Int], rng: SeededRandom, stream: UInt64) throws -> HostTensor {
        let count = shape.reduce(1, *)
        let codes = (0..<count).map { n in
            let b = rng.bits(stream: stream, index: UInt64(n))
            return FP8E4M3(bitPattern: 0x78 + UInt8(b % 7) | (b >> 32 & 1 == 1 ? 0x80 : 0))
        }
        let fanIn = Float(shape[shape.count - 1])
        let scaleCount = FP8Blocks.scaleShape(shape).reduce(1, *)
        let scales = distinctFactors(scaleCount, rng: rng, stream: stream + 100).map { $0 / (400 * fanIn.squareRoot()) }
        return try HostTensor(shape: shape, fp8: FP8Blocks(shape: shape, codes: codes, scales: scales))
    }

    /// `count` factors 2^u in random order, u on an even grid over [−2, 2): any two differ by 2^(4/count) at
    /// least, so they stay distinct after BF16 rounding (relative spacing ≤ 2⁻⁷) for count ≤ 300.
    private static func distinctFactors(_ count: Int, rng: SeededRandom, stream: UInt64) -> [Float] {
        let order = (0..<count).sorted { rng.bits(stream: stream, index: UInt64($0)) < rng.bits(stream: stream, index: UInt64($1)) }
        var factors = [Float](repeating: 0, count: count)
        for (rank, n) in order.enumerated() { factors[n] = exp2(-2 + 4 * (Float(rank) + 0.5) / Float(count)) }
        return factors
    }
}
