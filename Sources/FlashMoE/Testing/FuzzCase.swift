/// One case of `flashmoe fuzz`: a layer shape from the run's pool, a token count (split over ranks when the shape
/// has them), a capacity rule, a tie pattern and the seed of its weights and input.
///
/// A case is a pure function of (run seed, case index): `FuzzCase(seed: S, index: I)` is the same layer, weights
/// and input on every machine, so `flashmoe fuzz --seed S --case I` replays it. Token counts lean to the edges
/// (0, 1, tile ± 1, the gate's split limits at 128 × SMs ± 1, 65,536) and are capped by `FuzzBudget`, so large H
/// and I come with few tokens and large S with small H and I.
public struct FuzzCase: Sendable, Hashable {
    /// How the router makes exact ties.
    public enum Ties: Sendable, Hashable {
        /// Random router weights: ties only by chance.
        case none
        /// One dominant router row: every token goes to this expert first; the other rows are zero, so the other
        /// ranks are exact ties that the lower index must win (`VerificationCase.forcedExpert`).
        case forced(expert: Int)
        /// Router row 2j+1 is a copy of row 2j: every token sees exact ties between the experts of each pair.
        case duplicatedRows
    }

    /// The run seed.
    public let seed: UInt64
    /// The case index in the run.
    public let index: Int
    /// Which shape of the run's pool (`FuzzShape(seed:index:)`).
    public let shapeIndex: Int
    /// That shape (`FuzzShape(seed: seed, index: shapeIndex)`).
    public let shape: FuzzShape
    /// The shape's layer with this case's capacity rule.
    public let config: MoEConfig
    /// Tokens of each rank (one entry for the single-GPU operator); zeros allowed.
    public let tokensPerRank: [Int]
    /// With ranks: kernel launches the ranks are split over, side by side on one GPU (1 or 2).
    public let launches: Int
    /// How the case's router makes exact ties.
    public let ties: Ties
    /// The seed of the weights and the input (`Verifier.makeProblem`).
    public let problemSeed: UInt64
    /// Whether the case had the large FLOP budget.
    public let large: Bool

    /// Case `index` of run `seed`; `fp8`: the run's shape pool has fp8 shapes (`FuzzShape(seed:index:fp8:)`).
    public init(seed: UInt64, index: Int, fp8: Bool = false) {
        var r = FuzzRandom(seed, UInt64(index), 0xCA5E)
        self.seed = seed
        self.index = index
        shapeIndex = r.int(0...FuzzShape.poolSize - 1)
        shape = FuzzShape(seed: seed, index: shapeIndex, fp8: fp8)
        // Tiny shapes are the only ones that reach tens of thousands of tokens: give them the large budget more.
        large = r.chance(shape.size == .tiny ? 0.15 : FuzzBudget.largeShare)
        let budget = large ? FuzzBudget.largeFlops : FuzzBudget.flops
        let cap = max(1, min(FuzzBudget.maxTokens, Int(budget / shape.flopsPerToken)))
        let edges = Self.tokenEdges.filter { $0 <= cap }
        let s: Int
        switch r.unit() {
        case ..<0.45: s = r.pick(edges)
        case ..<0.6: s = r.int(0...min(cap, 16))
        default: s = r.logUniform(1...cap)
        }

        var config = shape.config
        if !r.chance(0.5) {
            config.capacity = .factor(r.chance(0.6) ? r.pick([0.25, 0.5, 0.75, 1.0, 1.25, 2.0]) : Double(r.int(10...300)) / 100)
        }
        self.config = config
        let e = config.experts
        switch r.unit() {
        case ..<0.1: ties = .forced(expert: r.int(0...e - 1))
        case ..<0.18 where shape.ranks == nil && e >= 2: ties = .duplicatedRows
        default: ties = .none
        }
        if let ranks = shape.ranks {
            tokensPerRank = Self.split(s, over: ranks, &r)
            launches = ranks >= 2 && r.chance(0.25) ? 2 : 1
        } else {
            tokensPerRank = [s]
            launches = 1
        }
        problemSeed = r.next()
    }

    /// Token counts every run leans to: empty, one, the 128-token tiles ± 1, and the gate's split limit
    /// (128 × blocks) ± 1 for 108 (A100) and 132 (H100/H200) single-block SMs and twice that.
    public static let tokenEdges = [
        0, 1, 2, 7, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025, 13823, 13824, 13825, 16895, 16896, 16897, 33791,
        33792, 33793, 65535, 65536,
    ]

    /// `s` tokens over `ranks` ranks: even, random cuts, all on one rank, or random shares with empty ranks.
    static func split(_ s: Int, over ranks: Int, _ r: inout FuzzRandom) -> [Int] {
        switch r.int(0...3) {
        case 0: return (0..<ranks).map { s * ($0 + 1) / ranks - s * $0 / ranks }
        case 1:
            let cuts = [0] + (0..<ranks - 1).map { _ in r.int(0...s) }.sorted() + [s]
            return (0..<ranks).map { cuts[$0 + 1] - cuts[$0] }
        case 2:
            let only = r.int(0...ranks - 1)
            return (0..<ranks).map { $0 == only ? s : 0 }
        default:
            var shares = (0..<ranks).map { _ in r.chance(0.35) ? 0 : r.int(1...10) }
            if shares.allSatisfy({ $0 == 0 }) { shares[r.int(0...ranks - 1)] = 1 }
            let total = shares.reduce(0, +)
            var prefix = 0
            return shares.map { share in
                let lo = s * prefix / total
                prefix += share
                return s * prefix / total - lo
            }
        }
    }

    /// All tokens.
    public var tokens: Int { tokensPerRank.reduce(0, +) }

    /// The oracle's floating-point operations for this case (`FuzzShape.flopsPerToken` per token).
    public var oracleFlops: Double { Double(tokens) * shape.flopsPerToken }

    /// Elements of the layer's weight matrices (routed experts, router, shared expert).
    public var weightElements: Int {
        let c = config, matrices = c.ffn == .gated ? 3 : 2
        let shared = c.sharedExpert.map { $0.intermediateSize * c.hiddenSize * matrices } ?? 0
        return c.experts * c.hiddenSize * (1 + c.intermediateSize * matrices) + shared
    }

    /// Whether the case fits `FuzzBudget.quick`: what the debug-built test suite runs.
    public var isQuick: Bool {
        oracleFlops <= FuzzBudget.quick.flops && weightElements <= FuzzBudget.quick.weightElements
    }

    /// The expert every token is sent to first, for `.forced`.
    public var forcedExpert: Int? {
        if case .forced(let e) = ties { e } else { nil }
    }

    /// The case as a verifier case (all tokens on one rank).
    public var verificationCase: VerificationCase {
        VerificationCase(
            name: "fuzz case \(index)", config: config, tokens: tokens, seed: problemSeed, forcedExpert: forcedExpert)
    }

    /// The case as a ranks case (one forward, `launches` launches), when the shape has ranks.
    public var rankCase: RankVerificationCase? {
        guard shape.ranks != nil else { return nil }
        return RankVerificationCase(
            name: "fuzz case \(index)", config: config, tokensPerRank: tokensPerRank, seed: problemSeed,
            forcedExpert: forcedExpert, launches: launches, storageReturns: shape.storageRows)
    }

    /// The layer and input: `Verifier.makeProblem`'s, with duplicated router rows for `.duplicatedRows`.
    public func makeProblem() throws -> (MoELayer, HostTensor) {
        let (layer, x) = try Verifier.makeProblem(verificationCase)
        guard ties == .duplicatedRows else { return (layer, x) }
        let (e, h) = (config.experts, config.hiddenSize)
        var rows = layer.weights.router.floats()
        for odd in stride(from: 1, to: e, by: 2) {
            for c in 0..<h { rows[odd * h + c] = rows[(odd - 1) * h + c] }
        }
        var weights = layer.weights
        weights.router = try HostTensor(shape: [e, h], values: rows, as: weights.router.elementType)
        return (try MoELayer(config: config, weights: weights), x)
    }

    /// One line: the layer, the tokens (per rank), capacity and ties.
    public var summary: String {
        let c = config
        var parts = ["E=\(c.experts) k=\(c.topK) H=\(c.hiddenSize) I=\(c.intermediateSize)"]
        parts.append(c.ffn == .gated ? "gated" : c.bias ? "plain+bias" : "plain")
        parts.append(c.activation.rawValue)
        var router = c.router.scoring == .softmax ? "softmax" : "sigmoid"
        if c.router.groups > 1 { router += " groups \(c.router.groupsKept)/\(c.router.groups)" }
        if c.router.selectionBias { router += " +bias" }
        router += c.router.renormalize ? " renorm" : " no-renorm"
        if c.router.scalingFactor != 1 { router += " ×\(c.router.scalingFactor)" }
        parts.append(router)
        if let s = c.sharedExpert { parts.append("shared I=\(s.intermediateSize)" + (s.gated ? " gated" : "")) }
        parts.append(c.precision.rawValue + (shape.storageRows ? " (storage rows)" : ""))
        parts.append(c.capacity.description)
        if let ranks = shape.ranks {
            parts.append("S=\(tokens) over R=\(ranks) \(tokensPerRank)" + (launches > 1 ? " in \(launches) launches" : ""))
        } else {
            parts.append("S=\(tokens)")
        }
        switch ties {
        case .none: break
        case .forced(let e): parts.append("all tokens to expert \(e)")
        case .duplicatedRows: parts.append("duplicated router rows")
        }
        return parts.joined(separator: ", ")
    }
}

/// The outcome of one fuzz case.
public struct FuzzOutcome: Sendable {
    /// The case that ran.
    public let fuzzCase: FuzzCase
    /// ‖y − y_oracle‖ / ‖y_oracle‖ (see `VerificationResult.relativeError`).
    public let relativeError: Double
    /// Why it failed, or nil.
    public let failure: String?

    /// Whether the case passed (no `failure`).
    public var passed: Bool { failure == nil }
}

extension FuzzCase {
    /// Runs the case against the Float64 oracle with `flashmoe verify`'s checks (`Verifier.run`, `runRanks`).
    ///
    /// - Parameters:
    ///   - makeOperator: the backend under test for one rank (the fast CPU path, the GPU operator), with the
    ///     shape's storage rows (`FuzzShape.storageRows`) when it has them.
    ///   - runRanks: runs a ranks case (the GPU's `Verifier.runRanks`); without it a shape with ranks runs all
    ///     its tokens on `makeOperator`'s backend (the CPU has no ranks).
    /// - Throws: only when the case cannot run at all (a driver error, an unsupported shape); a wrong result is
    ///   a failed outcome.
    public func run(
        makeOperator: (MoELayer) throws -> any MoEBackend,
        runRanks: ((RankVerificationCase) throws -> RankVerificationResult)? = nil
    ) throws -> FuzzOutcome {
        if let rankCase, let runRanks {
            let r = try runRanks(rankCase)
            return FuzzOutcome(fuzzCase: self, relativeError: r.oracle.relativeError, failure: r.failure)
        }
        let (layer, x) = try makeProblem()
        let r = try Verifier.run(verificationCase, layer: layer, input: x, makeOperator: makeOperator)
        return FuzzOutcome(fuzzCase: self, relativeError: r.relativeError, failure: r.failure)
    }
}
