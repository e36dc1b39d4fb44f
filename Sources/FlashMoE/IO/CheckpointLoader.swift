/// Loads one MoE layer of a Hugging Face checkpoint directory (config.json + safetensors) as an `MoELayer`.
///
/// Supported families (`model_type`): mixtral, qwen2_moe, qwen3_moe, deepseek_v3. Experts may be stored per
/// expert (`experts.{e}.{w1|gate_proj}.weight`, …: the hub format, and what transformers 5.x's `save_pretrained`
/// writes) or fused as transformers 5.x holds them in memory (`experts.gate_up_proj` [E, 2I, H] with the gate rows
/// first, `experts.down_proj` [E, H, I]). Matrices are converted from the file's float dtype (F64, F32, F16, BF16)
/// to the precision's storage type, rounding to nearest even; DeepSeek's selection bias stays FP32.
///
/// FP8 checkpoints (DeepSeek-V3, Qwen3 FP8; docs/fp8.md): `F8_E4M3` weights with `<name>_scale_inv` block scales and
/// config.json's `quantization_config`. At precision fp8 the experts' codes and scales are kept as they are (and a
/// float checkpoint's experts are quantized once); at other precisions FP8 matrices are dequantized. The router
/// and the shared expert always run in the storage type (FP8 ones are dequantized).
public enum CheckpointLoader {
    /// Loads MoE layer `layer` (0-based decoder layer index) from the checkpoint in `directory`.
    ///
    /// Throws `CheckpointError`: `.invalidConfig` / `.unknownFamily` / `.unsupported` for config.json problems,
    /// `.layerOutOfRange` when `layer` is not below `num_hidden_layers`, `.denseLayer` (listing the MoE layers)
    /// when the layer has a dense MLP, `.missingTensor` and `.shapeMismatch` naming the tensor and the config
    /// fields it disagrees with, `.safetensors` for unreadable files or non-float tensors, `.invalidScale` for a
    /// NaN or ±∞ FP8 block scale (docs/fp8.md lists every FP8 refusal).
    public static func loadMoELayer(
        directory: String, layer: Int, precision: Precision, capacity: Capacity = .dropless
    ) throws(CheckpointError) -> MoELayer {
        let spec = try CheckpointConfig(directory: directory)
        guard layer >= 0, layer < spec.hiddenLayers else {
            throw CheckpointError(
                .layerOutOfRange,
                "layer \(layer) does not exist: config.json has num_hidden_layers = \(spec.hiddenLayers), so choose 0–\(spec.hiddenLayers - 1) (MoE layers: \(spec.moeLayerSummary))"
            )
        }
        guard spec.isMoE(layer: layer) else {
            throw CheckpointError(
                .denseLayer,
                "layer \(layer) of this \(spec.family) checkpoint is a dense MLP, not an MoE block (\(spec.denseReason)): choose one of the MoE layers \(spec.moeLayerSummary)"
            )
        }
        var config = spec.layerConfig
        config.precision = precision
        config.capacity = capacity
        do {
            try config.validate()
        } catch {
            throw CheckpointError(.invalidConfig, "config.json describes an invalid MoE layer: \(error.message)")
        }
        let checkpoint: SafetensorsCheckpoint
        do {
            checkpoint = try SafetensorsCheckpoint(directory: directory)
        } catch {
            throw CheckpointError(error)
        }
        let reader = LayerReader(checkpoint: checkpoint, spec: spec, config: config)
        let names = try reader.resolveNames(layer: layer)
        let weights = try reader.weights(names)
        do {
            return try MoELayer(config: config, weights: weights)
        } catch {
            throw CheckpointError(.shapeMismatch, "layer \(layer): \(error.message)")
        }
    }
}

/// Reads and stacks one layer's tensors, checking each shape against config.json before reading its bytes.
private struct LayerReader {
    let checkpoint: SafetensorsCheckpoint
    let spec: CheckpointConfig
    let config: MoEConfig
    var storage: ElementType { config.precision.storage }

    /// Finds the MoE block's prefix: `model.layers.{layer}.{block}` or, failing that, any name ending in
    /// `layers.{layer}.{block}.gate.weight` (checkpoints that nest the text model, e.g. `model.language_model.`).
    func resolveNames(layer: Int) throws(CheckpointError) -> MoETensorNames {
        for block in spec.family.blockNames {
            let names = MoETensorNames(family: spec.family, prefix: "model.layers.\(layer).\(block)")
            if checkpoint.contains(names.router) { return names }
        }
        for block in spec.family.blockNames {
            let suffix = "layers.\(layer).\(block).gate.weight"
            if let match = checkpoint.names.first(where: { $0 == suffix || $0.hasSuffix("." + suffix) }) {
                return MoETensorNames(family: spec.family, prefix: String(match.dropLast(".gate.weight".count)))
            }
        }
        let expected = "model.layers.\(layer).\(spec.family.blockNames[0]).gate.weight"
        throw CheckpointError(
            .missingTensor,
            "the checkpoint has no router '\(expected)' for layer \(layer): it is not a \(spec.family) checkpoint with this layer, or its shards are incomplete"
        )
    }

    func weights(_ names: MoETensorNames) throws(CheckpointError) -> MoEWeights {
        let (e, h, i) = (config.experts, config.hiddenSize, config.intermediateSize)
        var weights = MoEWeights(
            router: try read(names.router, [e, h]), w1: .zeros(shape: [0]), w2: .zeros(shape: [0]))
        if checkpoint.contains(names.fusedGateUp) {
            for name in [names.fusedGateUp, names.fusedDown] where checkpoint.contains(name) {
                if try info(name, nil).dtype == .float8E4M3 {
                    throw CheckpointError(
                        .unsupported,
                        "tensor '\(name)' is FP8 in the fused expert layout, which has no standard block scales: save the experts one tensor per expert (the hub format)")
                }
            }
            let gateUp = try raw(names.fusedGateUp, [e, 2 * i, h])
            var w1 = try stack(capacity: e * i * h, backing: gateUp.count)
            var w3 = try stack(capacity: e * i * h, backing: gateUp.count)
            for x in 0..<e {
                try append(gateUp, (2 * x * i * h)..<((2 * x + 1) * i * h), to: &w1, names.fusedGateUp)
                try append(gateUp, ((2 * x + 1) * i * h)..<((2 * x + 2) * i * h), to: &w3, names.fusedGateUp)
            }
            weights.w1 = try finish(w1, [e, i, h])
            weights.w3 = try finish(w3, [e, i, h])
            weights.w2 = try read(names.fusedDown, [e, h, i])
        } else {
            let p = spec.family.projectionNames
            weights.w1 = try stackExperts(names, p.gate, [i, h])
            weights.w3 = try stackExperts(names, p.up, [i, h])
            weights.w2 = try stackExperts(names, p.down, [h, i])
            let extra = names.expert(e, p.gate)
            if checkpoint.contains(extra) {
                throw CheckpointError(
                    .shapeMismatch,
                    "the checkpoint has '\(extra)' but config.json says there are \(e) experts (\(spec.shapeFields)): fix the expert count"
                )
            }
        }
        if config.router.selectionBias {
            let bias = try raw(names.selectionBias, [e])
            var s = try stack(capacity: e, backing: bias.count, as: .float32)
            try append(bias, 0..<e, to: &s, names.selectionBias)
            weights.selectionBias = try finish(s, [e])
        }
        if let shared = config.sharedExpert,
            let g = names.shared(spec.family.projectionNames.gate), let u = names.shared(spec.family.projectionNames.up),
            let d = names.shared(spec.family.projectionNames.down)
        {
            let si = shared.intermediateSize
            weights.shared = SharedExpertWeights(
                w1: try read(g, [si, h]), w3: try read(u, [si, h]), w2: try read(d, [h, si]),
                gate: shared.gated ? try read(names.sharedGate, [1, h]) : nil)
        }
        return weights
    }

    /// Stacks `experts.{e}.{projection}.weight` for every expert into [E, rows, cols]. Every expert's header entry
    /// is checked first, so the stack (sized from config.json) is allocated only once the files hold its elements.
    private func stackExperts(_ names: MoETensorNames, _ projection: String, _ shape: [Int]) throws(CheckpointError)
        -> HostTensor
    {
        var fp8 = config.precision == .fp8
        for x in 0..<config.experts where !fp8 {
            fp8 = try info(names.expert(x, projection), shape).dtype == .float8E4M3
        }
        if fp8 { return try stackExpertMatrices(names, projection, shape) }
        let per = shape[0] * shape[1]
        var backing = 0  // elements the experts' validated header entries hold in the files
        for x in 0..<config.experts {
            let entry = try info(names.expert(x, projection), shape)
            backing = min(Int.max / 2, backing + entry.dataOffsets.count / entry.dtype.byteSize)
        }
        var s = try stack(capacity: config.experts * per, backing: backing)
        for x in 0..<config.experts {
            let name = names.expert(x, projection)
            try append(try raw(name, shape), 0..<per, to: &s, name)
        }
        return try finish(s, [config.experts] + shape)
    }

    /// Stacks the experts' matrices when FP8 is involved (docs/fp8.md): for precision fp8, FP8 matrices keep their
    /// codes and block scales and float ones are quantized once (from their BF16 values); for any other precision,
    /// FP8 matrices are dequantized (code × scale) to the storage type.
    private func stackExpertMatrices(_ names: MoETensorNames, _ projection: String, _ shape: [Int])
        throws(CheckpointError) -> HostTensor
    {
        var codes: [FP8E4M3] = [], scales: [Float] = [], values: [Float] = []
        for x in 0..<config.experts {
            let name = names.expert(x, projection)
            let blocks: FP8Blocks
            if try info(name, shape).dtype == .float8E4M3 {
                blocks = try FP8CheckpointTensor(name, shape: shape, checkpoint: checkpoint).blocks
            } else {
                blocks = FP8Blocks(shape: shape, quantizing: try read(name, shape).floats())
            }
            if config.precision == .fp8 {
                codes += blocks.codes
                scales += blocks.scales
            } else {
                values += blocks.codes.indices.map { blocks.float(at: $0) }
            }
        }
        let stacked = [config.experts] + shape
        do {
            if config.precision == .fp8 {
                return try HostTensor(shape: stacked, fp8: FP8Blocks(shape: stacked, codes: codes, scales: scales))
            }
            return try HostTensor(shape: stacked, values: values, as: storage)
        } catch {
            throw CheckpointError(.shapeMismatch, "the experts' '\(projection)' matrices: \(error.message)")
        }
    }

    /// Reads a float tensor of `shape` in the storage type; an FP8 one (with its scales) is dequantized.
    private func read(_ name: String, _ shape: [Int]) throws(CheckpointError) -> HostTensor {
        if try info(name, shape).dtype == .float8E4M3 {
            let blocks = try FP8CheckpointTensor(name, shape: shape, checkpoint: checkpoint).blocks
            do {
                return try HostTensor(shape: shape, fp8: blocks).converted(to: storage)
            } catch {
                throw CheckpointError(.shapeMismatch, "'\(name)': \(error.message)")
            }
        }
        let t = try raw(name, shape)
        var s = try stack(capacity: t.count, backing: t.count)
        try append(t, 0..<t.count, to: &s, name)
        return try finish(s, shape)
    }

    /// Reads a tensor after checking that it exists and has `shape`.
    private func raw(_ name: String, _ shape: [Int]) throws(CheckpointError) -> SafetensorsTensor {
        _ = try info(name, shape)
        do {
            return try checkpoint.tensor(named: name)
        } catch {
            throw CheckpointError(error)
        }
    }

    /// The header entry of a tensor after checking that it exists and has `shape` when one is given (no tensor
    /// bytes are read).
    private func info(_ name: String, _ shape: [Int]?) throws(CheckpointError) -> SafetensorsTensorInfo {
        guard checkpoint.contains(name) else {
            throw CheckpointError(
                .missingTensor,
                "the checkpoint lacks '\(name)' (shape \(shape ?? [])), which a \(spec.family) MoE layer needs: the checkpoint is incomplete or not of this family"
            )
        }
        do {
            let info = try checkpoint.info(named: name)
            guard shape == nil || info.shape == shape else {
                throw CheckpointError(
                    .shapeMismatch,
                    "tensor '\(name)' has shape \(info.shape) but config.json (\(spec.shapeFields)) needs \(shape ?? []): the checkpoint and its config.json disagree"
                )
            }
            return info
        } catch let error as SafetensorsError {
            throw CheckpointError(error)
        } catch let error as CheckpointError {
            throw error
        } catch {
            throw CheckpointError(.safetensors, "\(name): \(error)")
        }
    }

    private func stack(capacity: Int, backing: Int, as type: ElementType? = nil) throws(CheckpointError)
        -> ElementStack
    {
        do {
            return try ElementStack(elementType: type ?? storage, capacity: capacity, backing: backing)
        } catch {
            throw CheckpointError(error)
        }
    }

    private func append(_ t: SafetensorsTensor, _ range: Range<Int>, to s: inout ElementStack, _ name: String)
        throws(CheckpointError)
    {
        do {
            try s.append(t, elements: range)
        } catch {
            throw CheckpointError(.safetensors, "tensor '\(name)': \(error.message)")
        }
    }

    private func finish(_ s: ElementStack, _ shape: [Int]) throws(CheckpointError) -> HostTensor {
        do {
            return try s.tensor(shape: shape)
        } catch {
            throw CheckpointError(error)
        }
    }
}
