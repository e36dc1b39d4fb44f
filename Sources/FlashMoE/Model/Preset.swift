/// Named layer shapes from real models and the FlashDMoE paper (docs/performance.md lists their floors), each with a
/// default token count.
public struct Preset: Sendable, Hashable {
    /// The name used on the command line.
    public let name: String
    /// The layer's configuration (FP32 unless overridden).
    public let config: MoEConfig
    /// The token count `flashmoe run` and `bench` use when none is given.
    public let defaultTokens: Int
    /// One line on where the shape comes from.
    public let summary: String

    /// Every preset, in the order `--help` lists them.
    public static let all: [Preset] = [paperE64, paperE32, qwen3_30bA3b, mixtral8x7b, deepSeekV3]

    /// Looks a preset up by name; the error lists the valid names.
    public static func named(_ name: String) throws(MoEError) -> Preset {
        if let p = all.first(where: { $0.name == name }) { return p }
        throw MoEError(
            .unknownPreset,
            "unknown preset '\(name)': choose one of \(all.map(\.name).joined(separator: ", "))")
    }

    /// FlashDMoE's default: E=64, k=2, H=I=2048, ReLU FFN, softmax top-k renormalised.
    public static let paperE64 = Preset(
        name: "paper-e64",
        config: MoEConfig(
            hiddenSize: 2048, intermediateSize: 2048, experts: 64, topK: 2, ffn: .plain, activation: .relu,
            router: .softmax(renormalize: true)),
        defaultTokens: 8192, summary: "FlashDMoE paper shape, E=64 k=2 H=I=2048, ReLU FFN")

    /// The paper's shape with 32 experts.
    public static let paperE32 = Preset(
        name: "paper-e32",
        config: MoEConfig(
            hiddenSize: 2048, intermediateSize: 2048, experts: 32, topK: 2, ffn: .plain, activation: .relu,
            router: .softmax(renormalize: true)),
        defaultTokens: 8192, summary: "FlashDMoE paper shape, E=32 k=2 H=I=2048, ReLU FFN")

    /// Qwen3-30B-A3B: E=128, k=8, H=2048, I=768, SwiGLU, softmax top-k renormalised (`norm_topk_prob`).
    public static let qwen3_30bA3b = Preset(
        name: "qwen3-30b-a3b",
        config: MoEConfig(
            hiddenSize: 2048, intermediateSize: 768, experts: 128, topK: 8, ffn: .gated, activation: .silu,
            router: .softmax(renormalize: true)),
        defaultTokens: 4096, summary: "Qwen3-30B-A3B, E=128 k=8 H=2048 I=768, SwiGLU")

    /// Mixtral-8x7B: E=8, k=2, H=4096, I=14336, SwiGLU, softmax top-k renormalised.
    public static let mixtral8x7b = Preset(
        name: "mixtral-8x7b",
        config: MoEConfig(
            hiddenSize: 4096, intermediateSize: 14336, experts: 8, topK: 2, ffn: .gated, activation: .silu,
            router: .softmax(renormalize: true)),
        defaultTokens: 4096, summary: "Mixtral-8x7B, E=8 k=2 H=4096 I=14336, SwiGLU")

    /// DeepSeek-V3: E=256, k=8, H=7168, I=2048, sigmoid group-limited routing (8 groups, 4 kept, bias,
    /// renormalised, scaling 2.5), one shared expert of I=2048.
    public static let deepSeekV3 = Preset(
        name: "deepseek-v3",
        config: MoEConfig(
            hiddenSize: 7168, intermediateSize: 2048, experts: 256, topK: 8, ffn: .gated, activation: .silu,
            router: .deepSeek(groups: 8, groupsKept: 4, scalingFactor: 2.5),
            sharedExpert: SharedExpertConfig(intermediateSize: 2048)),
        defaultTokens: 4096, summary: "DeepSeek-V3, E=256 k=8 H=7168 I=2048, sigmoid group-limited, 1 shared expert")
}
