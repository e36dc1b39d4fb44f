import Testing

@testable import FlashMoE

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Routing rules on hand-made logits, through both the Float64 and the Float32 router.
@Suite struct RouterTests {
    static func config(
        experts: Int, topK: Int, router: RouterConfig = .softmax(renormalize: false), capacity: Capacity = .dropless
    ) -> MoEConfig {
        MoEConfig(hiddenSize: 4, intermediateSize: 4, experts: experts, topK: topK, router: router, capacity: capacity)
    }

    /// Routes with both precisions; they must pick the same experts and slots, and weights within FP32 rounding.
    static func route(_ logits: [Double], _ config: MoEConfig, tokens: Int = 1, bias: [Float]? = nil) throws
        -> Routing
    {
        let r64 = try Router.route(logits: logits, selectionBias: bias, config: config, tokens: tokens)
        let r32 = try Router.route(
            logits: logits.map { Float($0) }, selectionBias: bias, config: config, tokens: tokens)
        #expect(r32.expertIDs == r64.expertIDs)
        #expect(r32.slots == r64.slots)
        #expect(r32.expertLoad == r64.expertLoad)
        for (a, b) in zip(r32.weights, r64.weights) { #expect(abs(a - b) <= 1e-6 * max(1, abs(b))) }
        return r64
    }

    static func sigmoid(_ x: Double) -> Double { 1 / (1 + exp(-x)) }

    @Test func tiesGoToTheLowerIndex() throws {
        let softmax = try Self.route([1, 3, 3, 1], Self.config(experts: 4, topK: 3))
        #expect(softmax.expertIDs == [1, 2, 0])
        let sig = try Self.route(
            [1, 3, 3, 1], Self.config(experts: 4, topK: 3, router: RouterConfig(scoring: .sigmoid)))
        #expect(sig.expertIDs == [1, 2, 0])
        // Group ties: groups 0 and 1 score the same, group 0 is kept.
        let grouped = try Self.route(
            [2, 0, 0, 2, -5, -5], Self.config(experts: 6, topK: 2, router: .deepSeek(groups: 3, groupsKept: 1, scalingFactor: 1)),
            bias: [0, 0, 0, 0, 0, 0])
        #expect(grouped.expertIDs == [0, 1])
    }

    @Test func nanLogitsAreNeverSelected() throws {
        let nan = Double.nan
        let r = try Self.route([nan, 1, nan, 2], Self.config(experts: 4, topK: 3))
        #expect(r.expertIDs == [3, 1, -1])
        #expect(r.slots == [0, 0, -1])
        let z = exp(0.0) + exp(-1.0)
        #expect(abs(Double(r.weights[0]) - 1 / z) < 1e-7)
        #expect(abs(Double(r.weights[1]) - exp(-1.0) / z) < 1e-7)
        #expect(r.weights[2] == 0)
        #expect(r.expertLoad == [0, 1, 0, 1])

        let none = try Self.route(
            [nan, nan, nan, nan], Self.config(experts: 4, topK: 2, router: .softmax(renormalize: true)))
        #expect(none.expertIDs == [-1, -1] && none.weights == [0, 0] && none.slots == [-1, -1])
        let sig = try Self.route(
            [nan, nan, 0, nan], Self.config(experts: 4, topK: 2, router: RouterConfig(scoring: .sigmoid)))
        #expect(sig.expertIDs == [2, -1])
        #expect(sig.weights == [1, 0])  // 0.5 / (0.5 + 1e-20)
    }

    @Test func infiniteLogits() throws {
        let inf = Double.infinity
        let top = try Self.route([inf, 1, inf, -inf], Self.config(experts: 4, topK: 3))
        #expect(top.expertIDs == [0, 2, 1])
        #expect(top.weights == [0.5, 0.5, 0])
        let bottom = try Self.route(
            [-inf, -inf, .nan, -inf], Self.config(experts: 4, topK: 2, router: .softmax(renormalize: true)))
        #expect(bottom.expertIDs == [0, 1])
        #expect(bottom.weights == [0.5, 0.5])  // 1/3 each, renormalised
        let sig = try Self.route(
            [inf, -inf, 0, .nan], Self.config(experts: 4, topK: 3, router: RouterConfig(scoring: .sigmoid)))
        #expect(sig.expertIDs == [0, 2, 1])
        #expect(sig.weights.map { Double($0) }.elementsEqual([2.0 / 3, 1.0 / 3, 0]) { abs($0 - $1) < 1e-7 })
    }

    /// Capacity is handed out in token order; the hand-computed slots of a 4-token, 4-expert, k = 2 case.
    @Test func dropsFollowTokenOrder() throws {
        // Capacity = ceil(ceil(4/4)·2·0.5) = 1 per expert.
        let config = Self.config(experts: 4, topK: 2, capacity: .factor(0.5))
        let logits: [Double] = [2, 1, 0, -1, 1, 2, 0, -1, 2, 0, 1, -1, -1, 0, 2, 1]
        let r = try Self.route(logits, config, tokens: 4)
        #expect(r.expertIDs == [0, 1, 1, 0, 0, 2, 2, 3])
        #expect(r.slots == [0, 0, -1, -1, -1, 0, -1, 0])
        #expect(r.expertLoad == [3, 2, 2, 1])
        #expect(r.dropped == 4)
        #expect(r.expertRows == [1, 1, 1, 1])

        // k = 1, E = 2, S = 5: capacity ceil(3·1·1.0) = 3; the fourth token routed to expert 0 is dropped.
        let one = try Self.route(
            [1, 0, 1, 0, 0, 1, 1, 0, 1, 0], Self.config(experts: 2, topK: 1, capacity: .factor(1)), tokens: 5)
        #expect(one.expertIDs == [0, 0, 1, 0, 0])
        #expect(one.slots == [0, 1, 0, 2, -1])
        #expect(one.expertLoad == [4, 1])
    }

    @Test(arguments: [
        RouterConfig(scoring: .softmax, renormalize: true, scalingFactor: 2.5),
        .deepSeek(groups: 4, groupsKept: 2, scalingFactor: 2.5),
    ])
    func renormalisedWeightsSumToTheScalingFactor(_ router: RouterConfig) throws {
        let config = Self.config(experts: 8, topK: 3, router: router)
        let logits = SeededRandom(seed: 5).uniformArray(count: 8 * 20, stream: 2, scale: 3).map(Double.init)
        let bias = router.selectionBias ? SeededRandom(seed: 6).uniformArray(count: 8, stream: 3, scale: 0.2) : nil
        let r = try Self.route(logits, config, tokens: 20, bias: bias)
        for t in 0..<20 {
            let sum = r.weights[t * 3..<(t + 1) * 3].reduce(0, +)
            #expect(abs(sum - 2.5) < 1e-5)
        }
    }

    /// A hand-worked DeepSeek-V3 example. E = 8 in 4 groups of 2, 2 groups kept, k = 4, scaling 2.5.
    ///
    /// Token 0: s = sigmoid(l) ≈ [.500 .731 .881 .269 .622 .378 .818 .119]; with the bias, the choice scores are
    /// c ≈ [−.500 −.269 .881 −.231 −.378 −.622 .818 .369]. Group scores (best two): g0 = −.769, g1 = .650,
    /// g2 = −1.000, g3 = 1.187, so groups 3 and 1 are kept and experts 0, 1, 4, 5 are masked with −∞.
    /// Rounds: 2 (.881), 6 (.818), 7 (.369), then expert 3 (−.231), the only candidate left. (transformers'
    /// older masking with 0.0 would have picked expert 0, outside the kept groups.)
    ///
    /// Token 1: only experts 1, 4, 5 have a logit. g0 = c1 alone, g1 and g3 have no eligible expert (−∞), g2 =
    /// c4 + c5; g0 and g2 are kept; the fourth rank is unrouted.
    @Test func groupLimitedHandWorked() throws {
        let config = Self.config(
            experts: 8, topK: 4, router: .deepSeek(groups: 4, groupsKept: 2, scalingFactor: 2.5))
        let bias: [Float] = [-1, -1, 0, -0.5, -1, -1, 0, 0.25]
        let nan = Double.nan
        let l0: [Double] = [0, 1, 2, -1, 0.5, -0.5, 1.5, -2]
        let l1: [Double] = [nan, 5, nan, nan, 0, 0, nan, nan]
        let r = try Self.route(l0 + l1, config, tokens: 2, bias: bias)
        #expect(Array(r.expertIDs[0..<4]) == [2, 6, 7, 3])
        #expect(Array(r.expertIDs[4..<8]) == [1, 4, 5, -1])

        let s0 = [2, 6, 7, 3].map { Self.sigmoid(l0[$0]) }
        let s1 = [1, 4, 5].map { Self.sigmoid(l1[$0]) }
        let expected = s0.map { $0 / s0.reduce(0, +) * 2.5 } + s1.map { $0 / s1.reduce(0, +) * 2.5 } + [0]
        for (w, e) in zip(r.weights, expected) { #expect(abs(Double(w) - e) < 1e-6) }
        #expect(r.slots == [0, 0, 0, 0, 0, 0, 0, -1])
    }

    @Test func topKEqualsExperts() throws {
        let l: [Double] = [0.5, -1, 2, 0.25]
        let r = try Self.route(l, Self.config(experts: 4, topK: 4, router: .softmax(renormalize: true)))
        #expect(r.expertIDs == [2, 0, 3, 1])
        let z = l.reduce(0) { $0 + exp($1) }
        for (j, e) in [2, 0, 3, 1].enumerated() { #expect(abs(Double(r.weights[j]) - exp(l[e]) / z) < 1e-7) }
        #expect(abs(r.weights.reduce(0, +) - 1) < 1e-6)
    }

    /// A router that sends every token to expert 0: tokens past its capacity are dropped in token order and their
    /// outputs are zero (no shared expert, k = 1).
    @Test(arguments: CPUBackend.Mode.allCases)
    func allTokensForcedToOneExpert(_ mode: CPUBackend.Mode) throws {
        let (e, h, s) = (4, 8, 10)
        let config = MoEConfig(
            hiddenSize: h, intermediateSize: 6, experts: e, topK: 1, bias: true, router: .softmax(renormalize: true),
            capacity: .factor(1))
        var w = try MoEWeights.random(config: config, seed: 1)
        w.router = try HostTensor(
            shape: [e, h], float32: (0..<e * h).map { $0 < h ? 1 : -1 })
        let backend = try CPUBackend(layer: MoELayer(config: config, weights: w), mode: mode)
        let x = try HostTensor(
            shape: [s, h], float32: SeededRandom(seed: 2).uniformArray(count: s * h, stream: 0, scale: 0.5).map { $0 + 1 })
        let out = try backend.forward(x)
        let capacity = 3  // ceil(ceil(10/4)·1·1.0)
        #expect(out.routing.expertIDs == [Int32](repeating: 0, count: s))
        #expect(out.routing.slots == (0..<s).map { $0 < capacity ? Int32($0) : -1 })
        #expect(out.routing.expertLoad == [s, 0, 0, 0])
        #expect(out.routing.weights == [Float](repeating: 1, count: s))
        let y = out.output.floats()
        for t in 0..<s {
            let row = y[t * h..<(t + 1) * h]
            if t < capacity {
                #expect(row.contains { $0 != 0 })
            } else {
                #expect(row.allSatisfy { $0 == 0 })
            }
        }
    }

    @Test func slotsFromGivenChoices() throws {
        let config = Self.config(experts: 3, topK: 2, capacity: .factor(1))
        // S = 3: capacity ceil(1·2·1) = 2.
        let (slots, load) = try Router.assignSlots(expertIDs: [0, 1, 0, -1, 0, 2], tokens: 3, config: config)
        #expect(slots == [0, 0, 1, -1, -1, 0])
        #expect(load == [3, 1, 1])
    }
}
