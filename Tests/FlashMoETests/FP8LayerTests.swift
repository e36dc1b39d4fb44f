import Testing
@testable import FlashMoE

/// Precision fp8 on whole layers (docs/fp8.md): the oracle against a naive single-expert computation of the same
/// definition, the fast CPU path against the oracle within `Precision.fp8.tolerance`, the error against the BF16
/// oracle, and the non-finite rules.
@Suite struct FP8LayerTests {
    static func config(
        ffn: FFNKind = .gated, bias: Bool = false, hidden: Int = 256, inner: Int = 192, experts: Int = 8,
        topK: Int = 2, router: RouterConfig = .softmax(renormalize: true), shared: SharedExpertConfig? = nil,
        precision: Precision = .fp8
    ) -> MoEConfig {
        MoEConfig(
            hiddenSize: hidden, intermediateSize: inner, experts: experts, topK: topK, ffn: ffn, bias: bias,
            activation: .silu, router: router, sharedExpert: shared, precision: precision)
    }

    /// The same random BF16 weights as an fp8 layer and a bf16 layer.
    static func layers(_ c: MoEConfig, seed: UInt64 = 11) throws -> (fp8: MoELayer, bf16: MoELayer) {
        var b = c
        b.precision = .bf16
        let w = try MoEWeights.random(config: b, seed: seed)
        return (try MoELayer(config: c, weights: w), try MoELayer(config: b, weights: w))
    }

    static let shapes: [(String, MoEConfig)] = [
        ("gated, K = 256 and 192", config()),
        ("plain + biases, H = 200, I = 136", config(ffn: .plain, bias: true, hidden: 200, inner: 136)),
        ("deepseek router + shared", config(
            router: .deepSeek(groups: 4, groupsKept: 2, scalingFactor: 2.5),
            shared: SharedExpertConfig(intermediateSize: 64, gated: false))),
    ]

    @Test(arguments: shapes.indices) func fastMatchesOracleAndBF16IsClose(_ index: Int) throws {
        let (name, c) = Self.shapes[index]
        let (fp8, bf16) = try Self.layers(c)
        let x = try Fixture.input(tokens: 96, hidden: c.hiddenSize, as: .bfloat16)
        let oracle = try CPUBackend(layer: fp8, mode: .oracle).forward(x)
        let fast = try CPUBackend(layer: fp8, mode: .fast).forward(x)
        let reference = try CPUBackend(layer: bf16, mode: .oracle).forward(x)
        let fastError = relativeError(fast.output.floats(), oracle.output.floats())
        let bf16Error = relativeError(oracle.output.floats(), reference.output.floats())
        print("fp8 \(name): fast vs fp8 oracle \(fastError), fp8 oracle vs bf16 oracle \(bf16Error)")
        #expect(fastError <= Precision.fp8.tolerance, "\(name)")
        #expect(bf16Error < 0.08, "\(name): E4M3 with per-block scales keeps a few percent")
        #expect(bf16Error > 1e-3, "\(name): the fp8 oracle must actually quantize")
        #expect(oracle.routing.expertIDs == reference.routing.expertIDs, "the BF16 router is the same")
        #expect(fast.routing.expertIDs == oracle.routing.expertIDs)
    }

    /// One expert, k = 1 (weight 1): y = the FFN, recomputed here element by element from the definition.
    @Test func oracleIsTheDefinition() throws {
        let c = Self.config(hidden: 160, inner: 136, experts: 1, topK: 1)
        let (layer, _) = try Self.layers(c, seed: 4)
        let x = try Fixture.input(tokens: 3, hidden: 160, scale: 3, as: .bfloat16)
        let y = try CPUBackend(layer: layer, mode: .oracle).forward(x).output.floats()
        let w = layer.weights.prepared(for: .fp8)
        let (w1, w3, w2) = (try #require(w.w1.fp8Blocks), try #require(w.w3?.fp8Blocks), try #require(w.w2.fp8Blocks))
        func quantized(_ row: [Float]) -> (q: [Double], s: [Double]) {
            var q: [Double] = [], s: [Double] = []
            for start in stride(from: 0, to: row.count, by: 128) {
                let group = row[start..<min(row.count, start + 128)]
                let amax = group.map(\.magnitude).max()!
                let scale = amax > 0 ? amax / 448 : 1
                s.append(Double(scale))
                q += group.map { Double(FP8E4M3(saturating: $0 / scale).float) }
            }
            return (q, s)
        }
        /// Σ_j (Σ_{k in block j} q[k]·code(W[row, k])) · s[j] · scale(W, row, j).
        func gemm(_ a: (q: [Double], s: [Double]), _ wb: FP8Blocks, row: Int) -> Double {
            var total = 0.0
            for (j, start) in stride(from: 0, to: wb.cols, by: 128).enumerated() {
                var partial = 0.0
                for k in start..<min(wb.cols, start + 128) { partial += a.q[k] * wb.codes[row * wb.cols + k].double }
                total += partial * (a.s[j] * Double(wb.scale(at: row * wb.cols + start)))
            }
            return total
        }
        let xs = x.floats()
        for t in 0..<3 {
            let qx = quantized(Array(xs[(t * 160)..<((t + 1) * 160)]))
            let h = (0..<136).map { i in
                BFloat16(Activation.silu.apply(gemm(qx, w1, row: i)) * gemm(qx, w3, row: i)).float
            }
            let qh = quantized(h)
            for c in 0..<160 {
                #expect(y[t * 160 + c] == Float(gemm(qh, w2, row: c)), "token \(t), element \(c)")
            }
        }
    }

    @Test func weightsAreQuantizedOnce() throws {
        let c = Self.config(hidden: 128, inner: 128, experts: 4)
        let random = try MoEWeights.random(config: c, seed: 2)
        #expect(random.w1.elementType == .float8E4M3 && random.w2.elementType == .float8E4M3)
        #expect(random.router.elementType == .bfloat16, "the router stays BF16")
        let (fp8, _) = try Self.layers(c, seed: 2)
        #expect(fp8.weights.w1.elementType == .bfloat16)
        #expect(fp8.weights.prepared(for: .fp8).w1 == random.w1, "the same BF16 values quantize to the same blocks")
        let x = try Fixture.input(tokens: 20, hidden: 128, as: .bfloat16)
        for mode in CPUBackend.Mode.allCases {
            let a = try CPUBackend(layer: fp8, mode: mode).forward(x).output.floats()
            let b = try CPUBackend(layer: MoELayer(config: c, weights: random), mode: mode).forward(x).output.floats()
            #expect(a.map(\.bitPattern) == b.map(\.bitPattern), "\(mode)")
        }
    }

    @Test(arguments: CPUBackend.Mode.allCases) func nonFiniteRules(_ mode: CPUBackend.Mode) throws {
        let c = Self.config(hidden: 128, inner: 128, experts: 4)
        let (layer, _) = try Self.layers(c)
        let (s, h, k, faulty) = (24, 128, 2, 9)
        let clean = try Fixture.input(tokens: s, hidden: h, as: .bfloat16)
        let base = try CPUBackend(layer: layer, mode: mode).forward(clean)
        func with(_ value: Float) throws -> MoEOutput {
            var v = clean.floats()
            v[faulty * h + 5] = value
            return try CPUBackend(layer: layer, mode: mode).forward(HostTensor(shape: [s, h], values: v, as: .bfloat16))
        }
        func othersUnchanged(_ out: MoEOutput) {
            let (a, b) = (out.output.floats(), base.output.floats())
            for t in 0..<s where t != faulty {
                #expect(a[(t * h)..<((t + 1) * h)].map(\.bitPattern) == b[(t * h)..<((t + 1) * h)].map(\.bitPattern))
                #expect(out.routing.expertIDs[(t * k)..<((t + 1) * k)] == base.routing.expertIDs[(t * k)..<((t + 1) * k)])
            }
        }
        let nan = try with(.nan)
        #expect(nan.routing.expertIDs[(faulty * k)..<((faulty + 1) * k)].allSatisfy { $0 == -1 })
        #expect(nan.output.floats()[(faulty * h)..<((faulty + 1) * h)].allSatisfy { $0 == 0 })
        othersUnchanged(nan)
        // +∞ in x saturates to its group's largest code: the token stays finite or not, but no other token moves.
        othersUnchanged(try with(.infinity))
        // NaN in expert e's w1 reaches exactly the tokens with a kept pair on e.
        var w = layer.weights
        var w1 = w.w1.floats()
        let e = Int(base.routing.expertIDs[0])
        w1[e * 128 * 128 + 7] = .nan
        w.w1 = try HostTensor(shape: w.w1.shape, values: w1, as: .bfloat16)
        let out = try CPUBackend(layer: MoELayer(config: c, weights: w), mode: mode).forward(clean)
        let y = out.output.floats()
        for t in 0..<s {
            let onE = (0..<k).contains { base.routing.expertIDs[t * k + $0] == e && base.routing.slots[t * k + $0] >= 0 }
            let row = y[(t * h)..<((t + 1) * h)]
            #expect(onE ? row.allSatisfy(\.isNaN) : row.allSatisfy(\.isFinite), "token \(t)")
        }
    }
}
