/// The weights of one MoE layer, in Hugging Face's `[out, in]` layout (the reduction dimension contiguous).
///
/// | tensor | shape | meaning |
/// |---|---|---|
/// | `router` | [E, H] | gate (router) weight: logits = x·routerᵀ |
/// | `selectionBias` | [E] FP32 | added to scores for choosing only (DeepSeek `e_score_correction_bias`) |
/// | `w1` | [E, I, H] | plain: the first linear; gated: the gate projection (`w1` / `gate_proj`) |
/// | `w3` | [E, I, H] | gated only: the up projection (`w3` / `up_proj`) |
/// | `w2` | [E, H, I] | the second linear (`w2` / `down_proj`) |
/// | `b1`, `b2` | [E, I], [E, H] FP32 | plain FFN biases, when `config.bias` |
/// | `shared` | | the shared expert's weights, when `config.sharedExpert` is set |
public struct MoEWeights: Sendable, Equatable {
    /// [E, H] gate (router) weight: logits = x·routerᵀ.
    public var router: HostTensor
    /// [E] FP32, added to scores for choosing only (DeepSeek `e_score_correction_bias`); nil when the router has none.
    public var selectionBias: HostTensor?
    /// [E, I, H] plain: the first linear; gated: the gate projection (`w1` / `gate_proj`).
    public var w1: HostTensor
    /// [E, I, H] gated only: the up projection (`w3` / `up_proj`); nil for a plain FFN.
    public var w3: HostTensor?
    /// [E, H, I] the second linear (`w2` / `down_proj`).
    public var w2: HostTensor
    /// [E, I] FP32 bias of the plain FFN's first linear, when `config.bias`.
    public var b1: HostTensor?
    /// [E, H] FP32 bias of the plain FFN's second linear, when `config.bias`.
    public var b2: HostTensor?
    /// The shared expert's weights, when `config.sharedExpert` is set.
    public var shared: SharedExpertWeights?

    /// Weights from their tensors, as given; the optional ones default to nil.
    public init(
        router: HostTensor, selectionBias: HostTensor? = nil, w1: HostTensor, w3: HostTensor? = nil,
        w2: HostTensor, b1: HostTensor? = nil, b2: HostTensor? = nil, shared: SharedExpertWeights? = nil
    ) {
        self.router = router
        self.selectionBias = selectionBias
        self.w1 = w1
        self.w3 = w3
        self.w2 = w2
        self.b1 = b1
        self.b2 = b2
        self.shared = shared
    }

    /// Every matrix rounded to `type` (the biases stay FP32).
    public func converted(to type: ElementType) -> MoEWeights {
        MoEWeights(
            router: router.converted(to: type), selectionBias: selectionBias, w1: w1.converted(to: type),
            w3: w3?.converted(to: type), w2: w2.converted(to: type), b1: b1, b2: b2,
            shared: shared?.converted(to: type))
    }

    /// The weights as `precision` runs them: the router and the shared expert in its storage type, the routed
    /// experts' w1, w3 and w2 in `precision.expertWeights` (for fp8: rounded to BF16, then quantized once in
    /// 128×128 blocks; matrices already in FP8 are kept as they are). The biases and the selection bias stay FP32.
    public func prepared(for precision: Precision) -> MoEWeights {
        let (type, experts) = (precision.storage, precision.expertWeights)
        // FP8 is quantized from the storage type's values (BF16), so a layer quantizes the same whatever type
        // its weights came in; matrices already in FP8 are kept.
        func expert(_ t: HostTensor) -> HostTensor {
            t.elementType == experts ? t : t.converted(to: type).converted(to: experts)
        }
        return MoEWeights(
            router: router.converted(to: type), selectionBias: selectionBias, w1: expert(w1), w3: w3.map(expert),
            w2: expert(w2), b1: b1, b2: b2, shared: shared?.converted(to: type))
    }

    /// Total bytes of all tensors.
    public var byteCount: Int {
        [router, selectionBias, w1, w3, w2, b1, b2, shared?.w1, shared?.w3, shared?.w2, shared?.gate]
            .compactMap { $0?.byteCount }.reduce(0, +)
    }
}

/// The shared expert's weights: `w1` [Is, H], `w3` [Is, H] (gated FFN only), `w2` [H, Is], and the optional
/// sigmoid output gate `gate` [1, H] (Qwen2-MoE's `shared_expert_gate`).
public struct SharedExpertWeights: Sendable, Equatable {
    /// [Is, H] plain: the first linear; gated: the gate projection.
    public var w1: HostTensor
    /// [Is, H] gated FFN only: the up projection; nil for a plain FFN.
    public var w3: HostTensor?
    /// [H, Is] the second linear (the down projection).
    public var w2: HostTensor
    /// [1, H] the sigmoid output gate (Qwen2-MoE's `shared_expert_gate`); nil when the shared expert has none.
    public var gate: HostTensor?

    /// The shared expert's tensors, as given; `w3` and `gate` default to nil.
    public init(w1: HostTensor, w3: HostTensor? = nil, w2: HostTensor, gate: HostTensor? = nil) {
        self.w1 = w1
        self.w3 = w3
        self.w2 = w2
        self.gate = gate
    }

    /// Every matrix rounded to `type`.
    public func converted(to type: ElementType) -> SharedExpertWeights {
        SharedExpertWeights(
            w1: w1.converted(to: type), w3: w3?.converted(to: type), w2: w2.converted(to: type),
            gate: gate?.converted(to: type))
    }
}

extension MoEWeights {
    /// Random weights for `config`, stored in the config's precision, like a freshly initialised `nn.Linear`:
    /// uniform in ±1/√fan_in. The selection bias (if any) is uniform in ±0.1 and biases in ±1/√fan_in.
    /// For fp8 the same BF16 values are drawn and the experts' matrices quantized (`prepared(for:)`).
    /// Deterministic in `seed`, whatever the thread count.
    public static func random(config: MoEConfig, seed: UInt64) throws(MoEError) -> MoEWeights {
        try config.validate()
        let rng = SeededRandom(seed: seed)
        let (e, h, i) = (config.experts, config.hiddenSize, config.intermediateSize)
        let type = config.precision.storage
        func make(_ shape: [Int], _ stream: UInt64, fanIn: Int, as t: ElementType) -> HostTensor {
            let n = shape.reduce(1, *)
            let v = rng.uniformArray(count: n, stream: stream, scale: 1 / Float(fanIn).squareRoot())
            return try! HostTensor(shape: shape, values: v, as: t)  // count matches shape by construction
        }
        var w = MoEWeights(
            router: make([e, h], 1, fanIn: h, as: type),
            w1: make([e, i, h], 2, fanIn: h, as: type),
            w2: make([e, h, i], 3, fanIn: i, as: type))
        if config.ffn == .gated { w.w3 = make([e, i, h], 4, fanIn: h, as: type) }
        if config.bias {
            w.b1 = make([e, i], 5, fanIn: h, as: .float32)
            w.b2 = make([e, h], 6, fanIn: i, as: .float32)
        }
        if config.router.selectionBias {
            w.selectionBias = make([e], 7, fanIn: 100, as: .float32)
        }
        if let s = config.sharedExpert {
            let si = s.intermediateSize
            w.shared = SharedExpertWeights(
                w1: make([si, h], 8, fanIn: h, as: type),
                w3: config.ffn == .gated ? make([si, h], 9, fanIn: h, as: type) : nil,
                w2: make([h, si], 10, fanIn: si, as: type),
                gate: s.gated ? make([1, h], 11, fanIn: h, as: type) : nil)
        }
        return w.prepared(for: config.precision)
    }
}
