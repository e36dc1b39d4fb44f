/// The shape of an expert's feed-forward network.
public enum FFNKind: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    /// `act(x·W1ᵀ + b1)·W2ᵀ + b2`, biases optional (FlashDMoE, Switch).
    case plain
    /// `(act(x·Wgᵀ) ⊙ x·Wuᵀ)·Wdᵀ`, no biases (SwiGLU: Mixtral, Qwen-MoE, DeepSeek).
    case gated

    /// The raw value: `plain` or `gated`.
    public var description: String { rawValue }
}

/// Per-expert capacity: how many tokens an expert takes before it drops the rest.
public enum Capacity: Sendable, Hashable, Codable, CustomStringConvertible {
    /// Every routed token is processed.
    case dropless
    /// Each expert keeps at most `ceil(ceil(S/E) · k · factor)` tokens (FlashDMoE's rule, CF = 1 by default);
    /// the tokens with the lower index keep their slots, the others' contributions are dropped (not renormalised).
    case factor(Double)

    /// The capacity of one expert for `tokens` tokens, or nil when dropless.
    public func perExpert(tokens: Int, experts: Int, topK: Int) -> Int? {
        switch self {
        case .dropless: return nil
        case .factor(let f):
            let base = (tokens + experts - 1) / experts
            return Int((Double(base * topK) * f).rounded(.up))
        }
    }

    /// `dropless`, or `capacity factor F`.
    public var description: String {
        switch self {
        case .dropless: "dropless"
        case .factor(let f): "capacity factor \(f)"
        }
    }
}

/// An always-active expert added to every token's output (DeepSeek's shared experts, Qwen2-MoE's shared expert).
///
/// It has the same FFN kind and activation as the routed experts and no biases. With `gated`, its output is
/// multiplied by `sigmoid(x·wsᵀ)` for a learned vector ws [H] (Qwen2-MoE's `shared_expert_gate`).
public struct SharedExpertConfig: Sendable, Hashable, Codable {
    /// The shared expert's intermediate size (DeepSeek: `moe_intermediate_size × n_shared_experts`).
    public var intermediateSize: Int
    /// Whether a sigmoid gate scales the shared expert's output.
    public var gated: Bool

    /// A shared expert of intermediate size `intermediateSize`, with a sigmoid output gate only when `gated`.
    public init(intermediateSize: Int, gated: Bool = false) {
        self.intermediateSize = intermediateSize
        self.gated = gated
    }
}
