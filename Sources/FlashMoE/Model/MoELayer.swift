/// A configuration and weights that have been checked against each other: what every backend runs.
public struct MoELayer: Sendable {
    /// The validated configuration.
    public let config: MoEConfig
    /// Weights whose shapes match `config` (any storage type; backends convert to the config's precision).
    public let weights: MoEWeights

    /// Checks that every tensor `config` needs is present with the right shape, and nothing contradicts it.
    public init(config: MoEConfig, weights: MoEWeights) throws(MoEError) {
        try config.validate()
        let (e, h, i) = (config.experts, config.hiddenSize, config.intermediateSize)
        func expect(_ t: HostTensor?, _ shape: [Int], _ name: String) throws(MoEError) {
            guard let t else {
                throw MoEError(.shapeMismatch, "the layer needs tensor '\(name)' with shape \(shape), but it is missing")
            }
            guard t.shape == shape else {
                throw MoEError(
                    .shapeMismatch,
                    "tensor '\(name)' has shape \(t.shape) but the config (H=\(h), I=\(i), E=\(e)) needs \(shape)")
            }
        }
        func forbid(_ t: HostTensor?, _ name: String, _ why: String) throws(MoEError) {
            if t != nil { throw MoEError(.shapeMismatch, "tensor '\(name)' is present but \(why)") }
        }
        try expect(weights.router, [e, h], "router")
        try expect(weights.w1, [e, i, h], "w1")
        try expect(weights.w2, [e, h, i], "w2")
        if config.ffn == .gated {
            try expect(weights.w3, [e, i, h], "w3")
        } else {
            try forbid(weights.w3, "w3", "the FFN is plain: set ffn = gated to use it")
        }
        if config.bias {
            try expect(weights.b1, [e, i], "b1")
            try expect(weights.b2, [e, h], "b2")
        } else {
            try forbid(weights.b1, "b1", "the config has no biases: set bias = true to use it")
            try forbid(weights.b2, "b2", "the config has no biases: set bias = true to use it")
        }
        if config.router.selectionBias {
            try expect(weights.selectionBias, [e], "selectionBias")
        } else {
            try forbid(weights.selectionBias, "selectionBias", "the router has no selection bias")
        }
        if let s = config.sharedExpert {
            guard let sw = weights.shared else {
                throw MoEError(.shapeMismatch, "the config has a shared expert but the weights have none")
            }
            let si = s.intermediateSize
            try expect(sw.w1, [si, h], "shared.w1")
            try expect(sw.w2, [h, si], "shared.w2")
            if config.ffn == .gated { try expect(sw.w3, [si, h], "shared.w3") }
            if s.gated { try expect(sw.gate, [1, h], "shared.gate") }
        } else if weights.shared != nil {
            throw MoEError(.shapeMismatch, "the weights have a shared expert but the config has none")
        }
        self.config = config
        self.weights = weights
    }

    /// Checks an input of shape [S, H]; S = 0 is valid.
    public func checkInput(_ x: HostTensor) throws(MoEError) {
        guard x.shape.count == 2, x.shape[1] == config.hiddenSize else {
            throw MoEError(
                .shapeMismatch,
                "the input must have shape [tokens, \(config.hiddenSize)] (H of the layer), got \(x.shape)")
        }
    }
}
