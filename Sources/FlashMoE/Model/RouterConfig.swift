/// How a token picks its experts.
///
/// Two families, both computed in FP32 (Float64 in the oracle):
/// - `.softmax`: p = softmax(x·Wgᵀ) over all experts, then top-k of p (Mixtral, Qwen-MoE, FlashDMoE).
/// - `.sigmoid`: s = sigmoid(x·Wgᵀ); experts are chosen by s + bias inside the `groupsKept` best groups, where a
///   group's score is the sum of its two best biased scores; the weights are the unbiased s of the chosen experts
///   (DeepSeek-V3, as transformers 5.x's `DeepseekV3TopkRouter`: experts outside the kept groups are masked with
///   −∞, so they are never chosen).
///
/// After selection the k weights are optionally divided by their sum (`renormalize`; the sigmoid router adds 1e-20
/// to the sum as transformers does) and multiplied by `scalingFactor`.
///
/// Determinism rules shared by every backend:
/// - ties in any top-k go to the lower index (expert or group);
/// - a NaN logit never selects an expert: its expert is ineligible (softmax probability 0, never chosen). If fewer
///   than k experts are eligible, the remaining slots are *unrouted* (id −1, weight 0) and contribute nothing;
/// - softmax over infinite logits takes the limit: when the largest eligible logit is ±∞, the probability is split
///   equally among the experts holding it (all the non-finite rules: docs/nonfinite.md).
public struct RouterConfig: Sendable, Hashable, Codable {
    /// The scoring function applied to the gate logits.
    public enum Scoring: String, Sendable, Hashable, Codable, CaseIterable {
        case softmax
        case sigmoid
    }

    /// The function that turns gate logits into scores: softmax or sigmoid.
    public var scoring: Scoring
    /// Divide the chosen weights by their sum.
    public var renormalize: Bool
    /// Expert groups for group-limited selection (1 = no grouping).
    public var groups: Int
    /// Groups a token may choose experts from (≤ `groups`).
    public var groupsKept: Int
    /// Whether the layer has a per-expert selection bias (added to scores for choosing only).
    public var selectionBias: Bool
    /// Multiplies the final weights (DeepSeek-V3's `routed_scaling_factor`).
    public var scalingFactor: Float

    /// A router given field by field; by default softmax top-k, renormalised, ungrouped, no selection bias, scale 1.
    public init(
        scoring: Scoring = .softmax, renormalize: Bool = true, groups: Int = 1, groupsKept: Int = 1,
        selectionBias: Bool = false, scalingFactor: Float = 1
    ) {
        self.scoring = scoring
        self.renormalize = renormalize
        self.groups = groups
        self.groupsKept = groupsKept
        self.selectionBias = selectionBias
        self.scalingFactor = scalingFactor
    }

    /// Softmax top-k, with or without renormalisation of the k chosen probabilities.
    public static func softmax(renormalize: Bool) -> RouterConfig {
        RouterConfig(scoring: .softmax, renormalize: renormalize)
    }

    /// DeepSeek-V3's router: sigmoid scores, selection bias, group-limited top-k, renormalisation and scaling.
    public static func deepSeek(groups: Int, groupsKept: Int, renormalize: Bool = true, scalingFactor: Float)
        -> RouterConfig
    {
        RouterConfig(
            scoring: .sigmoid, renormalize: renormalize, groups: groups, groupsKept: groupsKept,
            selectionBias: true, scalingFactor: scalingFactor)
    }
}
