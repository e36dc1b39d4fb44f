/// The MoE-relevant part of a Hugging Face `config.json`: the family, the layer count, which layers are MoE,
/// and the layer configuration (FP32, dropless; the loader sets the precision and capacity asked for).
///
/// Fields absent from config.json take transformers' defaults for the family (transformers 5.17's config
/// classes), because that is what transformers itself would run. A field present with the wrong type or `null`
/// where transformers needs a value is an error naming the field.
public struct CheckpointConfig: Sendable, Equatable {
    /// How a family decides which decoder layers hold an MoE block.
    enum SparseLayers: Sendable, Equatable {
        /// Every layer (Mixtral).
        case all
        /// Layer l is MoE when l ∉ mlp_only_layers and (l + 1) % decoder_sparse_step == 0 (Qwen-MoE).
        case qwen(step: Int, mlpOnly: Set<Int>)
        /// Layer l is MoE when l ≥ first_k_dense_replace (DeepSeek-V3).
        case firstDense(Int)
        /// No layer (a Qwen-MoE config with num_experts = 0).
        case none
    }

    /// The most decoder layers accepted (far above any real model; bounds the work of listing MoE layers).
    public static let maximumLayers = 1 << 16

    /// The checkpoint's family.
    public let family: ModelFamily
    /// `num_hidden_layers`.
    public let hiddenLayers: Int
    /// The MoE layer's configuration as config.json describes it (FP32, dropless).
    public let layerConfig: MoEConfig
    let sparseLayers: SparseLayers
    /// The config.json fields that gave H, I and E (for error messages), e.g. "hidden_size = 64, …".
    let shapeFields: String
    /// `quantization_config` when the checkpoint is block-scaled FP8 (docs/fp8.md); nil when unquantized.
    public let fp8Quantization: FP8QuantizationConfig?

    /// Whether decoder layer `layer` has an MoE block (false outside 0..<hiddenLayers).
    public func isMoE(layer: Int) -> Bool {
        guard layer >= 0, layer < hiddenLayers else { return false }
        switch sparseLayers {
        case .all: return true
        case .qwen(let step, let mlpOnly): return !mlpOnly.contains(layer) && (layer + 1) % step == 0
        case .firstDense(let k): return layer >= k
        case .none: return false
        }
    }

    /// The indices of the MoE layers.
    public var moeLayers: [Int] { (0..<hiddenLayers).filter { isMoE(layer: $0) } }

    /// Reads `config.json` in `directory`.
    public init(directory: String) throws(CheckpointError) {
        let path = directory + "/config.json"
        let bytes: [UInt8]
        do {
            bytes = try FileSystem.readFile(path, limit: 64 << 20)
        } catch {
            throw CheckpointError(.invalidConfig, "\(error): a Hugging Face checkpoint directory has a config.json")
        }
        try self.init(json: bytes)
    }

    /// Parses the text of a `config.json`.
    public init(json bytes: [UInt8]) throws(CheckpointError) {
        let object: JSONObject
        do {
            object = try JSONParser.parseObject(bytes)
        } catch {
            switch error {
            case .invalid(let e): throw CheckpointError(.invalidConfig, "config.json is not valid JSON: \(e)")
            case .notObject(let kind): throw CheckpointError(.invalidConfig, "config.json must be a JSON object, found \(kind)")
            case .duplicateKey(let k): throw CheckpointError(.invalidConfig, "config.json sets '\(k)' more than once")
            }
        }
        let f = ConfigFields(object: object)
        guard case .string(let modelType)? = object["model_type"] else {
            throw CheckpointError(.invalidConfig, "config.json lacks a 'model_type' string")
        }
        guard let family = ModelFamily(modelType: modelType) else {
            throw CheckpointError(
                .unknownFamily,
                "model_type '\(modelType)' is not supported: the MoE loader knows \(ModelFamily.allCases.map(\.rawValue).joined(separator: ", "))"
            )
        }
        self.family = family
        fp8Quantization = try FP8QuantizationConfig(object["quantization_config"])

        let actName = try f.string("hidden_act", default: "silu")
        guard let activation = Activation(huggingFace: actName) else {
            throw CheckpointError(
                .unsupported,
                "hidden_act '\(actName)' is not supported: use relu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, silu or swish")
        }

        let hidden: Int, intermediate: Int, experts: Int, topK: Int
        var router = RouterConfig.softmax(renormalize: true)
        var shared: SharedExpertConfig?
        let fields: (h: String, i: String, e: String)
        var sharedField = ""
        switch family {
        case .mixtral:
            hiddenLayers = try f.int("num_hidden_layers", default: 32)
            hidden = try f.int("hidden_size", default: 4096)
            intermediate = try f.int("intermediate_size", default: 14336)
            experts = try f.int(["num_local_experts", "num_experts"], default: 8)
            topK = try f.int("num_experts_per_tok", default: 2)
            sparseLayers = .all
            fields = ("hidden_size", "intermediate_size", "num_local_experts")
        case .qwen2Moe, .qwen3Moe:
            let isQwen2 = family == .qwen2Moe
            hiddenLayers = try f.int("num_hidden_layers", default: 24)
            hidden = try f.int("hidden_size", default: 2048)
            intermediate = try f.int("moe_intermediate_size", default: isQwen2 ? 1408 : 768)
            experts = try f.int(["num_experts", "num_local_experts"], default: isQwen2 ? 60 : 128)
            topK = try f.int("num_experts_per_tok", default: isQwen2 ? 4 : 8)
            router = .softmax(renormalize: try f.bool("norm_topk_prob", default: false))
            if isQwen2 {
                let width = try f.int("shared_expert_intermediate_size", default: 5632)
                shared = SharedExpertConfig(intermediateSize: width, gated: true)
                sharedField = ", shared_expert_intermediate_size = \(width)"
            }
            let step = try f.int("decoder_sparse_step", default: 1)
            guard step >= 1 else {
                throw CheckpointError(.invalidConfig, "config.json: decoder_sparse_step must be at least 1 (got \(step))")
            }
            sparseLayers = experts > 0 ? .qwen(step: step, mlpOnly: Set(try f.intList("mlp_only_layers"))) : .none
            fields = ("hidden_size", "moe_intermediate_size", "num_experts")
        case .deepSeekV3:
            hiddenLayers = try f.int("num_hidden_layers", default: 61)
            hidden = try f.int("hidden_size", default: 7168)
            intermediate = try f.int("moe_intermediate_size", default: 2048)
            experts = try f.int(["n_routed_experts", "num_local_experts"], default: 256)
            topK = try f.int("num_experts_per_tok", default: 8)
            let scoring = try f.string("scoring_func", default: "sigmoid")
            guard scoring == "sigmoid" else {
                throw CheckpointError(
                    .unsupported, "scoring_func '\(scoring)' is not supported for deepseek_v3: only sigmoid is")
            }
            let method = try f.string("topk_method", default: "noaux_tc")
            guard method == "noaux_tc" else {
                throw CheckpointError(
                    .unsupported, "topk_method '\(method)' is not supported for deepseek_v3: only noaux_tc is")
            }
            let scaling = try f.double("routed_scaling_factor", default: 2.5)
            router = .deepSeek(
                groups: try f.int("n_group", default: 8), groupsKept: try f.int("topk_group", default: 4),
                renormalize: try f.bool("norm_topk_prob", default: true), scalingFactor: Float(scaling))
            let sharedCount = try f.int("n_shared_experts", default: 1)
            guard sharedCount >= 0 else {
                throw CheckpointError(.invalidConfig, "config.json: n_shared_experts must be ≥ 0 (got \(sharedCount))")
            }
            // transformers builds a shared MLP of width moe_intermediate_size × n_shared_experts; width 0 adds 0.
            sharedField = ", n_shared_experts = \(sharedCount)"
            if sharedCount > 0 {
                let (width, overflow) = intermediate.multipliedReportingOverflow(by: sharedCount)
                guard !overflow else {
                    throw CheckpointError(.invalidConfig, "config.json: moe_intermediate_size × n_shared_experts overflows")
                }
                shared = SharedExpertConfig(intermediateSize: width, gated: false)
            }
            sparseLayers = .firstDense(try f.int("first_k_dense_replace", default: 3))
            fields = ("hidden_size", "moe_intermediate_size", "n_routed_experts")
        }
        guard hiddenLayers >= 0, hiddenLayers <= Self.maximumLayers else {
            throw CheckpointError(
                .invalidConfig, "config.json: num_hidden_layers must lie in 0...\(Self.maximumLayers) (got \(hiddenLayers))")
        }
        // The loader computes E·2I·H and Is·H element counts; sizes whose products overflow are not a real model.
        var elements = 2
        for d in [hidden, intermediate, experts, shared?.intermediateSize ?? 1] {
            let (p, overflow) = elements.multipliedReportingOverflow(by: max(d, 1))
            guard !overflow else {
                throw CheckpointError(
                    .invalidConfig, "config.json: the layer sizes (\(fields.h) = \(hidden), \(fields.i) = \(intermediate), \(fields.e) = \(experts)) overflow an element count")
            }
            elements = p
        }
        shapeFields = "\(fields.h) = \(hidden), \(fields.i) = \(intermediate), \(fields.e) = \(experts)\(sharedField)"
        layerConfig = MoEConfig(
            hiddenSize: hidden, intermediateSize: intermediate, experts: experts, topK: topK, ffn: .gated,
            activation: activation, router: router, sharedExpert: shared)
    }

    /// A short list of the MoE layers for messages: "1, 3, 5–9"; past 16 runs, "… (N MoE layers)", so that a
    /// config with tens of thousands of alternating layers does not put them all into one message.
    var moeLayerSummary: String {
        let layers = moeLayers
        guard !layers.isEmpty else { return "none" }
        var parts: [String] = []
        var start = layers[0], prev = layers[0]
        for l in layers.dropFirst() + [Int.min] {
            if l == prev + 1 {
                prev = l
                continue
            }
            if parts.count == 16 {
                parts.append("… (\(layers.count) MoE layers)")
                break
            }
            parts.append(start == prev ? "\(start)" : "\(start)–\(prev)")
            start = l
            prev = l
        }
        return parts.joined(separator: ", ")
    }

    /// Why `layer` is dense, in the family's own terms.
    var denseReason: String {
        switch sparseLayers {
        case .all: return "it is dense"
        case .qwen(let step, let mlpOnly):
            let listed = mlpOnly.sorted()
            let shown = listed.count > 16 ? "\(listed.prefix(16)) … (\(listed.count) layers)" : "\(listed)"
            return "a layer l is MoE when l is not in mlp_only_layers \(shown) and (l + 1) is a multiple of decoder_sparse_step (\(step))"
        case .firstDense(let k): return "the first first_k_dense_replace = \(k) layers are dense"
        case .none: return "the config has no routed experts"
        }
    }
}

/// Typed access to config.json fields with transformers' defaults and messages that name the field.
private struct ConfigFields {
    let object: JSONObject

    private func value(_ keys: [String]) -> (key: String, value: JSONValue)? {
        for k in keys { if let v = object[k] { return (k, v) } }
        return nil
    }

    private func wrongType(_ key: String, _ v: JSONValue, _ wanted: String) -> CheckpointError {
        CheckpointError(.invalidConfig, "config.json: '\(key)' must be \(wanted), found \(v.kindDescription)")
    }

    func int(_ key: String, default d: Int) throws(CheckpointError) -> Int { try int([key], default: d) }

    /// The first of `keys` present (aliases, as transformers' attribute_map allows), or the default.
    func int(_ keys: [String], default d: Int) throws(CheckpointError) -> Int {
        guard let (k, v) = value(keys) else { return d }
        guard case .number(let n) = v, let i = n.integer else { throw wrongType(k, v, "an integer") }
        return i
    }

    func double(_ key: String, default d: Double) throws(CheckpointError) -> Double {
        guard let (k, v) = value([key]) else { return d }
        guard case .number(let n) = v, let x = n.double, x.isFinite else { throw wrongType(k, v, "a finite number") }
        return x
    }

    func bool(_ key: String, default d: Bool) throws(CheckpointError) -> Bool {
        guard let (k, v) = value([key]) else { return d }
        guard case .bool(let b) = v else { throw wrongType(k, v, "true or false") }
        return b
    }

    func string(_ key: String, default d: String) throws(CheckpointError) -> String {
        guard let (k, v) = value([key]) else { return d }
        guard case .string(let s) = v else { throw wrongType(k, v, "a string") }
        return s
    }

    /// A list of integers; absent or null is empty (transformers turns None into []).
    func intList(_ key: String) throws(CheckpointError) -> [Int] {
        guard let (k, v) = value([key]) else { return [] }
        if v == .null { return [] }
        guard case .array(let a) = v else { throw wrongType(k, v, "a list of integers") }
        var out: [Int] = []
        for e in a {
            guard case .number(let n) = e, let i = n.integer else { throw wrongType(k, v, "a list of integers") }
            out.append(i)
        }
        return out
    }
}
