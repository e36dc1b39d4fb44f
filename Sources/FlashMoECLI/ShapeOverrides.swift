import ArgumentParser
import FlashMoE

/// How `--router` replaces a preset's router.
enum RouterChoice: String, CaseIterable, ExpressibleByArgument {
    /// Softmax over all experts, top-k, the k weights divided by their sum (Mixtral, Qwen, FlashDMoE).
    case softmax
    /// Softmax top-k without renormalisation.
    case softmaxNoRenorm = "softmax-norenorm"
    /// DeepSeek-V3's router: sigmoid scores, a per-expert selection bias, group-limited top-k, renormalised.
    case sigmoid
}

/// Changes to a preset's layer shape. Every option left out keeps the preset's value.
struct ShapeOverrides: ParsableArguments {
    @Option(help: "Hidden size H.")
    var hidden: Int?

    @Option(help: "Expert intermediate size I.")
    var intermediate: Int?

    @Option(help: "Routed experts E.")
    var experts: Int?

    @Option(name: .customLong("top-k"), help: "Experts per token k.")
    var topK: Int?

    @Option(help: "Expert FFN kind.")
    var ffn: FFNKind?

    @Option(help: "The FFN's activation.")
    var activation: Activation?

    @Option(
        help: ArgumentHelp(
            "Router.",
            discussion: "softmax: top-k of the softmax, renormalised; softmax-norenorm: without renormalising; "
                + "sigmoid: DeepSeek-V3's (selection bias, group-limited top-k, renormalised). Changing the kind "
                + "resets groups to 1 unless --groups is given; the scaling factor is kept."))
    var router: RouterChoice?

    @Option(help: "Expert groups for group-limited routing (sigmoid router only).")
    var groups: Int?

    @Option(help: "Groups each token may choose from (default: the preset's, capped at --groups).")
    var groupsKept: Int?

    @Option(help: "Routed scaling factor multiplying the final weights.")
    var scaling: Float?

    @Option(help: "Intermediate size of one shared expert (0: none).")
    var sharedIntermediate: Int?

    @Flag(inversion: .prefixedNo, help: "Biases b1, b2 on the plain FFN.")
    var bias: Bool?

    /// The options that were given, spelled as on the command line (for error messages).
    var given: [String] {
        let all: [(String, Bool)] = [
            ("--hidden", hidden != nil), ("--intermediate", intermediate != nil), ("--experts", experts != nil),
            ("--top-k", topK != nil), ("--ffn", ffn != nil), ("--activation", activation != nil),
            ("--router", router != nil), ("--groups", groups != nil), ("--groups-kept", groupsKept != nil),
            ("--scaling", scaling != nil), ("--shared-intermediate", sharedIntermediate != nil),
            ("--bias/--no-bias", bias != nil),
        ]
        return all.filter(\.1).map(\.0)
    }

    /// `config` with every given override applied (not validated: `MoEConfig.validate` says what is wrong).
    func apply(to config: MoEConfig) -> MoEConfig {
        var c = config
        if let hidden { c.hiddenSize = hidden }
        if let intermediate { c.intermediateSize = intermediate }
        if let experts { c.experts = experts }
        if let topK { c.topK = topK }
        if let ffn { c.ffn = ffn }
        if let activation { c.activation = activation }
        if let bias { c.bias = bias }
        if let router {
            let scaling = c.router.scalingFactor
            switch router {
            case .softmax, .softmaxNoRenorm:
                c.router = .softmax(renormalize: router == .softmax)
                c.router.scalingFactor = scaling
            case .sigmoid where c.router.scoring != .sigmoid:
                c.router = .deepSeek(groups: 1, groupsKept: 1, scalingFactor: scaling)
            case .sigmoid:
                break  // already DeepSeek-style: keep its groups
            }
        }
        if let groups {
            c.router.groups = groups
            c.router.groupsKept = min(c.router.groupsKept, max(1, groups))
        }
        if let groupsKept { c.router.groupsKept = groupsKept }
        if let scaling { c.router.scalingFactor = scaling }
        if let sharedIntermediate {
            c.sharedExpert =
                sharedIntermediate == 0
                ? nil : SharedExpertConfig(intermediateSize: sharedIntermediate, gated: c.sharedExpert?.gated ?? false)
        }
        return c
    }
}
