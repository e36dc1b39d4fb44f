/// One expert's FFN matrices inside the layer's weight stacks (a routed expert, or the shared expert at index 0).
struct FFNMatrices: Sendable {
    /// [·, inner, H]: plain first linear or gate projection.
    let w1: HostTensor
    /// [·, inner, H]: gated FFN only, the up projection.
    let w3: HostTensor?
    /// [·, H, inner].
    let w2: HostTensor
    /// [·, inner] FP32 (plain FFN with biases only).
    let b1: HostTensor?
    /// [·, H] FP32 (plain FFN with biases only).
    let b2: HostTensor?
    /// Which matrix of the stacks.
    let index: Int
    /// The intermediate size of this FFN.
    let inner: Int
}

/// The Float64 reference forward pass: every sum in Float64, the result rounded once to FP32.
///
/// Work is spread over cores inside each expert (over its output features), so the result does not depend on
/// the thread count.
struct OracleEngine: Sendable {
    let config: MoEConfig
    /// Every matrix rounded to the precision's storage type, once (fp8: the experts' matrices quantized instead).
    let weights: MoEWeights
    let selectionBias: [Float]?

    init(layer: MoELayer) {
        config = layer.config
        weights = layer.weights.prepared(for: layer.config.precision)
        selectionBias = layer.weights.selectionBias?.floats()
    }

    func forward(_ input: HostTensor) throws(MoEError) -> MoEOutput {
        let (s, h, k, e) = (input.shape[0], config.hiddenSize, config.topK, config.experts)
        let xs = input.converted(to: config.precision.storage)
        let logits = try Router.logits(input: xs, router: weights.router)
        let (routing, combine) = try Router.routeDetailed(
            logits: logits, selectionBias: selectionBias, config: config, tokens: s)
        let x = xs.floats().map(Double.init)

        // Each kept (token, rank) pair's expert output, computed expert by expert in slot order.
        var pairsOf = [[Int]](repeating: [], count: e)
        for p in 0..<s * k where routing.slots[p] >= 0 { pairsOf[Int(routing.expertIDs[p])].append(p) }
        var pairOut = [Double](repeating: 0, count: s * k * h)
        for ex in 0..<e where !pairsOf[ex].isEmpty {
            let m = FFNMatrices(
                w1: weights.w1, w3: weights.w3, w2: weights.w2, b1: weights.b1, b2: weights.b2, index: ex,
                inner: config.intermediateSize)
            let rows = pairsOf[ex].map { $0 / k }
            let out = config.precision == .fp8 ? ffnFP8(m, tokens: rows, x: x) : ffn(m, tokens: rows, x: x)
            for (r, p) in pairsOf[ex].enumerated() {
                for c in 0..<h { pairOut[p * h + c] = out[r * h + c] }
            }
        }

        var shared: [Double]? = nil
        var sharedGate = [Double](repeating: 1, count: s)
        if let sc = config.sharedExpert, let sw = weights.shared {
            let m = FFNMatrices(
                w1: sw.w1, w3: sw.w3, w2: sw.w2, b1: nil, b2: nil, index: 0, inner: sc.intermediateSize)
            shared = ffn(m, tokens: Array(0..<s), x: x)
            if sc.gated, let gate = sw.gate {
                let g = gate.floats().map(Double.init)
                for t in 0..<s {
                    let z = x.withUnsafeBufferPointer { xb in
                        g.withUnsafeBufferPointer { dotFloat64(xb.baseAddress! + t * h, $0.baseAddress!, h) }
                    }
                    sharedGate[t] = 1 / (1 + Double.exponential(-z))
                }
            }
        }

        // y[t] = Σ_j w[t, j]·o_j in rank order, skipping dropped and unrouted ranks, then the shared expert.
        var y = [Float](repeating: 0, count: s * h)
        for t in 0..<s {
            for c in 0..<h {
                var acc = 0.0
                for j in 0..<k where routing.slots[t * k + j] >= 0 {
                    acc += combine[t * k + j] * pairOut[(t * k + j) * h + c]
                }
                if let shared { acc += sharedGate[t] * shared[t * h + c] }
                y[t * h + c] = Float(acc)
            }
        }
        // The count matches the shape by construction.
        let output = try HostTensor(shape: [s, h], float32: y)
        return MoEOutput(output: output, routing: routing)
    }

    /// The FFN of `m` on the rows `tokens` of x [S, H]: [tokens.count, H] in Float64.
    ///
    /// plain: a = act(x·w1ᵀ + b1); gated: a = act(x·w1ᵀ) ⊙ (x·w3ᵀ); a is rounded to the storage type (as the GPU
    /// stores it); o = a·w2ᵀ + b2.
    func ffn(_ m: FFNMatrices, tokens: [Int], x: [Double]) -> [Double] {
        let (n, h, inner) = (tokens.count, config.hiddenSize, m.inner)
        let storage = config.precision.storage
        let activation = config.activation
        var rows = [Double](repeating: 0, count: n * h)
        for (r, t) in tokens.enumerated() {
            for c in 0..<h { rows[r * h + c] = x[t * h + c] }
        }
        var a = [Double](repeating: 0, count: n * inner)
        var out = [Double](repeating: 0, count: n * h)
        rows.withUnsafeBufferPointer { rb in
            a.withUnsafeMutableBufferPointer { ab in
                // Each chunk owns a range of intermediate features: disjoint columns of a.
                nonisolated(unsafe) let (xp, ap) = (rb.baseAddress!, ab.baseAddress!)
                parallelChunks(count: inner, minimumChunk: max(1, 32_768 / (n * h))) { features in
                    let w1 = UnsafeMutablePointer<Double>.allocate(capacity: 2 * h)
                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: h)
                    defer {
                        w1.deallocate()
                        scratch.deallocate()
                    }
                    let w3 = w1 + h
                    for i in features {
                        let row = (m.index * inner + i) * h
                        m.w1.copyDoubles(offset: row, count: h, into: w1, scratch: scratch)
                        m.w3?.copyDoubles(offset: row, count: h, into: w3, scratch: scratch)
                        let b1 = Double(m.b1?.float(at: m.index * inner + i) ?? 0)
                        for r in 0..<n {
                            let g = dotFloat64(xp + r * h, w1, h)
                            var v =
                                m.w3 != nil
                                ? activation.apply(g) * dotFloat64(xp + r * h, w3, h) : activation.apply(g + b1)
                            if storage != .float32 { v = Double(storage.round(Float(v))) }
                            ap[r * inner + i] = v
                        }
                    }
                }
            }
        }
        a.withUnsafeBufferPointer { ab in
            out.withUnsafeMutableBufferPointer { ob in
                // Each chunk owns a range of output features: disjoint columns of out.
                nonisolated(unsafe) let (ap, op) = (ab.baseAddress!, ob.baseAddress!)
                parallelChunks(count: h, minimumChunk: max(1, 32_768 / (n * inner))) { features in
                    let w2 = UnsafeMutablePointer<Double>.allocate(capacity: inner)
                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: inner)
                    defer {
                        w2.deallocate()
                        scratch.deallocate()
                    }
                    for c in features {
                        m.w2.copyDoubles(offset: (m.index * h + c) * inner, count: inner, into: w2, scratch: scratch)
                        let b2 = Double(m.b2?.float(at: m.index * h + c) ?? 0)
                        for r in 0..<n { op[r * h + c] = dotFloat64(ap + r * inner, w2, inner) + b2 }
                    }
                }
            }
        }
        return out
    }
}
