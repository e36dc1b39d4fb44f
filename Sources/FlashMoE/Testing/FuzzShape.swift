/// A layer shape of the fuzzer: everything the GPU kernel is compiled for (`FusedSpecialization`'s defines) plus
/// how many expert-parallel ranks run it.
///
/// A run draws its shapes from a pool of `FuzzShape.poolSize` per seed, so one GPU run compiles a bounded number
/// of kernel specialisations (NVRTC takes seconds each) while the token counts, capacity, weights, inputs, ties
/// and rank splits stay fresh per case (they are launch arguments and data, not compile-time constants).
public struct FuzzShape: Sendable, Hashable {
    /// How large the shape may be.
    public enum Size: String, Sendable, Hashable, CaseIterable {
        /// H, I ≤ 64 and E ≤ 16: cheap enough for up to 65,536 tokens.
        case tiny
        /// H, I ≤ 512 and E up to 512 within the weight budget: most shapes.
        case small
        /// H up to 7168 or I up to 14,336 (real models' sizes), with few experts and tokens.
        case wide
    }

    /// The layer (dropless; each case sets its own capacity).
    public let config: MoEConfig
    /// nil: the single-GPU operator (`FusedMoE`); R: `DistributedMoE` with R ranks (1…8, ≤ E) on one GPU.
    public let ranks: Int?
    /// The shape's size class (bounds on H, I and E).
    public let size: Size
    /// 16-bit layers (bf16, fp16, fp8): whether the routed expert rows are kept in the storage type
    /// (`FusedOptions.storageReturns`: one GPU, the rows before the combine; ranks, the rows sent back, which must
    /// then give one GPU's bits with storage rows). Drawn on a stream of its own, so a seed's layers are the ones
    /// earlier runs drew.
    public let storageRows: Bool

    /// Shapes per run seed.
    public static let poolSize = 96

    /// Shape `index` (0..<poolSize) of run `seed`: a pure function of the three.
    ///
    /// - Parameter fp8: also draw fp8 shapes (docs/fp8.md): half of the shapes, with ranks or without, on a random
    ///   stream of their own, become precision fp8 with H and I multiples of 16 (the GPU's E4M3 rows). Without it
    ///   every shape is the one earlier runs of the seed drew.
    public init(seed: UInt64, index: Int, fp8: Bool = false) {
        var r = FuzzRandom(seed, UInt64(index), 0x5A_A9E)
        // The pool is stratified by index so every seed has every kind: of each 8 shapes, one with a real H, one
        // with a real I, two tiny ones (one with ranks) and four small ones (two with ranks, R cycling 1…8).
        let kind = index % 8
        size = kind == 0 || kind == 4 ? .wide : kind == 2 || kind == 6 ? .tiny : .small
        let wantedRanks: Int? =
            kind == 1 || kind == 5 ? 1 + (index / 4) % 8 : kind == 6 ? 2 + (index / 8) % 7 : nil
        // The GPU kernel's precisions; fp8 only when asked (its GPU path is experimental), drawn on its own stream
        // so a seed's other cases stay the same either way.
        var precision = r.pick([Precision.fp32, .tf32, .bf16, .fp16])
        var q = FuzzRandom(seed, UInt64(index), 0xF8)
        if fp8 && q.chance(0.5) { precision = .fp8 }
        let ffn: FFNKind = r.chance(0.5) ? .gated : .plain
        let bias = ffn == .plain && r.chance(0.4)
        let activation = r.pick(Activation.allCases)
        let matrices = ffn == .gated ? 3 : 2
        let budget = size == .wide ? FuzzBudget.wideWeightElements : FuzzBudget.weightElements

        var h: Int, i: Int
        switch size {
        case .tiny: (h, i) = (r.multipleOf8(upTo: 64), r.multipleOf8(upTo: 64))
        case .small: (h, i) = (r.multipleOf8(upTo: 512), r.multipleOf8(upTo: 512))
        case .wide:
            if kind == 0 {
                h = r.chance(0.5) ? r.pick([1024, 2048, 4096, 5120, 7168]) : r.multipleOf8(upTo: 7168)
                i = r.multipleOf8(upTo: 2048)
            } else {
                h = r.multipleOf8(upTo: 1024)
                i = r.chance(0.5) ? r.pick([768, 1408, 2048, 14336]) : r.multipleOf8(upTo: 14336)
            }
        }
        // One expert must fit the weight budget: shrink I first.
        if h * i * matrices > budget { i = max(8, budget / (h * matrices) / 8 * 8) }
        if precision == .fp8 { (h, i) = ((h + 15) / 16 * 16, max(16, i / 16 * 16)) }
        let maxExperts = min(size == .tiny ? 16 : 512, max(1, budget / (h * i * matrices)))
        let edges = [1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512].filter { $0 <= maxExperts }
        // Shapes with ranks need at least R experts (budget permitting; R is lowered otherwise).
        let e = max(r.chance(0.3) ? r.pick(edges) : r.logUniform(1...maxExperts), min(wantedRanks ?? 1, maxExperts))

        var router: RouterConfig
        switch r.int(0...19) {
        case 0...6: router = .softmax(renormalize: true)
        case 7...9: router = .softmax(renormalize: false)
        default:
            let divisors = e < 2 ? [] : (2...min(e, 128)).filter { e % $0 == 0 }
            let groups = divisors.isEmpty || r.chance(0.35) ? 1 : r.pick(divisors)
            router = RouterConfig(
                scoring: .sigmoid, renormalize: r.chance(0.7), groups: groups, groupsKept: r.int(1...groups),
                selectionBias: r.chance(0.7))
        }
        if r.chance(0.35) { router.scalingFactor = r.chance(0.6) ? r.pick([2.5, 0.5, 1.5, 16]) : Float(r.int(1...4000)) / 1000 }
        let reachable = router.groups > 1 ? router.groupsKept * (e / router.groups) : e
        let maxK = min(16, e, reachable)
        let k = r.chance(0.3) ? r.pick([1, maxK]) : r.int(1...maxK)

        var shared: SharedExpertConfig?
        if r.chance(0.3) {
            let fits = max(8, budget / 4 / (h * matrices) / 8 * 8)
            shared = SharedExpertConfig(intermediateSize: r.multipleOf8(upTo: min(2048, fits)), gated: r.chance(0.5))
        }
        config = MoEConfig(
            hiddenSize: h, intermediateSize: i, experts: e, topK: k, ffn: ffn, bias: bias, activation: activation,
            router: router, sharedExpert: shared, precision: precision)
        ranks = wantedRanks.map { min($0, e) }
        var t = FuzzRandom(seed, UInt64(index), 0x5707)
        storageRows = precision.storage.byteSize == 2 && t.chance(0.3)
    }

    /// Floating-point operations per token the case costs on the CPU: the forward (`MoEConfig.flops`) plus the
    /// verifier's second pass over the router logits.
    var flopsPerToken: Double {
        config.flops(tokens: 1) + 2 * Double(config.hiddenSize * config.experts)
    }
}

/// What one fuzz case may cost, sized for the GPU host (the Float64 oracle in a release build on 16 cores runs about
/// 100 GFLOP/s): most cases cost milliseconds, a few large ones a second or so. The CPU test suite runs the cases of
/// a seed that fit `FuzzBudget.quick` (see `FuzzCase.isQuick`).
public enum FuzzBudget {
    /// Weight elements of a tiny or small shape (8 Mi: 32 MiB in FP32).
    public static let weightElements = 8 << 20
    /// Weight elements of a wide shape (48 Mi).
    public static let wideWeightElements = 48 << 20
    /// Oracle FLOPs of an ordinary case.
    public static let flops = 1.5e9
    /// Oracle FLOPs of a large case (`largeShare` of the cases; tiny shapes more often).
    public static let largeFlops = 8e9
    /// The chance that a case of a small or wide shape gets `largeFlops` (tiny shapes: 0.15).
    public static let largeShare = 0.04
    /// The most tokens a case has.
    public static let maxTokens = 65_536
    /// The oracle FLOPs and weight elements of a case the debug-built test suite runs in milliseconds.
    public static let quick = (flops: 40e6, weightElements: 4 << 20)
}
