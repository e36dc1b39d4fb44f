import CFlashMoEABI
import FlashMoE

/// A checked `flashmoe_config_t`: the layer's `MoEConfig` and the options around it. Every field is checked
/// here, by name, before `MoEConfig.validate()` runs as a backstop.
struct LayerSettings {
    enum Backend { case cuda, cpu }

    let config: MoEConfig
    let backend: Backend
    /// CUDA device ordinal.
    let device: Int
    /// GPU layers: y in float32 rather than the storage type.
    let floatOutput: Bool
    let maxTokens: Int
    let syncErrors: Bool
    let injectFault: Bool
    /// The routed experts' output rows in the storage type (FLASHMOE_FLAG_STORAGE_RETURNS): a layer's rows before
    /// the combine, a group's rows sent back (`FusedOptions.storageReturns`).
    let storageReturns: Bool
    let waitBudget: Duration

    /// The operator options these settings ask for (device, wait budget, fault injection, error mode, returns).
    var fusedOptions: FusedOptions {
        var options = FusedOptions(
            deviceOrdinal: device, waitBudget: waitBudget, injectFault: injectFault, synchronousErrors: syncErrors)
        options.storageReturns = storageReturns
        return options
    }

    static let knownFlags = FLASHMOE_FLAG_SYNC_ERRORS | FLASHMOE_FLAG_INJECT_FAULT | FLASHMOE_FLAG_STORAGE_RETURNS

    init(_ pointer: UnsafePointer<flashmoe_config_t>?) throws(ArgumentError) {
        let c = try Check.versionedStruct(
            pointer, "config", initMacro: "FLASHMOE_CONFIG_INIT", version: { $0.version })
        guard c.magic == FLASHMOE_CONFIG_MAGIC else {
            throw ArgumentError(
                "config->magic is 0x\(String(c.magic, radix: 16)), not FLASHMOE_CONFIG_MAGIC (0x464d4f45): "
                    + "initialise the struct with FLASHMOE_CONFIG_INIT")
        }
        let h = try Check.atLeast(c.hidden, 1, "config->hidden", "H")
        let i = try Check.atLeast(c.intermediate, 1, "config->intermediate", "I")
        let e = try Check.atLeast(c.experts, 1, "config->experts", "E")
        let k = try Check.atLeast(c.top_k, 1, "config->top_k", "experts per token")
        guard k <= e else {
            throw ArgumentError("config->top_k (\(k)) must not exceed config->experts (\(e))")
        }
        let ffn: FFNKind = try Check.enumeration(
            c.ffn, "config->ffn", [(0, "FLASHMOE_FFN_PLAIN", .plain), (1, "FLASHMOE_FFN_GATED", .gated)])
        let activation: Activation = try Check.enumeration(
            c.activation, "config->activation",
            [(0, "FLASHMOE_ACT_RELU", .relu), (1, "FLASHMOE_ACT_GELU", .gelu),
             (2, "FLASHMOE_ACT_GELU_TANH", .geluTanh), (3, "FLASHMOE_ACT_SILU", .silu)])
        let bias = try Check.flag(c.bias, "config->bias")
        if bias && ffn == .gated {
            throw ArgumentError("config->bias must be 0 for a gated FFN (biases exist for the plain FFN only)")
        }
        let scoring: RouterConfig.Scoring = try Check.enumeration(
            c.router, "config->router",
            [(0, "FLASHMOE_ROUTER_SOFTMAX", .softmax), (1, "FLASHMOE_ROUTER_SIGMOID", .sigmoid)])
        let renormalize = try Check.flag(c.renormalize, "config->renormalize")
        let groups = try Check.atLeast(c.groups, 1, "config->groups", "expert groups, 1 = none")
        guard e % groups == 0 else {
            throw ArgumentError("config->groups (\(groups)) must divide config->experts (\(e))")
        }
        guard c.groups_kept >= 1, c.groups_kept <= c.groups else {
            throw ArgumentError("config->groups_kept must be between 1 and config->groups (\(groups)), got \(c.groups_kept)")
        }
        if groups > 1 && scoring != .sigmoid {
            throw ArgumentError("config->groups must be 1 for the softmax router (groups are a sigmoid-router option)")
        }
        let selectionBias = try Check.flag(c.selection_bias, "config->selection_bias")
        if selectionBias && scoring != .sigmoid {
            throw ArgumentError("config->selection_bias must be 0 for the softmax router (it is a sigmoid-router option)")
        }
        guard c.scaling.isFinite else { throw ArgumentError("config->scaling must be finite, got \(c.scaling)") }
        let sharedI = try Check.atLeast(c.shared_intermediate, 0, "config->shared_intermediate", "0 = no shared expert")
        let sharedGated = try Check.flag(c.shared_gated, "config->shared_gated")
        if sharedGated && sharedI == 0 {
            throw ArgumentError("config->shared_gated must be 0 when config->shared_intermediate is 0 (no shared expert)")
        }
        guard c.capacity_factor.isFinite, c.capacity_factor >= 0 else {
            throw ArgumentError(
                "config->capacity_factor must be 0 (dropless) or a positive finite number, got \(c.capacity_factor)")
        }
        let precision: Precision = try Check.enumeration(
            c.precision, "config->precision",
            [(0, "FLASHMOE_PRECISION_FP32", .fp32), (1, "FLASHMOE_PRECISION_TF32", .tf32),
             (2, "FLASHMOE_PRECISION_BF16", .bf16), (3, "FLASHMOE_PRECISION_FP16", .fp16),
             (4, "FLASHMOE_PRECISION_FP8", .fp8)])
        backend = try Check.enumeration(
            c.backend, "config->backend", [(0, "FLASHMOE_BACKEND_CUDA", .cuda), (1, "FLASHMOE_BACKEND_CPU", .cpu)])
        device = try Check.atLeast(c.device, 0, "config->device", "CUDA device ordinal")
        floatOutput = try Check.enumeration(
            c.output, "config->output", [(0, "FLASHMOE_OUTPUT_STORAGE", false), (1, "FLASHMOE_OUTPUT_FLOAT32", true)])
        guard c.max_tokens >= 1 else {
            throw ArgumentError(
                "config->max_tokens must be at least 1 (the most tokens one forward may pass), got \(c.max_tokens)")
        }
        maxTokens = Int(c.max_tokens)
        // Every per-call buffer must be addressable: x and y [S, H], the routed rows [S·k, max(H, 2I)].
        _ = try Check.product([maxTokens, k, max(h, 2 * i), 4], "config->max_tokens × top_k × max(H, 2I) × 4 bytes")
        guard c.flags & ~Self.knownFlags == 0 else {
            throw ArgumentError(
                "config->flags has unknown bits 0x\(String(c.flags & ~Self.knownFlags, radix: 16)): use "
                    + "FLASHMOE_FLAG_SYNC_ERRORS (1), FLASHMOE_FLAG_INJECT_FAULT (2) and FLASHMOE_FLAG_STORAGE_RETURNS (4) only")
        }
        syncErrors = c.flags & FLASHMOE_FLAG_SYNC_ERRORS != 0
        injectFault = c.flags & FLASHMOE_FLAG_INJECT_FAULT != 0
        storageReturns = c.flags & FLASHMOE_FLAG_STORAGE_RETURNS != 0
        waitBudget = .milliseconds(c.wait_budget_ms == 0 ? 5000 : Int(c.wait_budget_ms))

        let router = RouterConfig(
            scoring: scoring, renormalize: renormalize, groups: groups, groupsKept: Int(c.groups_kept),
            selectionBias: selectionBias, scalingFactor: c.scaling)
        let config = MoEConfig(
            hiddenSize: h, intermediateSize: i, experts: e, topK: k, ffn: ffn, bias: bias, activation: activation,
            router: router,
            sharedExpert: sharedI > 0 ? SharedExpertConfig(intermediateSize: sharedI, gated: sharedGated) : nil,
            capacity: c.capacity_factor == 0 ? .dropless : .factor(Double(c.capacity_factor)), precision: precision)
        do {
            try config.validate()
        } catch {
            throw ArgumentError("config: \(error.message)")
        }
        if storageReturns && precision.storage.byteSize != 2 {
            throw ArgumentError(
                "config->flags: FLASHMOE_FLAG_STORAGE_RETURNS needs 16-bit expert rows (bf16 or fp16 layers); "
                    + "this layer is \(precision.rawValue): drop the flag")
        }
        // The weight tensors must be addressable too (the largest is the first layer, [E, 2I, H]).
        _ = try Check.product([e, 2 * i, h, 4], "the expert weights [E, 2I, H] × 4 bytes")
        self.config = config
    }
}
