import Testing

@testable import FlashMoE

/// The Float64 oracle against the dense formulation in `ReferenceSupport` (every expert on every token, masked
/// by a routing recomputed by sorting).
@Suite struct OracleTests {
    struct Case: CustomTestStringConvertible, Sendable {
        let config: MoEConfig
        let tokens: Int
        var testDescription: String {
            let c = config
            return "\(c.router.scoring) g\(c.router.groups) renorm=\(c.router.renormalize) \(c.ffn) bias=\(c.bias) "
                + "\(c.activation) \(c.capacity) \(c.precision) shared=\(c.sharedExpert.map { "\($0.gated)" } ?? "-") "
                + "S=\(tokens)"
        }
    }

    /// Every router × FFN kind × activation × capacity, FP32.
    static let sweep: [Case] = Fixture.routers.enumerated().flatMap { (n, router) in
        Fixture.ffns.flatMap { (ffn, bias) in
            Activation.allCases.flatMap { act in
                [Capacity.dropless, .factor(1.0)].map { cap in
                    Case(
                        config: Fixture.config(router: router, ffn: ffn, bias: bias, activation: act, capacity: cap),
                        tokens: [40, 1, 17, 33, 8][n])
                }
            }
        }
    }

    /// Shared experts (gated and not), half precisions and other shapes.
    static let extra: [Case] =
        [Fixture.routers[0], Fixture.routers[3]].flatMap { router in
            Fixture.ffns.flatMap { (ffn, bias) in
                [false, true].map { gated in
                    Case(
                        config: Fixture.config(
                            router: router, ffn: ffn, bias: bias, activation: .silu, capacity: .factor(1.0),
                            shared: SharedExpertConfig(intermediateSize: 20, gated: gated)),
                        tokens: 24)
                }
            }
        }
        + [Precision.bf16, .fp16, .tf32].flatMap { p in
            Fixture.ffns.map { (ffn, bias) in
                Case(
                    config: Fixture.config(
                        router: Fixture.routers[3], ffn: ffn, bias: bias, activation: .gelu, capacity: .dropless,
                        precision: p, shared: SharedExpertConfig(intermediateSize: 16, gated: true)),
                    tokens: 20)
            }
        }
        + [
            Case(
                config: Fixture.config(
                    router: .softmax(renormalize: true), ffn: .gated, bias: false, activation: .geluTanh,
                    capacity: .factor(0.5), hidden: 48, inner: 40, experts: 16, topK: 4),
                tokens: 37),
            Case(
                config: Fixture.config(
                    router: .deepSeek(groups: 2, groupsKept: 2, scalingFactor: 1), ffn: .plain, bias: true,
                    activation: .relu, capacity: .dropless, hidden: 16, inner: 16, experts: 4, topK: 4),
                tokens: 12),
        ]

    @Test(arguments: sweep + extra)
    func oracleMatchesDense(_ c: Case) throws {
        let layer = try Fixture.layer(c.config)
        // A larger input spread makes routing decisive and the capacity cases drop tokens.
        let x = try Fixture.input(tokens: c.tokens, hidden: c.config.hiddenSize, scale: 2)
        let oracle = try CPUBackend(layer: layer, mode: .oracle).forward(x)
        let dense = DenseReference(layer: layer, input: x)

        #expect(oracle.routing.expertIDs.map(Int.init) == dense.routing.ids)
        #expect(oracle.routing.slots.map(Int.init) == dense.routing.slots)
        #expect(oracle.routing.expertLoad == dense.routing.load)
        #expect(relativeError64(oracle.routing.weights.map(Double.init), dense.routing.weights) < 1e-6)
        #expect(oracle.output.shape == [c.tokens, c.config.hiddenSize])
        #expect(relativeError64(oracle.output.floats().map(Double.init), dense.output) < 1e-6)
    }

    /// The capacity sweep must actually drop pairs, or it would not test dropping.
    @Test func capacitySweepDrops() throws {
        var dropped = 0
        for c in Self.sweep where c.config.capacity != .dropless && c.tokens > 8 {
            let layer = try Fixture.layer(c.config)
            let x = try Fixture.input(tokens: c.tokens, hidden: c.config.hiddenSize, scale: 2)
            dropped += try CPUBackend(layer: layer, mode: .oracle).forward(x).routing.dropped
            if dropped > 0 { break }
        }
        #expect(dropped > 0)
    }

    /// The oracle's own Float64 logits agree with a direct sum.
    @Test func logitsAreFloat64Sums() throws {
        let x = try HostTensor(shape: [2, 3], float32: [1, 2, 3, 0.5, -1, 1e8])
        let r = try HostTensor(shape: [2, 3], float32: [1, 1, 1, 1e-8, 1, -1])
        let l = try Router.logits(input: x, router: r)
        // In FP32, 0.5 − 1 + 1e8 would lose the −0.5 (FP32's spacing at 1e8 is 8).
        let tiny = Double(Float(1e-8))
        #expect(l == [6, tiny + 2 - 3, 0.5 - 1 + 1e8, 0.5 * tiny - 1 - 1e8])
    }
}
