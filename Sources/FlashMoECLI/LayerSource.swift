import FlashMoE

/// Where a command's layer comes from: a preset shape with random weights, or one layer of a checkpoint.
/// The configuration is known (and validated) before any weight is made or read, so memory can be checked first.
enum LayerSource: Sendable {
    /// A preset (possibly with overrides), random weights from `seed`.
    case random(preset: Preset, config: MoEConfig, seed: UInt64, overridden: Bool)
    /// Decoder layer `layer` of the checkpoint in `directory`.
    case checkpoint(directory: String, layer: Int, config: MoEConfig)

    /// A preset with `overrides` and the options' precision, capacity and seed applied; validated.
    static func preset(named name: String, overrides: ShapeOverrides, options: CommonOptions) throws -> LayerSource {
        let preset = try Preset.named(name)
        var config = overrides.apply(to: preset.config)
        config.precision = options.precision
        config.capacity = options.capacity
        try config.validate()
        return .random(preset: preset, config: config, seed: options.seed, overridden: !overrides.given.isEmpty)
    }

    /// A checkpoint layer with the options' precision and capacity; reads config.json only (`build` reads the
    /// tensors).
    static func checkpoint(directory: String, layer: Int, options: CommonOptions) throws -> LayerSource {
        var config = try CheckpointConfig(directory: directory).layerConfig
        config.precision = options.precision
        config.capacity = options.capacity
        return .checkpoint(directory: directory, layer: layer, config: config)
    }

    /// The layer's configuration.
    var config: MoEConfig {
        switch self {
        case .random(_, let config, _, _), .checkpoint(_, _, let config): config
        }
    }

    /// The preset's default token count; nil for a checkpoint.
    var defaultTokens: Int? {
        if case .random(let preset, _, _, _) = self { return preset.defaultTokens }
        return nil
    }

    /// The preset name a benchmark record carries: the preset's, or "custom (from NAME)" when overridden.
    var presetLabel: String {
        switch self {
        case .random(let preset, _, _, let overridden): overridden ? "custom (from \(preset.name))" : preset.name
        case .checkpoint(let directory, let layer, _): "checkpoint \(directory) layer \(layer)"
        }
    }

    /// Whether the weights are generated (and need generation scratch memory).
    var isRandom: Bool {
        if case .random = self { return true }
        return false
    }

    /// "paper-e32 with random weights (seed 0)", "layer 3 of /ckpt".
    var origin: String {
        switch self {
        case .random(let preset, _, let seed, let overridden):
            "\(preset.name)\(overridden ? " with overrides" : ""), random weights (seed \(seed))"
        case .checkpoint(let directory, let layer, _):
            "layer \(layer) of \(directory)"
        }
    }

    /// Makes or loads the weights.
    func build(progress: Progress) throws -> MoELayer {
        switch self {
        case .random(_, let config, let seed, _):
            return try progress.step("generating random weights") {
                try MoELayer(config: config, weights: MoEWeights.random(config: config, seed: seed))
            }
        case .checkpoint(let directory, let layer, let config):
            return try progress.step("loading layer \(layer) from \(directory)") {
                try CheckpointLoader.loadMoELayer(
                    directory: directory, layer: layer, precision: config.precision, capacity: config.capacity)
            }
        }
    }
}

/// A random input x [tokens, hidden], uniform in [−1, 1), deterministic in `seed` (its own stream, so it does
/// not repeat any weight tensor's values).
func randomInput(tokens: Int, hidden: Int, seed: UInt64) -> HostTensor {
    let values = SeededRandom(seed: seed).uniformArray(count: tokens * hidden, stream: 0x1_0000, scale: 1)
    // Cannot fail: the count is the shape's product.
    return try! HostTensor(shape: [tokens, hidden], float32: values)
}
