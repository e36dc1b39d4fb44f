/// Saves an `MoELayer` as a minimal Hugging Face checkpoint of one family: a config.json whose MoE fields
/// describe the layer and the layer's tensors under the family's names, so `CheckpointLoader` (and transformers'
/// naming) reads it back. Only the one MoE layer's tensors are written; attention, embeddings and other layers
/// are not, so this makes test fixtures and layer exports, not runnable models.
public enum CheckpointWriter {
    /// How the routed experts' matrices are stored.
    public enum ExpertLayout: Sendable, Hashable {
        /// One tensor per expert and projection (the hub format; what transformers 5.x's save_pretrained writes).
        case perExpert
        /// transformers 5.x's in-memory fused tensors: `experts.gate_up_proj` [E, 2I, H], `experts.down_proj`.
        case fused
    }

    /// Writes `layer` to `directory` (created if missing; its parent must exist) as decoder layer `layerIndex`
    /// of a `family` checkpoint with `hiddenLayers` layers (default `layerIndex + 1`).
    ///
    /// Matrices are stored in `dtype` (default: each tensor's own element type); the selection bias stays F32.
    /// FP8 matrices are written as DeepSeek-V3 and Qwen3 FP8 store them (docs/fp8.md): `F8_E4M3` codes, the block
    /// scales as `<name>_scale_inv` F32, and `quantization_config` in config.json.
    /// The config makes `layerIndex` an MoE layer (DeepSeek: `first_k_dense_replace = layerIndex`).
    /// Throws `.unsupported` when the layer cannot be expressed in the family (e.g. a plain FFN, a softmax router
    /// for deepseek_v3, a Qwen2-MoE layer without a gated shared expert).
    public static func saveMoELayer(
        _ layer: MoELayer, family: ModelFamily, to directory: String, layerIndex: Int = 0, hiddenLayers: Int? = nil,
        dtype: ElementType? = nil, expertLayout: ExpertLayout = .perExpert, shards: Int = 1
    ) throws(CheckpointError) {
        let layers = hiddenLayers ?? layerIndex + 1
        guard layerIndex >= 0, layerIndex < layers else {
            throw CheckpointError(
                .layerOutOfRange, "layer index \(layerIndex) must lie in 0..<hiddenLayers (\(layers))")
        }
        var config = try configJSON(layer.config, family: family, layerIndex: layerIndex, hiddenLayers: layers)
        let names = MoETensorNames(family: family, prefix: "model.layers.\(layerIndex).\(family.blockNames[0])")
        let tensors = try tensors(layer, names: names, dtype: dtype, layout: expertLayout)
        if tensors.values.contains(where: { $0.dtype == .float8E4M3 }), case .object(let fields) = config {
            // The block-scaled FP8 format of DeepSeek-V3 and Qwen3 FP8 (docs/fp8.md).
            config = .object(
                fields.members.map { ($0.key, $0.value) } + [
                    (
                        "quantization_config",
                        .object([
                            ("activation_scheme", .string("dynamic")), ("fmt", .string("e4m3")),
                            ("quant_method", .string("fp8")),
                            ("weight_block_size", .array([.int(FP8Scaling.blockSize), .int(FP8Scaling.blockSize)])),
                        ])
                    )
                ])
        }
        do {
            try FileSystem.makeDirectory(directory)
            try FileSystem.writeFile(directory + "/config.json", chunks: [Array(config.serialized.utf8)])
        } catch {
            throw CheckpointError(.invalidConfig, error.description)
        }
        do {
            try SafetensorsCheckpoint.write(tensors, to: directory, shards: shards)
        } catch {
            throw CheckpointError(error)
        }
    }

    /// The config.json for a layer of `family`, after checking that the family can express it.
    static func configJSON(_ c: MoEConfig, family: ModelFamily, layerIndex: Int, hiddenLayers: Int)
        throws(CheckpointError) -> JSONValue
    {
        func unsupported(_ why: String) -> CheckpointError {
            CheckpointError(.unsupported, "this layer cannot be saved as \(family): \(why)")
        }
        guard c.ffn == .gated, !c.bias else { throw unsupported("the family's experts are gated FFNs without biases") }
        let r = c.router
        var fields: [(String, JSONValue)] = [
            ("architectures", .array([.string(family.architecture)])),
            ("model_type", .string(family.rawValue)),
            ("hidden_size", .int(c.hiddenSize)),
            ("num_hidden_layers", .int(hiddenLayers)),
            ("hidden_act", .string(huggingFaceName(c.activation))),
            ("num_experts_per_tok", .int(c.topK)),
        ]
        switch family {
        case .mixtral, .qwen2Moe, .qwen3Moe:
            guard r.scoring == .softmax, r.groups == 1, !r.selectionBias, r.scalingFactor == 1 else {
                throw unsupported("its router is softmax top-k without groups, selection bias or scaling")
            }
            if family == .mixtral {
                guard r.renormalize else { throw unsupported("Mixtral always renormalises the top-k weights") }
                guard c.sharedExpert == nil else { throw unsupported("Mixtral has no shared expert") }
                fields += [("intermediate_size", .int(c.intermediateSize)), ("num_local_experts", .int(c.experts))]
            } else {
                fields += [
                    ("moe_intermediate_size", .int(c.intermediateSize)), ("num_experts", .int(c.experts)),
                    ("norm_topk_prob", .bool(r.renormalize)), ("decoder_sparse_step", .int(1)),
                    ("mlp_only_layers", .array([])),
                ]
                if family == .qwen2Moe {
                    guard let s = c.sharedExpert, s.gated else {
                        throw unsupported("Qwen2-MoE has exactly one shared expert with a sigmoid gate")
                    }
                    fields.append(("shared_expert_intermediate_size", .int(s.intermediateSize)))
                } else if c.sharedExpert != nil {
                    throw unsupported("Qwen3-MoE has no shared expert")
                }
            }
        case .deepSeekV3:
            guard r.scoring == .sigmoid, r.selectionBias else {
                throw unsupported("its router scores with a sigmoid and has a selection bias (e_score_correction_bias)")
            }
            var sharedCount = 0
            if let s = c.sharedExpert {
                guard !s.gated, s.intermediateSize % c.intermediateSize == 0 else {
                    throw unsupported(
                        "its shared experts are ungated, of width moe_intermediate_size × n_shared_experts (got \(s.intermediateSize) for I = \(c.intermediateSize))")
                }
                sharedCount = s.intermediateSize / c.intermediateSize
            }
            fields += [
                ("moe_intermediate_size", .int(c.intermediateSize)), ("n_routed_experts", .int(c.experts)),
                ("n_shared_experts", .int(sharedCount)), ("n_group", .int(r.groups)), ("topk_group", .int(r.groupsKept)),
                ("norm_topk_prob", .bool(r.renormalize)), ("routed_scaling_factor", .double(Double(r.scalingFactor))),
                ("first_k_dense_replace", .int(layerIndex)), ("scoring_func", .string("sigmoid")),
                ("topk_method", .string("noaux_tc")),
            ]
        }
        return .object(fields)
    }

    /// The Hugging Face `hidden_act` spelling of an activation.
    static func huggingFaceName(_ a: Activation) -> String {
        switch a {
        case .relu: "relu"
        case .gelu: "gelu"
        case .geluTanh: "gelu_pytorch_tanh"
        case .silu: "silu"
        }
    }

    private static func tensors(_ layer: MoELayer, names: MoETensorNames, dtype: ElementType?, layout: ExpertLayout)
        throws(CheckpointError) -> [String: SafetensorsTensor]
    {
        let w = layer.weights, c = layer.config
        let (e, h, i) = (c.experts, c.hiddenSize, c.intermediateSize)
        var out: [String: SafetensorsTensor] = [:]
        /// Writes `t` as `name`; an FP8 tensor also gets its block scales as `<name>_scale_inv` (F32).
        func store(_ name: String, _ t: HostTensor) throws(CheckpointError) {
            let stored = t.converted(to: dtype ?? t.elementType)
            out[name] = SafetensorsTensor(stored)
            if let b = stored.fp8Blocks {
                do {
                    out[FP8CheckpointTensor.scaleName(name)] = try SafetensorsTensor(
                        shape: FP8Blocks.scaleShape(stored.shape), values: b.scales)
                } catch {
                    throw CheckpointError(error)
                }
            }
        }
        func slices(_ t: HostTensor, _ shape: [Int]) throws(CheckpointError) -> [HostTensor] {
            var out: [HostTensor] = []
            for x in 0..<e {
                do {
                    out.append(try t.slice(x..<(x + 1)).reshaped(shape))  // FP8 keeps each matrix's blocks
                } catch {
                    throw CheckpointError(.shapeMismatch, error.message)
                }
            }
            return out
        }
        try store(names.router, w.router)
        guard let w3 = w.w3 else { throw CheckpointError(.unsupported, "a gated layer needs w3 (the up projection)") }
        switch layout {
        case .perExpert:
            let p = names.family.projectionNames
            for (tensor, proj, shape) in [(w.w1, p.gate, [i, h]), (w3, p.up, [i, h]), (w.w2, p.down, [h, i])] {
                for (x, slice) in try slices(tensor, shape).enumerated() { try store(names.expert(x, proj), slice) }
            }
        case .fused:
            if [w.w1, w3, w.w2].contains(where: { $0.elementType == .float8E4M3 }) || dtype == .float8E4M3 {
                throw CheckpointError(
                    .unsupported, "FP8 experts are written one tensor per expert (with their scales), not fused")
            }
            let g = w.w1.floats(), u = w3.floats()
            var fused: [Float] = []
            fused.reserveCapacity(2 * e * i * h)
            for x in 0..<e {
                fused += g[(x * i * h)..<((x + 1) * i * h)]
                fused += u[(x * i * h)..<((x + 1) * i * h)]
            }
            do {
                try store(names.fusedGateUp, try HostTensor(shape: [e, 2 * i, h], values: fused, as: w.w1.elementType))
            } catch let error as CheckpointError {
                throw error
            } catch {
                throw CheckpointError(.shapeMismatch, "\(error)")
            }
            try store(names.fusedDown, w.w2)
        }
        if let bias = w.selectionBias { out[names.selectionBias] = SafetensorsTensor(bias.converted(to: .float32)) }
        if let s = w.shared {
            let p = names.family.projectionNames
            guard let g = names.shared(p.gate), let u = names.shared(p.up), let d = names.shared(p.down), let s3 = s.w3
            else { throw CheckpointError(.unsupported, "\(names.family) has no gated shared expert") }
            try store(g, s.w1)
            try store(u, s3)
            try store(d, s.w2)
            if let gate = s.gate { try store(names.sharedGate, gate) }
        }
        return out
    }
}
