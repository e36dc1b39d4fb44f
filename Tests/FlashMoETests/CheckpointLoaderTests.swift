import Foundation
import Testing
@testable import FlashMoE

/// Synthetic checkpoints written by `CheckpointWriter` and read back by `CheckpointLoader`.
@Suite struct CheckpointLoaderTests {
    /// A small layer of each family's shape (H=16, I=8, E=8, k=2; DeepSeek 4 groups, 2 kept).
    static func config(_ family: ModelFamily) -> MoEConfig {
        switch family {
        case .mixtral:
            MoEConfig(hiddenSize: 16, intermediateSize: 8, experts: 8, topK: 2, ffn: .gated, activation: .silu,
                      router: .softmax(renormalize: true))
        case .qwen2Moe:
            MoEConfig(hiddenSize: 16, intermediateSize: 8, experts: 8, topK: 2, ffn: .gated, activation: .silu,
                      router: .softmax(renormalize: false),
                      sharedExpert: SharedExpertConfig(intermediateSize: 12, gated: true))
        case .qwen3Moe:
            MoEConfig(hiddenSize: 16, intermediateSize: 8, experts: 8, topK: 2, ffn: .gated, activation: .geluTanh,
                      router: .softmax(renormalize: true))
        case .deepSeekV3:
            MoEConfig(hiddenSize: 16, intermediateSize: 8, experts: 8, topK: 2, ffn: .gated, activation: .silu,
                      router: .deepSeek(groups: 4, groupsKept: 2, renormalize: true, scalingFactor: 2.5),
                      sharedExpert: SharedExpertConfig(intermediateSize: 16))
        }
    }

    static func layer(_ family: ModelFamily, seed: UInt64 = 7) throws -> MoELayer {
        let c = config(family)
        return try MoELayer(config: c, weights: try MoEWeights.random(config: c, seed: seed))
    }

    @Test(arguments: ModelFamily.allCases)
    func roundTripsEachFamilyExactly(_ family: ModelFamily) throws {
        try withTemporaryDirectory { dir in
            let original = try Self.layer(family)
            try CheckpointWriter.saveMoELayer(original, family: family, to: dir, layerIndex: 1, hiddenLayers: 2)
            let loaded = try CheckpointLoader.loadMoELayer(directory: dir, layer: 1, precision: .fp32)
            #expect(loaded.config == original.config)
            #expect(loaded.weights == original.weights)
            let spec = try CheckpointConfig(directory: dir)
            #expect(spec.family == family && spec.hiddenLayers == 2)
        }
    }

    @Test(arguments: ModelFamily.allCases)
    func fusedShardedAndHalfPrecisionFilesLoadTheSameLayer(_ family: ModelFamily) throws {
        let original = try Self.layer(family, seed: 11)
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(original, family: family, to: dir, expertLayout: .fused, shards: 3)
            #expect(FileSystem.isFile(dir + "/model.safetensors.index.json"))
            let loaded = try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .fp32)
            #expect(loaded.weights == original.weights)
        }
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(original, family: family, to: dir, dtype: .bfloat16)
            let loaded = try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .fp32)
            var expected = original.weights.converted(to: .bfloat16).converted(to: .float32)
            expected.selectionBias = original.weights.selectionBias  // written and read as F32
            #expect(loaded.weights == expected)
            #expect(loaded.weights.w1.elementType == .float32)
        }
    }

    @Test(arguments: [Precision.bf16, .fp16, .tf32])
    func convertsToThePrecisionsStorageType(_ precision: Precision) throws {
        let original = try Self.layer(.deepSeekV3)
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(original, family: .deepSeekV3, to: dir)
            let loaded = try CheckpointLoader.loadMoELayer(
                directory: dir, layer: 0, precision: precision, capacity: .factor(1.25))
            #expect(loaded.config.precision == precision && loaded.config.capacity == .factor(1.25))
            #expect(loaded.weights == original.weights.converted(to: precision.storage))
            #expect(loaded.weights.selectionBias?.elementType == .float32)
        }
    }

    /// Rewrites every tensor name of a single-file checkpoint.
    private func renameTensors(in dir: String, _ rename: (String) -> String) throws {
        let path = dir + "/model.safetensors"
        let tensors = try Safetensors.read(path: path)
        try Safetensors.write(Dictionary(uniqueKeysWithValues: tensors.map { (rename($0.key), $0.value) }), to: path)
    }

    @Test func mixtralLoadsUnderEitherBlockName() throws {
        let original = try Self.layer(.mixtral)
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(original, family: .mixtral, to: dir)
            #expect(try SafetensorsCheckpoint(directory: dir).contains("model.layers.0.block_sparse_moe.experts.7.w2.weight"))
            try renameTensors(in: dir) { $0.replacingOccurrences(of: ".block_sparse_moe.", with: ".mlp.") }
            #expect(try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .fp32).weights == original.weights)
        }
    }

    @Test func nestedTextModelPrefixIsFound() throws {
        let original = try Self.layer(.qwen3Moe)
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(original, family: .qwen3Moe, to: dir)
            try renameTensors(in: dir) { $0.replacingOccurrences(of: "model.layers.", with: "model.language_model.layers.") }
            #expect(try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .fp32).weights == original.weights)
        }
    }

    // MARK: errors

    private func loadError(_ dir: String, layer: Int = 0) -> CheckpointError? {
        #expect(throws: CheckpointError.self) { try CheckpointLoader.loadMoELayer(directory: dir, layer: layer, precision: .fp32) }
    }

    private func editConfig(_ dir: String, _ edit: (inout String) -> Void) throws {
        var text = String(decoding: try readBytes(dir + "/config.json"), as: UTF8.self)
        edit(&text)
        try writeBytes(Array(text.utf8), to: dir + "/config.json")
    }

    @Test func missingTensorIsNamed() throws {
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(try Self.layer(.qwen2Moe), family: .qwen2Moe, to: dir)
            let path = dir + "/model.safetensors"
            var tensors = try Safetensors.read(path: path)
            tensors["model.layers.0.mlp.experts.5.up_proj.weight"] = nil
            try Safetensors.write(tensors, to: path)
            let e = loadError(dir)
            #expect(e?.kind == .missingTensor)
            #expect(e?.message.contains("model.layers.0.mlp.experts.5.up_proj.weight") == true)

            tensors = try Safetensors.read(path: path)
            tensors = tensors.filter { !$0.key.hasSuffix("mlp.gate.weight") }
            try Safetensors.write(tensors, to: path)
            #expect(loadError(dir)?.kind == .missingTensor)
        }
    }

    @Test func shapeMismatchNamesTheTensorAndTheConfigFields() throws {
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(try Self.layer(.qwen3Moe), family: .qwen3Moe, to: dir)
            try editConfig(dir) { $0 = $0.replacingOccurrences(of: "\"moe_intermediate_size\":8", with: "\"moe_intermediate_size\":9") }
            let e = loadError(dir)
            #expect(e?.kind == .shapeMismatch)
            #expect(e?.message.contains("model.layers.0.mlp.experts.0.gate_proj.weight") == true)
            #expect(e?.message.contains("moe_intermediate_size = 9") == true)
        }
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(try Self.layer(.deepSeekV3), family: .deepSeekV3, to: dir)
            try editConfig(dir) { $0 = $0.replacingOccurrences(of: "\"n_shared_experts\":2", with: "\"n_shared_experts\":1") }
            let e = loadError(dir)
            #expect(e?.kind == .shapeMismatch)
            #expect(e?.message.contains("shared_experts") == true)
        }
        try withTemporaryDirectory { dir in
            // More experts in the file than config.json declares.
            try CheckpointWriter.saveMoELayer(try Self.layer(.mixtral), family: .mixtral, to: dir)
            try editConfig(dir) {
                $0 = $0.replacingOccurrences(of: "\"num_local_experts\":8", with: "\"num_local_experts\":4")
            }
            let e = loadError(dir)
            #expect(e?.kind == .shapeMismatch)
        }
    }

    @Test func denseLayersAreRejectedWithTheListOfMoELayers() throws {
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(try Self.layer(.deepSeekV3), family: .deepSeekV3, to: dir, layerIndex: 2, hiddenLayers: 6)
            let e = loadError(dir, layer: 1)
            #expect(e?.kind == .denseLayer)
            #expect(e?.message.contains("first_k_dense_replace = 2") == true)
            #expect(e?.message.contains("2–5") == true)
        }
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(try Self.layer(.qwen2Moe), family: .qwen2Moe, to: dir, layerIndex: 3, hiddenLayers: 8)
            try editConfig(dir) {
                $0 = $0.replacingOccurrences(of: "\"decoder_sparse_step\":1", with: "\"decoder_sparse_step\":2")
                $0 = $0.replacingOccurrences(of: "\"mlp_only_layers\":[]", with: "\"mlp_only_layers\":[5]")
            }
            let spec = try CheckpointConfig(directory: dir)
            #expect(spec.moeLayers == [1, 3, 7])
            let e = loadError(dir, layer: 5)
            #expect(e?.kind == .denseLayer)
            #expect(e?.message.contains("1, 3, 7") == true)
            #expect(loadError(dir, layer: 2)?.kind == .denseLayer)
            #expect(throws: Never.self) { try CheckpointLoader.loadMoELayer(directory: dir, layer: 3, precision: .fp32) }
        }
    }

    @Test func layerOutOfRange() throws {
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(try Self.layer(.mixtral), family: .mixtral, to: dir, hiddenLayers: 2)
            for bad in [2, 100, -1] {
                let e = loadError(dir, layer: bad)
                #expect(e?.kind == .layerOutOfRange)
                #expect(e?.message.contains("num_hidden_layers = 2") == true)
            }
        }
    }

    @Test func unknownFamilyAndBadConfigs() throws {
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(try Self.layer(.mixtral), family: .mixtral, to: dir)
            try editConfig(dir) { $0 = $0.replacingOccurrences(of: "\"model_type\":\"mixtral\"", with: "\"model_type\":\"llama\"") }
            let e = loadError(dir)
            #expect(e?.kind == .unknownFamily)
            #expect(e?.message.contains("llama") == true && e?.message.contains("deepseek_v3") == true)
        }
        let bad: [(String, CheckpointError.Kind)] = [
            ("[]", .invalidConfig),
            ("{", .invalidConfig),
            (#"{"hidden_size": 4}"#, .invalidConfig),
            (#"{"model_type": "mixtral", "hidden_size": "64"}"#, .invalidConfig),
            (#"{"model_type": "mixtral", "hidden_size": 64, "hidden_size": 65}"#, .invalidConfig),
            (#"{"model_type": "mixtral", "hidden_act": "tanh"}"#, .unsupported),
            (#"{"model_type": "qwen3_moe", "norm_topk_prob": 1}"#, .invalidConfig),
            (#"{"model_type": "qwen3_moe", "decoder_sparse_step": 0}"#, .invalidConfig),
            (#"{"model_type": "qwen3_moe", "mlp_only_layers": [1.5]}"#, .invalidConfig),
            (#"{"model_type": "deepseek_v3", "scoring_func": "softmax"}"#, .unsupported),
            (#"{"model_type": "deepseek_v3", "topk_method": "greedy"}"#, .unsupported),
            (#"{"model_type": "deepseek_v3", "n_group": null}"#, .invalidConfig),
            (#"{"model_type": "deepseek_v3", "routed_scaling_factor": "2.5"}"#, .invalidConfig),
            (#"{"model_type": "deepseek_v3", "n_shared_experts": -1}"#, .invalidConfig),
            (#"{"model_type": "mixtral", "num_hidden_layers": 1000000000000}"#, .invalidConfig),
            (#"{"model_type": "mixtral", "hidden_size": 4611686018427387904, "intermediate_size": 4}"#, .invalidConfig),
            (#"{"model_type": "qwen2_moe", "shared_expert_intermediate_size": 9223372036854775807}"#, .invalidConfig),
            (#"{"model_type": "deepseek_v3", "moe_intermediate_size": 4611686018427387904, "n_shared_experts": 4}"#, .invalidConfig),
        ]
        for (text, kind) in bad {
            let e = #expect(throws: CheckpointError.self) { try CheckpointConfig(json: Array(text.utf8)) }
            #expect(e?.kind == kind, "\(text): \(e?.message ?? "")")
        }
    }

    @Test func invalidLayerShapesInConfigAreReported() throws {
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(try Self.layer(.qwen3Moe), family: .qwen3Moe, to: dir)
            try editConfig(dir) { $0 = $0.replacingOccurrences(of: "\"num_experts_per_tok\":2", with: "\"num_experts_per_tok\":9") }
            let e = loadError(dir)
            #expect(e?.kind == .invalidConfig)
            #expect(e?.message.contains("top-k") == true)
        }
    }

    @Test func missingFilesAndNonFloatTensors() throws {
        try withTemporaryDirectory { dir in
            #expect(loadError(dir)?.kind == .invalidConfig)  // no config.json
            try CheckpointWriter.saveMoELayer(try Self.layer(.qwen3Moe), family: .qwen3Moe, to: dir)
            let path = dir + "/model.safetensors"
            var tensors = try Safetensors.read(path: path)
            tensors["model.layers.0.mlp.gate.weight"] = try SafetensorsTensor(
                shape: [8, 16], values: [Int32](repeating: 1, count: 128))
            try Safetensors.write(tensors, to: path)
            let e = loadError(dir)
            #expect(e?.kind == .safetensors)
            #expect(e?.message.contains("I32") == true)
            try writeBytes([1, 2, 3], to: path)
            #expect(loadError(dir)?.kind == .safetensors)
            try writeBytes([], to: path)
            #expect(loadError(dir)?.kind == .safetensors)
        }
    }

    @Test func writerRejectsLayersTheFamilyCannotExpress() throws {
        let plain = MoEConfig(hiddenSize: 8, intermediateSize: 4, experts: 4, topK: 1)
        let plainLayer = try MoELayer(config: plain, weights: try MoEWeights.random(config: plain, seed: 1))
        let qwen2 = try Self.layer(.qwen2Moe), ds = try Self.layer(.deepSeekV3), mix = try Self.layer(.mixtral)
        let cases: [(MoELayer, ModelFamily)] = [
            (plainLayer, .mixtral), (qwen2, .mixtral), (qwen2, .qwen3Moe), (mix, .qwen2Moe), (ds, .qwen3Moe),
            (mix, .deepSeekV3),
        ]
        for (layer, family) in cases {
            try withTemporaryDirectory { dir in
                let e = #expect(throws: CheckpointError.self) { try CheckpointWriter.saveMoELayer(layer, family: family, to: dir) }
                #expect(e?.kind == .unsupported)
            }
        }
    }

    /// Real hub config.json values map to the presets of the same models.
    @Test func hubConfigsMatchThePresets() throws {
        let mixtral = #"{"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu", "num_hidden_layers": 32, "router_aux_loss_coef": 0.02, "torch_dtype": "bfloat16"}"#
        let qwen3 = #"{"model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [], "num_hidden_layers": 48, "hidden_act": "silu", "intermediate_size": 6144}"#
        let deepseek = #"{"model_type": "deepseek_v3", "hidden_size": 7168, "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "norm_topk_prob": true, "routed_scaling_factor": 2.5, "n_shared_experts": 1, "first_k_dense_replace": 3, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "num_hidden_layers": 61, "hidden_act": "silu", "quantization_config": {"fmt": "e4m3", "weight_block_size": [128, 128]}}"#
        for (text, preset, layers) in [(mixtral, Preset.mixtral8x7b, 32), (qwen3, .qwen3_30bA3b, 48), (deepseek, .deepSeekV3, 58)] {
            let spec = try CheckpointConfig(json: Array(text.utf8))
            #expect(spec.layerConfig == preset.config, "\(preset.name)")
            #expect(spec.moeLayers.count == layers)
        }
        // transformers 5.x saves Qwen3-MoE's expert count under its attribute_map alias.
        let aliased = #"{"model_type": "qwen3_moe", "num_local_experts": 16, "num_experts_per_tok": 2}"#
        #expect(try CheckpointConfig(json: Array(aliased.utf8)).layerConfig.experts == 16)
        // Absent fields take transformers' defaults.
        let bare = try CheckpointConfig(json: Array(#"{"model_type": "qwen2_moe"}"#.utf8))
        #expect(bare.layerConfig.experts == 60 && bare.layerConfig.topK == 4 && bare.layerConfig.intermediateSize == 1408)
        #expect(bare.layerConfig.sharedExpert == SharedExpertConfig(intermediateSize: 5632, gated: true))
        #expect(bare.layerConfig.router == .softmax(renormalize: false))
        #expect(bare.hiddenLayers == 24)
    }
}
