import FlashMoE

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Test fixtures and an independent, deliberately naive formulation of the MoE layer: routing by sorting
/// instead of arg-max rounds, and every expert run on every token, masked by the routing.
enum Fixture {
    /// A layer with seeded random weights for `config`.
    static func layer(_ config: MoEConfig, seed: UInt64 = 7) throws -> MoELayer {
        try MoELayer(config: config, weights: MoEWeights.random(config: config, seed: seed))
    }

    /// x [tokens, hidden] uniform in ±scale, stored as `type`.
    static func input(tokens: Int, hidden: Int, seed: UInt64 = 99, scale: Float = 1, as type: ElementType = .float32)
        throws -> HostTensor
    {
        let v = SeededRandom(seed: seed).uniformArray(count: tokens * hidden, stream: 1, scale: scale)
        return try HostTensor(shape: [tokens, hidden], values: v, as: type)
    }

    /// The routers the sweeps cover.
    static let routers: [RouterConfig] = [
        .softmax(renormalize: true),
        .softmax(renormalize: false),
        RouterConfig(scoring: .sigmoid, renormalize: true),
        .deepSeek(groups: 4, groupsKept: 2, scalingFactor: 2.5),
        .deepSeek(groups: 2, groupsKept: 1, renormalize: false, scalingFactor: 1.5),
    ]

    /// (ffn, bias) pairs: plain, plain with biases, gated.
    static let ffns: [(FFNKind, Bool)] = [(.plain, false), (.plain, true), (.gated, false)]

    /// A small config; E = 8 so that 4 groups of 2 and 2 groups of 4 both divide it.
    static func config(
        router: RouterConfig, ffn: FFNKind, bias: Bool, activation: Activation, capacity: Capacity,
        precision: Precision = .fp32, shared: SharedExpertConfig? = nil, hidden: Int = 32, inner: Int = 24,
        experts: Int = 8, topK: Int = 2
    ) -> MoEConfig {
        MoEConfig(
            hiddenSize: hidden, intermediateSize: inner, experts: experts, topK: topK, ffn: ffn, bias: bias,
            activation: activation, router: router, sharedExpert: shared, capacity: capacity, precision: precision)
    }
}

/// Routing recomputed from the spec by sorting, in Float64.
struct NaiveRouting {
    var ids: [Int]  // [S·k], −1 unrouted
    var weights: [Double]  // [S·k]
    var slots: [Int]  // [S·k], −1 dropped or unrouted
    var load: [Int]

    init(logits: [Double], bias: [Double]?, config: MoEConfig, tokens: Int) {
        let (e, k, r) = (config.experts, config.topK, config.router)
        ids = []
        weights = []
        for t in 0..<tokens {
            let l = Array(logits[t * e..<(t + 1) * e])
            var eligible = (0..<e).filter { !l[$0].isNaN }
            var picked: [Int]
            var w: [Double]
            switch r.scoring {
            case .softmax:
                picked = Array(eligible.sorted { l[$0] != l[$1] ? l[$0] > l[$1] : $0 < $1 }.prefix(k))
                let m = eligible.map { l[$0] }.max() ?? 0
                if m.isInfinite {
                    let c = Double(eligible.filter { l[$0] == m }.count)
                    w = picked.map { l[$0] == m ? 1 / c : 0 }
                } else {
                    let z = eligible.reduce(0.0) { $0 + exp(l[$1] - m) }
                    w = picked.map { exp(l[$0] - m) / z }
                }
            case .sigmoid:
                let s = l.map { 1 / (1 + exp(-$0)) }
                let c = (0..<e).map { s[$0] + (bias?[$0] ?? 0) }
                if r.groups > 1 {
                    let size = e / r.groups
                    let score: [Double] = (0..<r.groups).map { g in
                        let top = (g * size..<(g + 1) * size).filter { !l[$0].isNaN }.map { c[$0] }
                            .sorted(by: >)
                        return top.isEmpty ? -.infinity : top.prefix(2).reduce(0, +)
                    }
                    let kept = Set(
                        (0..<r.groups).sorted { score[$0] != score[$1] ? score[$0] > score[$1] : $0 < $1 }
                            .prefix(r.groupsKept))
                    eligible = eligible.filter { kept.contains($0 / size) }
                }
                picked = Array(eligible.sorted { c[$0] != c[$1] ? c[$0] > c[$1] : $0 < $1 }.prefix(k))
                w = picked.map { s[$0] }
            }
            if r.renormalize {
                let sum = w.reduce(0, +)
                w = w.map { r.scoring == .softmax ? (sum > 0 ? $0 / sum : $0) : $0 / (sum + 1e-20) }
            }
            w = w.map { $0 * Double(r.scalingFactor) }
            ids += picked + [Int](repeating: -1, count: k - picked.count)
            weights += w + [Double](repeating: 0, count: k - picked.count)
        }
        let cap = config.capacity.perExpert(tokens: tokens, experts: e, topK: k) ?? .max
        load = [Int](repeating: 0, count: e)
        slots = []
        for id in ids {
            guard id >= 0 else {
                slots.append(-1)
                continue
            }
            slots.append(load[id] < cap ? load[id] : -1)
            load[id] += 1
        }
    }
}

/// The layer computed densely in Float64: every expert on every token, then masked by the routing.
struct DenseReference {
    let routing: NaiveRouting
    let output: [Double]

    init(layer: MoELayer, input: HostTensor) {
        let c = layer.config
        let st = c.precision.storage
        let w = layer.weights.converted(to: st)
        let (s, h, i, e, k) = (input.shape[0], c.hiddenSize, c.intermediateSize, c.experts, c.topK)
        let x = input.converted(to: st).floats().map(Double.init)
        let router = w.router.floats().map(Double.init)
        var logits = [Double](repeating: 0, count: s * e)
        for t in 0..<s {
            for ex in 0..<e {
                for j in 0..<h { logits[t * e + ex] += x[t * h + j] * router[ex * h + j] }
            }
        }
        routing = NaiveRouting(
            logits: logits, bias: w.selectionBias?.floats().map(Double.init), config: c, tokens: s)

        func ffn(_ xt: ArraySlice<Double>, w1: [Double], w3: [Double]?, w2: [Double], b1: [Double]?, b2: [Double]?,
            inner: Int) -> [Double]
        {
            let xt = Array(xt)
            var a = [Double](repeating: 0, count: inner)
            for f in 0..<inner {
                var g = 0.0, u = 0.0
                for j in 0..<h {
                    g += xt[j] * w1[f * h + j]
                    if let w3 { u += xt[j] * w3[f * h + j] }
                }
                var v = w3 == nil ? c.activation.apply(g + (b1?[f] ?? 0)) : c.activation.apply(g) * u
                if st != .float32 { v = Double(st.round(Float(v))) }
                a[f] = v
            }
            var out = [Double](repeating: 0, count: h)
            for o in 0..<h {
                var acc: Double = b2?[o] ?? 0
                for f in 0..<inner { acc += a[f] * w2[o * inner + f] }
                out[o] = acc
            }
            return out
        }
        func slice(_ t: HostTensor?, _ index: Int, _ n: Int) -> [Double]? {
            t.map { tensor in (0..<n).map { Double(tensor.float(at: index * n + $0)) } }
        }

        var y = [Double](repeating: 0, count: s * h)
        for ex in 0..<e {
            let w1 = slice(w.w1, ex, i * h)!, w3 = slice(w.w3, ex, i * h), w2 = slice(w.w2, ex, h * i)!
            let b1 = slice(w.b1, ex, i), b2 = slice(w.b2, ex, h)
            for t in 0..<s {
                let o = ffn(x[t * h..<(t + 1) * h], w1: w1, w3: w3, w2: w2, b1: b1, b2: b2, inner: i)
                // Mask: this expert's weight for token t if one of its kept ranks chose it, else 0.
                var weight = 0.0
                for j in 0..<k where routing.ids[t * k + j] == ex && routing.slots[t * k + j] >= 0 {
                    weight = routing.weights[t * k + j]
                }
                for j in 0..<h { y[t * h + j] += weight * o[j] }
            }
        }
        if let sc = c.sharedExpert, let sw = w.shared {
            let si = sc.intermediateSize
            let w1 = slice(sw.w1, 0, si * h)!, w3 = slice(sw.w3, 0, si * h), w2 = slice(sw.w2, 0, h * si)!
            let gate = slice(sw.gate, 0, h)
            for t in 0..<s {
                let o = ffn(x[t * h..<(t + 1) * h], w1: w1, w3: w3, w2: w2, b1: nil, b2: nil, inner: si)
                var g = 1.0
                if let gate {
                    let z = (0..<h).reduce(0.0) { $0 + x[t * h + $1] * gate[$1] }
                    g = 1 / (1 + exp(-z))
                }
                for j in 0..<h { y[t * h + j] += g * o[j] }
            }
        }
        output = y
    }
}

/// ‖a − b‖ / ‖b‖ in Float64 (the tests' own measure for Float64 results).
func relativeError64(_ a: [Double], _ b: [Double]) -> Double {
    let d = zip(a, b).reduce(0.0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) }
    let n = b.reduce(0.0) { $0 + $1 * $1 }
    return n == 0 ? (d == 0 ? 0 : .infinity) : (d / n).squareRoot()
}
