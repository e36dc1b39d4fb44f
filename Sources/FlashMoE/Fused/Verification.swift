#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One GPU-vs-oracle check: a layer configuration, a token count and how the input is drawn.
public struct VerificationCase: Sendable, Hashable {
    /// A short label for the table.
    public var name: String
    /// The layer (its precision decides the tolerance).
    public var config: MoEConfig
    /// Tokens S.
    public var tokens: Int
    /// Seed of the random weights and input (fresh per case).
    public var seed: UInt64
    /// When set, the router weights send every token to this expert first (the other router rows are zero, so
    /// later ranks are exact ties that the lower index must win), and the input is made non-negative.
    public var forcedExpert: Int?
    /// How the experts' weights and the input are drawn.
    public var values: Values
    /// A tolerance for every backend in place of the precision's (`Precision.tolerance(for:)`), for a case built
    /// so that a correct backend lands far below it; nil: the precision's.
    public var tolerance: Double?

    /// How a case's experts' weights and input are drawn.
    public enum Values: Sendable, Hashable {
        /// `MoEWeights.random` and x uniform in ±1.7.
        case uniform
        /// fp8 only: every E4M3 code of the experts' weights and of x in one binade (256 to 448), each 128×128
        /// weight block and each (token, 128-channel group) of x with its own scale (`Verifier.oneBinadeFP8`).
        case fp8OneBinade
    }

    /// A case; by default uniform values, no forced expert and the precision's tolerance.
    public init(
        name: String, config: MoEConfig, tokens: Int, seed: UInt64, forcedExpert: Int? = nil,
        values: Values = .uniform, tolerance: Double? = nil
    ) {
        self.name = name
        self.config = config
        self.tokens = tokens
        self.seed = seed
        self.forcedExpert = forcedExpert
        self.values = values
        self.tolerance = tolerance
    }

    /// The tolerance a backend computing with `arithmetic` is held to: `tolerance`, else the precision's.
    public func tolerance(for arithmetic: ExpertArithmetic) -> Double {
        tolerance ?? config.precision.tolerance(for: arithmetic)
    }
}

/// The outcome of one `VerificationCase`.
public struct VerificationResult: Sendable {
    /// The case that was run.
    public let verificationCase: VerificationCase
    /// ‖y_gpu − y_oracle‖ / ‖y_oracle‖ over the tokens whose routing both sides agree on (NaN if any output
    /// element is NaN where the oracle's is finite, e.g. never written).
    public let relativeError: Double
    /// The tolerance the backend was held to (`VerificationCase.tolerance(for:)`).
    public let tolerance: Double
    /// Tokens whose expert choices differ from the oracle's.
    public let routingMismatches: Int
    /// Of those, the ones explained by a near-tie (the two selection scores within 1e-3 relative in Float64).
    public let nearTies: Int
    /// Dropped (token, rank) pairs on the GPU and in the oracle.
    public let droppedGPU: Int
    /// Dropped (token, rank) pairs in the oracle.
    public let droppedOracle: Int
    /// Whether every pair's slot (and so every drop) equals the oracle's.
    public let slotsIdentical: Bool
    /// Whether two runs on the same input gave the same bits.
    public let bitwiseReproducible: Bool
    /// The GPU forward's wall time including transfers (the first run, milliseconds).
    public let gpuMilliseconds: Double
    /// Why it failed, or nil.
    public let failure: String?

    /// Whether the case passed (`failure` is nil).
    public var passed: Bool { failure == nil }
}

/// Runs the fused GPU operator against the CPU oracle (`CPUBackend` in `.oracle` mode) on fresh random inputs,
/// with the output poisoned (NaN) before every launch.
public enum Verifier {
    /// Builds the layer and input of a case: random weights and input from the case's seed, the router forced
    /// when the case asks.
    public static func makeProblem(_ c: VerificationCase) throws -> (MoELayer, HostTensor) {
        if c.values == .fp8OneBinade { return try oneBinadeFP8(c) }
        var weights = try MoEWeights.random(config: c.config, seed: c.seed)
        let (e, h) = (c.config.experts, c.config.hiddenSize)
        var x = SeededRandom(seed: c.seed ^ 0x5EED).uniformArray(count: c.tokens * h, stream: 99, scale: 1.7)
        if let forced = c.forcedExpert {
            var router = [Float](repeating: 0, count: e * h)
            for i in 0..<h { router[forced * h + i] = 0.5 }
            weights.router = try HostTensor(shape: [e, h], values: router, as: c.config.precision.storage)
            x = x.map(abs)
        }
        let layer = try MoELayer(config: c.config, weights: weights)
        return (layer, try HostTensor(shape: [c.tokens, h], values: x, as: c.config.precision.storage))
    }

    /// Runs one case with an operator factory (so callers choose options and device). Never throws for a wrong
    /// result: failures are reported in the result; it throws only when the case cannot run at all.
    public static func run(_ c: VerificationCase, makeOperator: (MoELayer) throws -> any MoEBackend) throws
        -> VerificationResult
    {
        let (layer, x) = try makeProblem(c)
        return try run(c, layer: layer, input: x, makeOperator: makeOperator)
    }

    /// Runs a case on a layer and input the caller made (the fuzzer's tie cases edit `makeProblem`'s router):
    /// two forwards of the operator, the oracle, and `compare`.
    public static func run(
        _ c: VerificationCase, layer: MoELayer, input x: HostTensor, makeOperator: (MoELayer) throws -> any MoEBackend
    ) throws -> VerificationResult {
        let gpu = try makeOperator(layer)
        let clock = ContinuousClock()
        let t0 = clock.now
        let first = try gpu.forward(x)
        let gpuMs = (clock.now - t0).milliseconds
        let second = try gpu.forward(x)
        let reference = try CPUBackend(layer: layer, mode: .oracle).forward(x)
        return compare(
            c, first, second, reference, layer: layer, input: x, gpuMilliseconds: gpuMs,
            arithmetic: ExpertArithmetic(backendName: gpu.name))
    }

    /// `arithmetic`: how the outputs were computed, which picks the tolerance (`VerificationCase.tolerance(for:)`);
    /// the callers that pass none compare GPU outputs.
    static func compare(
        _ c: VerificationCase, _ first: MoEOutput, _ second: MoEOutput, _ reference: MoEOutput, layer: MoELayer,
        input: HostTensor, gpuMilliseconds: Double, arithmetic: ExpertArithmetic = .tensorCores
    ) -> VerificationResult {
        let (s, k, h) = (c.tokens, c.config.topK, c.config.hiddenSize)
        let g = first.routing, r = reference.routing
        // Routing: identical per token, or explained by a near-tie in the oracle's own scores.
        let scores = selectionScores(layer: layer, input: input)
        var mismatched = Set<Int>()
        var nearTies = 0
        for t in 0..<s {
            let gi = Array(g.expertIDs[t * k..<(t + 1) * k]), ri = Array(r.expertIDs[t * k..<(t + 1) * k])
            guard gi != ri else { continue }
            mismatched.insert(t)
            if isNearTie(gpu: gi, oracle: ri, scores: scores.map { Array($0[t * c.config.experts..<(t + 1) * c.config.experts]) }) {
                nearTies += 1
            }
        }
        let moved = mismatched.count == nearTies ? dropsMovedByTies(g, r, mismatched: mismatched, config: c.config) : []
        // Output error over agreeing tokens (same choices, same pairs kept).
        let y = first.output.floats(), yr = reference.output.floats()
        var a: [Float] = [], b: [Float] = []
        a.reserveCapacity(y.count)
        b.reserveCapacity(y.count)
        for t in 0..<s where !mismatched.contains(t) && !moved.contains(t) {
            a += y[t * h..<(t + 1) * h]
            b += yr[t * h..<(t + 1) * h]
        }
        let rel = a.isEmpty ? 0 : relativeError(a, b)
        let slotsIdentical = g.slots == r.slots
        let bitwise = first.output.floats().elementsEqual(second.output.floats()) { $0.bitPattern == $1.bitPattern }
            && g == second.routing
        var failure: String?
        let tol = c.tolerance(for: arithmetic)
        if !(rel <= tol) {
            failure = rel.isNaN ? "output has NaN (unwritten or invalid) elements" : "relative error \(rel) > \(tol)"
        } else if mismatched.count > nearTies {
            failure = "\(mismatched.count - nearTies) tokens routed differently without a near-tie"
        } else if mismatched.isEmpty && !slotsIdentical {
            failure = "slots or drops differ from the oracle with identical routing"
        } else if !bitwise {
            failure = "two runs on the same input gave different bits"
        }
        return VerificationResult(
            verificationCase: c, relativeError: rel, tolerance: tol, routingMismatches: mismatched.count,
            nearTies: nearTies, droppedGPU: g.dropped, droppedOracle: r.dropped, slotsIdentical: slotsIdentical,
            bitwiseReproducible: bitwise, gpuMilliseconds: gpuMilliseconds, failure: failure)
    }

    /// Tokens routed alike whose pairs are kept or dropped differently only because earlier near-tie tokens chose
    /// other experts: with a capacity, token order decides who keeps a slot (rule 6), so one tie moves every later
    /// token's slots on the experts it touched (fuzz case 348 of seed 20261211: E = 256, capacity factor 0.75). Such
    /// tokens are excused only when the backend's slots are exactly what its own choices give, so a wrong drop is
    /// never excused. Empty when dropless, without mismatches, or with inconsistent slots.
    static func dropsMovedByTies(_ g: Routing, _ r: Routing, mismatched: Set<Int>, config: MoEConfig) -> Set<Int> {
        let k = g.topK
        guard !mismatched.isEmpty, config.capacity.perExpert(tokens: g.tokens, experts: config.experts, topK: k) != nil,
            let own = try? Router.assignSlots(expertIDs: g.expertIDs, tokens: g.tokens, config: config),
            own.slots == g.slots
        else { return [] }
        var moved = Set<Int>()
        for t in 0..<g.tokens where !mismatched.contains(t) {
            let pairs = t * k..<(t + 1) * k
            if zip(g.slots[pairs], r.slots[pairs]).contains(where: { ($0 >= 0) != ($1 >= 0) }) { moved.insert(t) }
        }
        return moved
    }

    /// Per token, the Float64 scores selection compares: the logit (softmax) or sigmoid + bias (sigmoid).
    static func selectionScores(layer: MoELayer, input: HostTensor) -> [Double]? {
        let c = layer.config
        let router = layer.weights.router.converted(to: c.precision.storage)
        guard var l = try? Router.logits(input: input.converted(to: c.precision.storage), router: router) else {
            return nil
        }
        if c.router.scoring == .sigmoid {
            let bias = layer.weights.selectionBias?.floats() ?? []
            for i in l.indices {
                let e = i % c.experts
                l[i] = 1 / (1 + exp(-l[i])) + Double(bias.isEmpty ? 0 : bias[e])
            }
        }
        return l
    }

    /// Two choice lists differ only by experts whose scores are within 1e-3 (relative to max(1, |score|)).
    static func isNearTie(gpu: [Int32], oracle: [Int32], scores: [Double]?) -> Bool {
        guard let scores else { return false }
        // A tie swaps one expert for another; it never leaves a rank unrouted that the other side routed.
        guard gpu.filter({ $0 >= 0 }).count == oracle.filter({ $0 >= 0 }).count else { return false }
        let only = Set(gpu).symmetricDifference(Set(oracle)).filter { $0 >= 0 }.map { scores[Int($0)] }
        guard let lo = only.min(), let hi = only.max() else {
            // Same experts in another order: ranks swapped by a tie.
            return zip(gpu, oracle).allSatisfy { $0 < 0 || $1 < 0 || abs(scores[Int($0)] - scores[Int($1)]) <= 1e-3 * max(1, abs(scores[Int($0)])) }
        }
        return hi - lo <= 1e-3 * max(1, abs(hi))
    }
}


extension Verifier {
    /// The standard suite of `flashmoe verify`: every preset at small token counts (each in the precisions that
    /// fit a quick check), then edge cases on small shapes: S = 0, 1, 127 and one tile + 1, all tokens forced to one
    /// expert, mostly empty experts, k = E, E = 1 and E = 512, capacity drops, every router, FFN and activation,
    /// shared experts, and H, I that are multiples of 8 but not of the tile sizes. Seeds differ per case.
    public static func standardCases(seed: UInt64 = 1) -> [VerificationCase] {
        var cases: [VerificationCase] = []
        var n: UInt64 = 0
        func add(
            _ name: String, _ c: MoEConfig, _ s: Int, forced: Int? = nil, values: VerificationCase.Values = .uniform,
            tolerance: Double? = nil
        ) {
            n += 1
            cases.append(VerificationCase(
                name: name, config: c, tokens: s, seed: seed &* 1000 &+ n, forcedExpert: forced, values: values,
                tolerance: tolerance))
        }
        func with(_ c: MoEConfig, _ p: Precision) -> MoEConfig {
            var c = c
            c.precision = p
            return c
        }
        for p in Precision.allCases { add("paper-e64", with(Preset.paperE64.config, p), 200) }
        for p in [Precision.bf16, .tf32] { add("paper-e32", with(Preset.paperE32.config, p), 130) }
        for p in [Precision.bf16, .fp32] { add("qwen3-30b-a3b", with(Preset.qwen3_30bA3b.config, p), 129) }
        add("mixtral-8x7b", with(Preset.mixtral8x7b.config, .bf16), 64)
        add("deepseek-v3", with(Preset.deepSeekV3.config, .bf16), 16)

        let small = MoEConfig(hiddenSize: 64, intermediateSize: 96, experts: 8, topK: 2)
        func cfg(
            h: Int? = nil, i: Int? = nil, e: Int? = nil, k: Int? = nil,
            ffn: FFNKind? = nil, bias: Bool? = nil, act: Activation? = nil, router: RouterConfig? = nil,
            shared: SharedExpertConfig? = nil, capacity: Capacity? = nil, _ p: Precision
        ) -> MoEConfig {
            var c = small
            c.hiddenSize = h ?? c.hiddenSize
            c.intermediateSize = i ?? c.intermediateSize
            c.experts = e ?? c.experts
            c.topK = k ?? c.topK
            c.ffn = ffn ?? c.ffn
            c.bias = bias ?? c.bias
            c.activation = act ?? c.activation
            c.router = router ?? c.router
            c.sharedExpert = shared ?? c.sharedExpert
            c.capacity = capacity ?? c.capacity
            c.precision = p
            return c
        }
        add("S=0", cfg(.bf16), 0)
        add("S=1 gelu bias", cfg(bias: true, act: .gelu, .fp16), 1)
        add("S=127 gelu-tanh bias", cfg(bias: true, act: .geluTanh, .fp32), 127)
        add("S=129 (tile+1) gated silu", cfg(ffn: .gated, act: .silu, .bf16), 129)
        add("all to expert 3, k=1", cfg(k: 1, .fp32), 200, forced: 3)
        add("all to expert 5, tie ranks", cfg(k: 3, .bf16), 150, forced: 5)
        add("mostly empty experts", cfg(e: 64, .tf32), 5)
        add("k = E", cfg(e: 4, k: 4, .fp32), 50)
        add("E = 1", cfg(e: 1, k: 1, .fp32), 33)
        add("E = 512, k = 16", cfg(i: 64, e: 512, k: 16, .bf16), 130)
        add("capacity 1.0 (drops)", cfg(capacity: .factor(1.0), .fp32), 300)
        add("capacity 1.25 gated", cfg(ffn: .gated, act: .silu, capacity: .factor(1.25), .bf16), 257)
        add("softmax, no renorm", cfg(router: .softmax(renormalize: false), .bf16), 100)
        let deepseek = RouterConfig.deepSeek(groups: 8, groupsKept: 4, scalingFactor: 2.5)
        for p in [Precision.bf16, .fp32] {
            add("sigmoid groups + shared", cfg(h: 256, i: 72, e: 32, k: 4, ffn: .gated, act: .silu, router: deepseek,
                shared: SharedExpertConfig(intermediateSize: 104), p), 129)
        }
        for p in [Precision.fp32, .bf16] {
            add("gated shared expert", cfg(h: 128, i: 40, e: 16, k: 4, ffn: .gated, act: .silu,
                router: .softmax(renormalize: false), shared: SharedExpertConfig(intermediateSize: 56, gated: true), p), 77)
        }
        for act in Activation.allCases { add("plain bias \(act)", cfg(bias: true, act: act, .tf32), 70) }
        add("H=136 I=200 gated", cfg(h: 136, i: 200, ffn: .gated, act: .silu, .tf32), 333)
        add("H=136 I=200 plain", cfg(h: 136, i: 200, act: .relu, .fp16), 190)
        add("sigmoid, 1 group, no renorm", cfg(router: RouterConfig(scoring: .sigmoid, renormalize: false,
            selectionBias: true, scalingFactor: 1.5), .fp32), 64)
        // Issue 12, defect 7: fp32's FFMA tiles leave room to stage 96 tokens of E = 256 logits, which is not a
        // divisor of the 128-token tile; the second chunk ran past the tile. Both routers, and E between the sizes.
        let route = RouterConfig.deepSeek(groups: 2, groupsKept: 2, scalingFactor: 1)
        add("fp32 E=256 k=2 S=700 sigmoid", cfg(h: 616, i: 120, e: 256, k: 2, act: .gelu, router: route, .fp32), 700)
        add("fp32 E=256 k=2 S=700 softmax", cfg(h: 616, i: 120, e: 256, k: 2, act: .gelu, .fp32), 700)
        add("fp32 E=320 k=3 S=300", cfg(h: 512, i: 128, e: 320, k: 3, .fp32), 300)
        add("tf32 E=256 k=2 S=400", cfg(h: 256, i: 128, e: 256, k: 2, .tf32), 400)
        // fp8 (docs/fp8.md) against the fp8 oracle: presets, K blocks that end short of 128 (H = 320, I = 208),
        // the DeepSeek router with a shared expert, capacity drops, a plain FFN with biases, one token.
        add("fp8 deepseek-v3", with(Preset.deepSeekV3.config, .fp8), 16)
        add("fp8 qwen3-30b-a3b", with(Preset.qwen3_30bA3b.config, .fp8), 129)
        add("fp8 H=320 I=208 gated", cfg(h: 320, i: 208, ffn: .gated, act: .silu, .fp8), 257)
        add("fp8 sigmoid groups + shared", cfg(h: 256, i: 128, e: 32, k: 4, ffn: .gated, act: .silu, router: deepseek,
            shared: SharedExpertConfig(intermediateSize: 256), .fp8), 129)
        add("fp8 capacity 1.0 plain bias", cfg(h: 128, i: 256, bias: true, act: .gelu, capacity: .factor(1.0), .fp8), 300)
        add("fp8 S=1", cfg(h: 256, i: 256, ffn: .gated, act: .silu, .fp8), 1)
        // Decode: at most 8 rows an expert (S·k spread over E, or S ≤ 8), so the GPU runs every expert tile as a
        // GEMV (gemv.cuh), with K blocks that end short of 128 and a plain FFN with biases.
        add("fp8 decode GEMV H=320 I=208", cfg(h: 320, i: 208, e: 16, k: 4, ffn: .gated, act: .silu, .fp8), 5)
        add("fp8 decode GEMV plain bias", cfg(h: 144, i: 272, e: 8, k: 2, bias: true, act: .gelu, .fp8), 7)
        // Sharp: one binade of E4M3 codes and a scale of its own for every block and group, so the tensor cores
        // sum GEMM0 exactly and a scale taken from the wrong block, granule, matrix or token errs by 20× the
        // tolerance or more; H = 384 (three K blocks), I = 192 (a short K block, three 64-row granules per matrix).
        add("fp8 one binade, own scales", cfg(h: 384, i: 192, ffn: .gated, act: .silu, .fp8), 64, values: .fp8OneBinade,
            tolerance: oneBinadeTolerance)
        add("fp8 one binade, own scales, decode GEMV", cfg(h: 384, i: 192, ffn: .gated, act: .silu, .fp8), 6,
            values: .fp8OneBinade, tolerance: oneBinadeTolerance)
        // Small experts in a prefill launch: 2,400 routed rows over 256 experts, so many experts have at most 8 rows
        // and, in a launch of 2,048 routed rows or more, run as tiles (TMA: one warpgroup idle), not GEMVs
        // (FMOE_GEMV_LAUNCH_ROWS, gemv.cuh); sharp, so a wrong scale on those tiles shows.
        add("fp8 one binade, own scales, small experts as tiles",
            cfg(h: 384, i: 192, e: 256, k: 8, ffn: .gated, act: .silu, .fp8), 300, values: .fp8OneBinade,
            tolerance: oneBinadeTolerance)
        // Decode at a preset's shape: one token and a full decode route task (8 tokens): the decode gate, the decode
        // prefix (one block routes, scans and places) and the decode tiles, with the preset's 128 experts.
        for s in [1, 8] { add("qwen3-30b-a3b decode S=\(s)", with(Preset.qwen3_30bA3b.config, .bf16), s) }
        return cases
    }
}
