/// The Hugging Face model families whose MoE layers load, named by config.json's `model_type`.
public enum ModelFamily: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// Mixtral: `block_sparse_moe` with experts `w1` (gate), `w3` (up), `w2` (down); softmax top-k renormalised.
    case mixtral
    /// Qwen2-MoE (Qwen1.5-MoE): `mlp` experts plus one sigmoid-gated shared expert.
    case qwen2Moe = "qwen2_moe"
    /// Qwen3-MoE: `mlp` experts, no shared expert.
    case qwen3Moe = "qwen3_moe"
    /// DeepSeek-V3: sigmoid group-limited router with a selection bias, plus ungated shared experts.
    case deepSeekV3 = "deepseek_v3"

    /// The `model_type` it is named by, e.g. `qwen3_moe`.
    public var description: String { rawValue }

    /// The family with this `model_type`, or nil.
    public init?(modelType: String) { self.init(rawValue: modelType) }

    /// The MoE block's module name inside a decoder layer, in the order the loader tries them. Mixtral's original
    /// checkpoints (and transformers 5.x's `save_pretrained`) use `block_sparse_moe`; transformers 5.x calls the
    /// module `mlp` in memory, so a state dict saved without conversion may use that.
    var blockNames: [String] { self == .mixtral ? ["block_sparse_moe", "mlp"] : ["mlp"] }

    /// The per-expert projection names: (gate, up, down).
    var projectionNames: (gate: String, up: String, down: String) {
        self == .mixtral ? ("w1", "w3", "w2") : ("gate_proj", "up_proj", "down_proj")
    }

    /// The shared expert's module name, for families that have one.
    var sharedExpertModule: String? {
        switch self {
        case .qwen2Moe: "shared_expert"
        case .deepSeekV3: "shared_experts"
        case .mixtral, .qwen3Moe: nil
        }
    }

    /// The `architectures` entry the writer puts in config.json.
    var architecture: String {
        switch self {
        case .mixtral: "MixtralForCausalLM"
        case .qwen2Moe: "Qwen2MoeForCausalLM"
        case .qwen3Moe: "Qwen3MoeForCausalLM"
        case .deepSeekV3: "DeepseekV3ForCausalLM"
        }
    }
}

/// The tensor names of one MoE block, given the block's prefix (e.g. `model.layers.3.mlp`).
struct MoETensorNames {
    let family: ModelFamily
    /// Everything before `.gate.weight`, e.g. `model.layers.3.block_sparse_moe`.
    let prefix: String

    var router: String { "\(prefix).gate.weight" }
    var selectionBias: String { "\(prefix).gate.e_score_correction_bias" }
    /// transformers 5.x's in-memory fused layout: [E, 2I, H], gate rows first, then up rows.
    var fusedGateUp: String { "\(prefix).experts.gate_up_proj" }
    /// transformers 5.x's in-memory fused layout: [E, H, I].
    var fusedDown: String { "\(prefix).experts.down_proj" }

    func expert(_ e: Int, _ projection: String) -> String { "\(prefix).experts.\(e).\(projection).weight" }

    func shared(_ projection: String) -> String? {
        family.sharedExpertModule.map { "\(prefix).\($0).\(projection).weight" }
    }

    /// Qwen2-MoE's [1, H] sigmoid gate of the shared expert.
    var sharedGate: String { "\(prefix).shared_expert_gate.weight" }
}
