import Testing
@testable import FlashMoE

/// The non-finite input rules (docs/nonfinite.md, `Router`, `MoEOutput`) on both CPU backends: a NaN or ±∞ in
/// one token's x, a NaN in one expert's weights or in one router row, and a token whose logits are finite but whose
/// FFN overflows. Never a trap; ids are in 0..<E or the documented −1; every token the fault does not reach gives
/// the same ids, weights and y bits as the run without the fault.
@Suite struct NonFiniteInputTests {
    static let (tokens, hidden) = (40, 32)
    static let faulty = 17

    /// The layers the rules are checked on: both router families, every FFN kind, shared experts, two precisions.
    static let configs: [(String, MoEConfig)] = [
        ("softmax, plain relu + biases", Fixture.config(
            router: .softmax(renormalize: true), ffn: .plain, bias: true, activation: .relu, capacity: .dropless)),
        ("softmax-norenorm, gated silu, bf16", Fixture.config(
            router: .softmax(renormalize: false), ffn: .gated, bias: false, activation: .silu, capacity: .dropless,
            precision: .bf16)),
        ("sigmoid groups + bias + shared", Fixture.config(
            router: .deepSeek(groups: 4, groupsKept: 2, scalingFactor: 2.5), ffn: .gated, bias: false,
            activation: .silu, capacity: .dropless, shared: SharedExpertConfig(intermediateSize: 16, gated: false))),
        ("softmax, gated gelu + gated shared, k = 3", Fixture.config(
            router: .softmax(renormalize: true), ffn: .gated, bias: false, activation: .gelu, capacity: .dropless,
            shared: SharedExpertConfig(intermediateSize: 16, gated: true), topK: 3)),
    ]

    static let cases = Array(configs.indices)

    /// x with `value` written into token `faulty`'s element 5 (or the whole row scaled, for `scale`).
    static func input(_ c: MoEConfig, value: Float? = nil, scale: Float? = nil) throws -> HostTensor {
        var v = try Fixture.input(tokens: tokens, hidden: hidden).floats()
        if let value { v[faulty * hidden + 5] = value }
        if let scale { for h in 0..<hidden { v[faulty * hidden + h] *= scale } }
        return try HostTensor(shape: [tokens, hidden], values: v, as: c.precision.storage)
    }

    /// `tensor` with element `index` replaced by `value` (same element type).
    static func replacing(_ tensor: HostTensor, _ index: Int, with value: Float) throws -> HostTensor {
        var v = tensor.floats()
        v[index] = value
        return try HostTensor(shape: tensor.shape, values: v, as: tensor.elementType)
    }

    static func run(_ layer: MoELayer, _ mode: CPUBackend.Mode, _ x: HostTensor) throws -> MoEOutput {
        try CPUBackend(layer: layer, mode: mode).forward(x)
    }

    /// Ids lie in 0..<E or are −1 with weight 0 and slot −1; a −1 is never followed by a routed rank.
    static func checkIDs(_ out: MoEOutput, experts: Int) {
        let r = out.routing
        for p in 0..<r.expertIDs.count {
            let id = r.expertIDs[p]
            #expect(id == -1 || (0..<Int32(experts)).contains(id), "pair \(p): id \(id)")
            if id == -1 { #expect(r.weights[p] == 0 && r.slots[p] == -1) }
            if id >= 0 { #expect(r.weights[p].isFinite, "pair \(p): weight \(r.weights[p])") }
            if p % r.topK > 0, r.expertIDs[p - 1] == -1 { #expect(id == -1, "a routed rank after an unrouted one") }
        }
    }

    /// Token t's ids, weight bits and y bits are the same in both outputs.
    static func same(_ a: MoEOutput, _ b: MoEOutput, token t: Int) -> Bool {
        let (k, h) = (a.routing.topK, a.output.shape[1])
        let ya = a.output.floats(), yb = b.output.floats()
        return (0..<k).allSatisfy {
            a.routing.expertIDs[t * k + $0] == b.routing.expertIDs[t * k + $0]
                && a.routing.weights[t * k + $0].bitPattern == b.routing.weights[t * k + $0].bitPattern
        } && (0..<h).allSatisfy { ya[t * h + $0].bitPattern == yb[t * h + $0].bitPattern }
    }

    static func row(_ out: MoEOutput, _ t: Int) -> ArraySlice<Float> {
        let h = out.output.shape[1]
        return out.output.floats()[(t * h)..<((t + 1) * h)]
    }

    /// NaN anywhere in a token's x: every logit is NaN, so the token is unrouted (ids −1, weights 0, no expert
    /// runs it); y is 0 without a shared expert and NaN with one (the shared expert runs on every token).
    @Test(arguments: cases, CPUBackend.Mode.allCases)
    func nanInOneTokensInput(_ c: Int, _ mode: CPUBackend.Mode) throws {
        let (name, config) = Self.configs[c]
        let layer = try Fixture.layer(config)
        let clean = try Self.run(layer, mode, Self.input(config))
        let out = try Self.run(layer, mode, Self.input(config, value: .nan))
        Self.checkIDs(out, experts: config.experts)
        let k = config.topK
        #expect(out.routing.expertIDs[(Self.faulty * k)..<((Self.faulty + 1) * k)].allSatisfy { $0 == -1 }, "\(name)")
        let y = Self.row(out, Self.faulty)
        if config.sharedExpert == nil {
            #expect(y.allSatisfy { $0 == 0 }, "\(name): y of an unrouted token without a shared expert is 0")
        } else {
            #expect(y.allSatisfy { $0.isNaN }, "\(name): the shared expert carries the NaN")
        }
        for t in 0..<Self.tokens where t != Self.faulty {
            #expect(Self.same(out, clean, token: t), "\(name), \(mode): token \(t) changed")
        }
        // The load counts only routed pairs: the clean load minus the faulty token's experts.
        let expected = (0..<config.experts).map { e in
            clean.routing.expertLoad[e]
                - clean.routing.expertIDs[(Self.faulty * k)..<((Self.faulty + 1) * k)].filter { $0 == e }.count
        }
        #expect(out.routing.expertLoad == expected)
    }

    /// ±∞ in a token's x: its logits are ±∞ or NaN (∞·0, ∞ − ∞). It is routed by the same rules (a +∞ logit
    /// takes the softmax probability, split among ties; NaN logits are ineligible) and its y is whatever IEEE
    /// arithmetic gives (usually non-finite). Every other token is unchanged.
    @Test(arguments: cases, CPUBackend.Mode.allCases)
    func infinityInOneTokensInput(_ c: Int, _ mode: CPUBackend.Mode) throws {
        let (name, config) = Self.configs[c]
        let layer = try Fixture.layer(config)
        let clean = try Self.run(layer, mode, Self.input(config))
        for value in [Float.infinity, -.infinity] {
            let out = try Self.run(layer, mode, Self.input(config, value: value))
            Self.checkIDs(out, experts: config.experts)
            for t in 0..<Self.tokens where t != Self.faulty {
                #expect(Self.same(out, clean, token: t), "\(name), \(mode), x = \(value): token \(t) changed")
            }
        }
    }

    /// NaN in one expert's first-layer weights: every token with a kept pair on that expert gets y = NaN in every
    /// element (0·NaN is NaN: a kept pair contributes even with weight 0); routing is unchanged; every other token
    /// is unchanged.
    @Test(arguments: cases, CPUBackend.Mode.allCases)
    func nanInOneExpertsWeights(_ c: Int, _ mode: CPUBackend.Mode) throws {
        let (name, config) = Self.configs[c]
        let layer = try Fixture.layer(config)
        let x = try Self.input(config)
        let clean = try Self.run(layer, mode, x)
        let bad = clean.routing.expertIDs[0]  // an expert token 0 uses
        var weights = layer.weights
        weights.w1 = try Self.replacing(weights.w1, Int(bad) * config.intermediateSize * config.hiddenSize + 3, with: .nan)
        let out = try Self.run(MoELayer(config: config, weights: weights), mode, x)
        #expect(out.routing.expertIDs == clean.routing.expertIDs && out.routing.slots == clean.routing.slots)
        let k = config.topK
        for t in 0..<Self.tokens {
            let uses = (0..<k).contains { clean.routing.expertIDs[t * k + $0] == bad && clean.routing.slots[t * k + $0] >= 0 }
            if uses {
                #expect(Self.row(out, t).allSatisfy { $0.isNaN }, "\(name), \(mode): token \(t) uses expert \(bad)")
            } else {
                #expect(Self.same(out, clean, token: t), "\(name), \(mode): token \(t) changed")
            }
        }
    }

    /// NaN in one router row: that expert's logit is NaN for every token, so it is never chosen; with k = E the
    /// last rank of every token is unrouted. Nothing else is non-finite.
    @Test(arguments: CPUBackend.Mode.allCases, [2, 8])
    func nanInOneRouterRow(_ mode: CPUBackend.Mode, _ topK: Int) throws {
        for (name, base) in Self.configs {
            var config = base
            config.topK = topK
            if config.router.groups > 1 { config.router.groupsKept = config.router.groups }  // k = E reachable
            var weights = try MoEWeights.random(config: config, seed: 7)
            let bad = 3
            weights.router = try Self.replacing(weights.router, bad * config.hiddenSize + 1, with: .nan)
            let out = try Self.run(MoELayer(config: config, weights: weights), mode, Self.input(config))
            Self.checkIDs(out, experts: config.experts)
            #expect(!out.routing.expertIDs.contains(Int32(bad)), "\(name): expert \(bad) chosen")
            #expect(out.routing.expertLoad[bad] == 0)
            if topK == config.experts {
                for t in 0..<Self.tokens { #expect(out.routing.expertIDs[t * topK + topK - 1] == -1) }
            }
            #expect(out.output.floats().allSatisfy { $0.isFinite }, "\(name), \(mode)")
        }
    }

    /// A token whose logits are finite but whose FFN overflows (x scaled by 10²⁰: logits ~10²⁰, gated FFN
    /// ~10⁴⁰): it is routed normally (ids in range, finite weights) and its y is non-finite (±∞ or NaN; which one
    /// may differ between backends). Every other token is unchanged.
    @Test(arguments: CPUBackend.Mode.allCases)
    func ffnOverflowWithFiniteLogits(_ mode: CPUBackend.Mode) throws {
        for (name, config) in Self.configs where config.ffn == .gated {
            let layer = try Fixture.layer(config)
            let clean = try Self.run(layer, mode, Self.input(config))
            let x = try Self.input(config, scale: 1e20)
            let logits = try Router.logits(input: x, router: layer.weights.router)
            let e = config.experts
            #expect(logits[(Self.faulty * e)..<((Self.faulty + 1) * e)].allSatisfy { $0.isFinite }, "\(name)")
            let out = try Self.run(layer, mode, x)
            Self.checkIDs(out, experts: config.experts)
            let k = config.topK
            #expect(out.routing.expertIDs[(Self.faulty * k)..<((Self.faulty + 1) * k)].allSatisfy { $0 >= 0 })
            #expect(Self.row(out, Self.faulty).contains { !$0.isFinite }, "\(name), \(mode): y is finite")
            for t in 0..<Self.tokens where t != Self.faulty {
                #expect(Self.same(out, clean, token: t), "\(name), \(mode): token \(t) changed")
            }
        }
    }

    /// The faulted token itself is the same on both CPU backends (FP32 and Float64 arithmetic): NaN and ±∞ logits
    /// are the same whatever the precision, so the ids are equal, the weights equal to rounding, and every element
    /// of y is NaN, +∞, −∞ or finite alike.
    @Test(arguments: cases)
    func faultedTokenIsTheSameOnBothCPUBackends(_ c: Int) throws {
        let (name, config) = Self.configs[c]
        let layer = try Fixture.layer(config)
        func kind(_ v: Float) -> Int { v.isNaN ? 0 : v == .infinity ? 1 : v == -.infinity ? 2 : 3 }
        for value in [Float.nan, .infinity, -.infinity] {
            let x = try Self.input(config, value: value)
            let fast = try Self.run(layer, .fast, x), oracle = try Self.run(layer, .oracle, x)
            let k = config.topK, t = Self.faulty
            let ids = (t * k)..<((t + 1) * k)
            #expect(fast.routing.expertIDs[ids] == oracle.routing.expertIDs[ids], "\(name), x = \(value)")
            for p in ids { #expect(abs(fast.routing.weights[p] - oracle.routing.weights[p]) <= 1e-6) }
            #expect(Self.row(fast, t).map(kind) == Self.row(oracle, t).map(kind), "\(name), x = \(value)")
        }
    }

    /// With a capacity, an unrouted token frees its slots: a pair kept in the clean run stays kept, so every token
    /// whose pairs were all kept is unchanged (tokens that had drops may gain a slot).
    @Test(arguments: CPUBackend.Mode.allCases)
    func capacityKeepsEveryKeptToken(_ mode: CPUBackend.Mode) throws {
        var config = Self.configs[0].1
        config.capacity = .factor(1.0)
        let layer = try Fixture.layer(config)
        let clean = try Self.run(layer, mode, Self.input(config))
        let out = try Self.run(layer, mode, Self.input(config, value: .nan))
        #expect(clean.routing.dropped > 0, "the case needs drops to mean anything")
        let k = config.topK
        for t in 0..<Self.tokens where t != Self.faulty {
            let allKept = (0..<k).allSatisfy { clean.routing.slots[t * k + $0] >= 0 }
            if allKept { #expect(Self.same(out, clean, token: t), "\(mode): token \(t) changed") }
            for j in 0..<k where clean.routing.slots[t * k + j] >= 0 { #expect(out.routing.slots[t * k + j] >= 0) }
        }
    }
}

/// The GPU operators refuse a non-finite selection bias as the CPU backend does (docs/nonfinite.md), before any
/// CUDA call, so this runs without a GPU.
@Suite struct NonFiniteSelectionBiasTests {
    static func layer(bias value: Float) throws -> MoELayer {
        let c = NonFiniteInputTests.configs[2].1  // the sigmoid router with a selection bias
        var w = try MoEWeights.random(config: c, seed: 5)
        var bias = [Float](repeating: 0.25, count: c.experts)
        bias[1] = value
        w.selectionBias = try HostTensor(shape: [c.experts], float32: bias)
        return try MoELayer(config: c, weights: w)
    }

    @Test(arguments: [Float.nan, .infinity, -.infinity])
    func fusedOperatorsRefuseIt(_ value: Float) throws {
        let l = try Self.layer(bias: value)
        for make in [{ _ = try FusedMoE(layer: l) }, { _ = try DistributedMoE(layer: l, ranks: 2) }] {
            #expect(throws: MoEError.self) { try make() }
            do { try make() } catch let e as MoEError { #expect(e.message.contains("selection bias must be finite")) }
        }
    }
}
