#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The arithmetic the router runs in: Float64 (the oracle) or Float32 (the fast CPU path and the GPU).
protocol RouterScalar: BinaryFloatingPoint, Sendable {
    /// eˣ in this precision.
    static func exponential(_ x: Self) -> Self
}

extension Double: RouterScalar {
    static func exponential(_ x: Double) -> Double { exp(x) }
}

extension Float: RouterScalar {
    static func exponential(_ x: Float) -> Float { expf(x) }
}

/// Routes one token at a time by the rules documented on `Router`, with scratch space reused across tokens.
///
/// One instance per thread: it owns mutable scratch arrays.
struct TokenRouter<T: RouterScalar> {
    let experts: Int
    let topK: Int
    let router: RouterConfig
    /// Per-expert selection bias in T (zeros when the layer has none).
    let bias: [T]

    private var chosen: [Bool]
    /// Softmax: probabilities. Sigmoid: the unbiased scores s.
    private var prob: [T]
    /// Sigmoid only: the choice scores s + bias.
    private var choice: [T]
    private var groupScore: [T]
    private var groupKept: [Bool]

    init(experts: Int, topK: Int, router: RouterConfig, bias: [T]) {
        self.experts = experts
        self.topK = topK
        self.router = router
        self.bias = bias
        chosen = [Bool](repeating: false, count: experts)
        prob = [T](repeating: 0, count: experts)
        choice = [T](repeating: 0, count: experts)
        groupScore = [T](repeating: 0, count: router.groups)
        groupKept = [Bool](repeating: false, count: router.groups)
    }

    /// Routes the token whose E logits are `logits`, writing k expert ids (−1 = unrouted) and k weights.
    mutating func route(
        _ logits: UnsafeBufferPointer<T>, ids: UnsafeMutableBufferPointer<Int32>, weights: UnsafeMutableBufferPointer<T>
    ) {
        for e in 0..<experts { chosen[e] = false }
        switch router.scoring {
        case .softmax: selectSoftmax(logits, ids, weights)
        case .sigmoid: selectSigmoid(logits, ids, weights)
        }
        finishWeights(ids, weights)
    }

    /// Rule 4: probabilities over the eligible experts (the limit when the top logit is infinite), then k rounds
    /// of arg-max by logit.
    private mutating func selectSoftmax(
        _ l: UnsafeBufferPointer<T>, _ ids: UnsafeMutableBufferPointer<Int32>, _ w: UnsafeMutableBufferPointer<T>
    ) {
        var top: T? = nil
        for e in 0..<experts where !l[e].isNaN {
            if top.map({ l[e] > $0 }) ?? true { top = l[e] }
        }
        if let m = top {
            if m.isInfinite {
                var holders = 0
                for e in 0..<experts where l[e] == m { holders += 1 }
                let share = 1 / T(holders)
                for e in 0..<experts { prob[e] = l[e] == m ? share : 0 }
            } else {
                var sum: T = 0
                for e in 0..<experts {
                    let v: T = l[e].isNaN ? 0 : T.exponential(l[e] - m)
                    prob[e] = v
                    sum += v
                }
                for e in 0..<experts { prob[e] /= sum }
            }
        }
        for j in 0..<topK {
            let best = argMax(l, eligibleIn: l)
            record(best, rank: j, weight: best >= 0 ? prob[best] : 0, ids, w)
        }
    }

    /// Rule 5: DeepSeek-V3's sigmoid router with selection bias and group-limited choice.
    private mutating func selectSigmoid(
        _ l: UnsafeBufferPointer<T>, _ ids: UnsafeMutableBufferPointer<Int32>, _ w: UnsafeMutableBufferPointer<T>
    ) {
        for e in 0..<experts {
            if l[e].isNaN {
                prob[e] = 0
                choice[e] = 0
            } else {
                let s = 1 / (1 + T.exponential(-l[e]))
                prob[e] = s
                choice[e] = s + bias[e]
            }
        }
        let groups = router.groups
        if groups > 1 {
            let size = experts / groups
            for g in 0..<groups {
                // The sum of the group's two best choice scores (one if it has a single eligible expert).
                var first: T? = nil, second: T? = nil
                for e in g * size..<(g + 1) * size where !l[e].isNaN {
                    let c = choice[e]
                    if first.map({ c > $0 }) ?? true {
                        second = first
                        first = c
                    } else if second.map({ c > $0 }) ?? true {
                        second = c
                    }
                }
                groupScore[g] = first.map { f in second.map { f + $0 } ?? f } ?? -T.infinity
                groupKept[g] = false
            }
            for _ in 0..<router.groupsKept {
                var best = -1
                for g in 0..<groups where !groupKept[g] {
                    if best < 0 || groupScore[g] > groupScore[best] { best = g }
                }
                groupKept[best] = true
            }
            // Experts outside the kept groups are no longer candidates (transformers 5.x masks them with −∞):
            // marking them chosen takes them out of every arg-max below.
            for g in 0..<groups where !groupKept[g] {
                for e in g * size..<(g + 1) * size { chosen[e] = true }
            }
        }
        choice.withUnsafeBufferPointer { c in
            for j in 0..<topK {
                let best = argMax(c, eligibleIn: l)
                record(best, rank: j, weight: best >= 0 ? prob[best] : 0, ids, w)
            }
        }
    }

    /// The not-yet-chosen expert with the largest `score` among those with a non-NaN logit (ties to the lower
    /// index), or −1 if none is left.
    private func argMax(_ score: UnsafeBufferPointer<T>, eligibleIn l: UnsafeBufferPointer<T>) -> Int {
        var best = -1
        for e in 0..<experts where !chosen[e] && !l[e].isNaN {
            if best < 0 || score[e] > score[best] { best = e }
        }
        return best
    }

    private mutating func record(
        _ e: Int, rank j: Int, weight: T, _ ids: UnsafeMutableBufferPointer<Int32>, _ w: UnsafeMutableBufferPointer<T>
    ) {
        if e >= 0 {
            chosen[e] = true
            ids[j] = Int32(e)
            w[j] = weight
        } else {
            ids[j] = -1
            w[j] = 0
        }
    }

    /// Rule 7: renormalise over the routed ranks (sum in rank order), then scale.
    private func finishWeights(_ ids: UnsafeMutableBufferPointer<Int32>, _ w: UnsafeMutableBufferPointer<T>) {
        let scale = T(router.scalingFactor)
        var sum: T = 0
        for j in 0..<topK where ids[j] >= 0 { sum += w[j] }
        var divisor: T = 1
        if router.renormalize {
            switch router.scoring {
            case .softmax: divisor = sum > 0 ? sum : 1
            case .sigmoid: divisor = sum + T(1e-20)  // as transformers: never divides by zero
            }
        }
        for j in 0..<topK where ids[j] >= 0 { w[j] = w[j] / divisor * scale }
    }
}
