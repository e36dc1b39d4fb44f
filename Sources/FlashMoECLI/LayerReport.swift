import FlashMoE

/// The text pieces `run` and `bench` print about a layer and its result.
enum LayerReport {
    /// "H=2048 I=2048 E=32 k=2, plain FFN, relu, softmax top-k renormalised, dropless, fp32".
    static func describe(_ c: MoEConfig) -> String {
        var parts = ["H=\(c.hiddenSize) I=\(c.intermediateSize) E=\(c.experts) k=\(c.topK)"]
        parts.append("\(c.ffn) FFN" + (c.bias ? " with biases" : ""))
        parts.append(c.activation.rawValue)
        parts.append(describe(c.router))
        if let s = c.sharedExpert {
            parts.append("shared expert I=\(s.intermediateSize)" + (s.gated ? " (sigmoid-gated)" : ""))
        }
        parts.append(c.capacity.description)
        parts.append(c.precision.rawValue)
        return parts.joined(separator: ", ")
    }

    /// "softmax top-k renormalised", "sigmoid, 8 groups (4 kept), selection bias, renormalised, scaling 2.5".
    static func describe(_ r: RouterConfig) -> String {
        var text: String
        switch r.scoring {
        case .softmax: text = "softmax top-k " + (r.renormalize ? "renormalised" : "not renormalised")
        case .sigmoid:
            text = "sigmoid"
            if r.groups > 1 { text += ", \(r.groups) groups (\(r.groupsKept) kept)" }
            if r.selectionBias { text += ", selection bias" }
            text += r.renormalize ? ", renormalised" : ", not renormalised"
        }
        if r.scalingFactor != 1 { text += ", scaling \(r.scalingFactor)" }
        return text
    }
}

/// Per-expert load of one forward pass: tokens routed to each expert (before capacity), and what capacity dropped.
struct LoadSummary: Sendable, Equatable {
    var minimum: Int
    var mean: Double
    var maximum: Int
    /// Experts that received at least one token.
    var expertsUsed: Int
    var experts: Int
    /// Routed (token, expert) pairs dropped by capacity.
    var dropped: Int
    /// (token, rank) slots left without an expert (fewer than k experts with a non-NaN logit).
    var unrouted: Int
    /// Tokens with no expert at all (every logit NaN, e.g. a NaN in x): y is the shared expert's output or 0.
    var unroutedTokens: Int
    /// All (token, rank) slots: S·k.
    var pairs: Int

    init(_ routing: Routing) {
        let load = routing.expertLoad
        minimum = load.min() ?? 0
        maximum = load.max() ?? 0
        mean = load.isEmpty ? 0 : Double(load.reduce(0, +)) / Double(load.count)
        expertsUsed = load.filter { $0 > 0 }.count
        experts = load.count
        dropped = routing.dropped
        unrouted = routing.expertIDs.filter { $0 < 0 }.count
        let k = max(1, routing.topK)
        unroutedTokens = (0..<routing.tokens).filter { t in
            routing.expertIDs[(t * k)..<(t * k + k)].allSatisfy { $0 < 0 }
        }.count
        pairs = routing.expertIDs.count
    }

    var text: String {
        var s =
            "expert load: min \(minimum) / mean \(formatDecimal(mean, 1)) / max \(maximum) tokens over "
            + "\(experts) experts (\(expertsUsed) used); dropped \(dropped) of \(pairs) (token, expert) pairs"
        if unrouted > 0 {
            let tokens = unroutedTokens == 1 ? "1 token" : "\(unroutedTokens) tokens"
            s += "; \(unrouted) unrouted (NaN logits), \(tokens) with no expert"
        }
        return s
    }
}

/// NaN and ±∞ in one forward pass (the rules: docs/nonfinite.md): tokens of x holding one, tokens left without an
/// expert, and tokens of y holding one.
struct NonFiniteSummary: Sendable, Equatable {
    /// Rows of x with a NaN or ±∞.
    var inputTokens: Int
    /// Tokens with no expert (every logit NaN).
    var unroutedTokens: Int
    /// Rows of y with a NaN or ±∞, and their non-finite elements.
    var outputTokens: Int
    var outputValues: Int

    init(input: HostTensor, output: MoEOutput) {
        let h = max(1, input.shape.count == 2 ? input.shape[1] : 1)
        inputTokens = Self.rows(input.floats(), width: h).rows
        unroutedTokens = LoadSummary(output.routing).unroutedTokens
        (outputTokens, outputValues) = Self.rows(output.output.floats(), width: h)
    }

    /// Rows of `values` (row-major, `width` wide) with a non-finite element, and the non-finite elements.
    static func rows(_ values: [Float], width: Int) -> (rows: Int, values: Int) {
        var rows = 0, count = 0
        for start in stride(from: 0, to: values.count, by: width) {
            let n = values[start..<min(values.count, start + width)].reduce(0) { $0 + ($1.isFinite ? 0 : 1) }
            count += n
            rows += n > 0 ? 1 : 0
        }
        return (rows, count)
    }

    var text: String {
        func tokens(_ n: Int) -> String { n == 1 ? "1 token" : "\(n) tokens" }
        return "non-finite: NaN/±Inf in \(tokens(inputTokens)) of x; \(tokens(unroutedTokens)) with no expert "
            + "(all logits NaN); NaN/±Inf in \(tokens(outputTokens)) of y (\(outputValues) values)"
            + (inputTokens + unroutedTokens + outputTokens > 0 ? " (rules: docs/nonfinite.md)" : "")
    }
}

/// ‖y‖₂ and mean |y| of an output, in Float64.
struct OutputNorms: Sendable, Equatable {
    var l2: Double
    var meanAbsolute: Double

    init(_ values: [Float]) {
        var squares = 0.0
        var absolute = 0.0
        for v in values {
            squares += Double(v) * Double(v)
            absolute += Double(v.magnitude)
        }
        l2 = squares.squareRoot()
        meanAbsolute = values.isEmpty ? 0 : absolute / Double(values.count)
    }

    var text: String { "output norm: ‖y‖₂ = \(formatNumber(l2)), mean |y| = \(formatNumber(meanAbsolute))" }
}

/// A number with four significant digits, in exponent form when very small or large ("12.35", "0.001235",
/// "1.235e-7").
func formatNumber(_ x: Double) -> String {
    guard x.isFinite else { return "\(x)" }
    if x == 0 { return "0" }
    var exponent = 0
    var m = x.magnitude
    while m >= 10 {
        m /= 10
        exponent += 1
    }
    while m < 1 {
        m *= 10
        exponent -= 1
    }
    if exponent >= -3 && exponent < 6 { return formatDecimal(x, max(0, 3 - exponent)) }
    return "\(x < 0 ? "-" : "")\(formatDecimal(m, 3))e\(exponent)"
}
