import Foundation
import Testing
@testable import FlashMoE

/// FP8 checkpoints in the DeepSeek-V3 / Qwen3 FP8 format (docs/fp8.md), written by `CheckpointWriter` here (no
/// downloads) and read back by `CheckpointLoader`, and every malformed variant refused with an error naming the
/// tensor or field.
@Suite struct FP8CheckpointTests {
    /// A DeepSeek-V3 layer with H = 256 and I = 192 (so the blocks include partial ones) and a shared expert.
    static let deepSeek = MoEConfig(
        hiddenSize: 256, intermediateSize: 192, experts: 4, topK: 2, ffn: .gated, activation: .silu,
        router: .deepSeek(groups: 2, groupsKept: 1, renormalize: true, scalingFactor: 2.5),
        sharedExpert: SharedExpertConfig(intermediateSize: 192), precision: .fp8)
    static let qwen3 = MoEConfig(
        hiddenSize: 128, intermediateSize: 64, experts: 4, topK: 2, ffn: .gated, activation: .silu,
        router: .softmax(renormalize: true), precision: .bf16)

    static let prefix = "model.layers.0.mlp"

    /// Writes an fp8 DeepSeek checkpoint of `config` (default: the fixture's layer) to `dir` as layer `layerIndex`
    /// in `shards` files, optionally its shared expert in FP8 too; returns the layer.
    @discardableResult
    static func writeDeepSeek(
        _ dir: String, config: MoEConfig = deepSeek, fp8Shared: Bool = false, layerIndex: Int = 0, shards: Int = 1
    ) throws -> MoELayer {
        var w = try MoEWeights.random(config: config, seed: 21)
        if fp8Shared, let s = w.shared {
            w.shared = SharedExpertWeights(
                w1: s.w1.converted(to: .float8E4M3), w3: s.w3?.converted(to: .float8E4M3),
                w2: s.w2.converted(to: .float8E4M3))
        }
        let layer = try MoELayer(config: config, weights: w)
        try CheckpointWriter.saveMoELayer(layer, family: .deepSeekV3, to: dir, layerIndex: layerIndex, shards: shards)
        return layer
    }

    @Test func writesTheHubFormat() throws {
        try withTemporaryDirectory { dir in
            try Self.writeDeepSeek(dir)
            let tensors = try Safetensors.read(path: dir + "/model.safetensors")
            let gate = try #require(tensors["\(Self.prefix).experts.0.gate_proj.weight"])
            #expect(gate.dtype == .float8E4M3 && gate.shape == [192, 256])
            let scale = try #require(tensors["\(Self.prefix).experts.0.gate_proj.weight_scale_inv"])
            #expect(scale.dtype == .float32 && scale.shape == [2, 2])
            #expect(tensors["\(Self.prefix).experts.3.down_proj.weight_scale_inv"]?.shape == [2, 2])
            #expect(tensors["\(Self.prefix).gate.weight"]?.dtype == .bfloat16, "the router stays BF16")
            let spec = try CheckpointConfig(directory: dir)
            #expect(spec.fp8Quantization?.weightBlockSize == [128, 128])
        }
    }

    @Test func loadsCodesAndScalesAsTheyAre() throws {
        try withTemporaryDirectory { dir in
            let original = try Self.writeDeepSeek(dir)
            let loaded = try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .fp8)
            #expect(loaded.weights.w1.fp8Blocks != nil && loaded.weights.w2.fp8Blocks != nil)
            #expect(loaded.weights.w1 == original.weights.w1)
            #expect(loaded.weights.w3 == original.weights.w3)
            #expect(loaded.weights.w2 == original.weights.w2)
            #expect(loaded.weights.router == original.weights.router)
            let x = try Fixture.input(tokens: 33, hidden: 256, as: .bfloat16)
            let a = try CPUBackend(layer: loaded, mode: .oracle).forward(x).output.floats()
            let b = try CPUBackend(layer: original, mode: .oracle).forward(x).output.floats()
            #expect(a.map(\.bitPattern) == b.map(\.bitPattern))
            // At another precision the experts are dequantized.
            let bf16 = try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .bf16)
            #expect(bf16.weights.w2 == original.weights.w2.converted(to: .bfloat16))
        }
    }

    @Test func anFP8SharedExpertIsDequantizedToBF16() throws {
        try withTemporaryDirectory { dir in
            let original = try Self.writeDeepSeek(dir, fp8Shared: true)
            let tensors = try Safetensors.read(path: dir + "/model.safetensors")
            #expect(tensors["\(Self.prefix).shared_experts.down_proj.weight"]?.dtype == .float8E4M3)
            let loaded = try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .fp8)
            let shared = try #require(loaded.weights.shared)
            #expect(shared.w2.elementType == .bfloat16)
            #expect(shared.w2 == original.weights.shared?.w2.converted(to: .bfloat16))
        }
    }

    @Test func aBF16CheckpointIsQuantizedOnceAtLoad() throws {
        try withTemporaryDirectory { dir in
            let layer = try MoELayer(config: Self.qwen3, weights: MoEWeights.random(config: Self.qwen3, seed: 5))
            try CheckpointWriter.saveMoELayer(layer, family: .qwen3Moe, to: dir)
            let loaded = try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .fp8)
            let expected = layer.weights.prepared(for: .fp8)
            #expect(loaded.weights.w1 == expected.w1 && loaded.weights.w3 == expected.w3)
            #expect(loaded.weights.w2 == expected.w2)
        }
    }

    /// Rewrites the fixture's tensors with `edit` and expects loading to fail with `kind`, naming `mentions`.
    static func expectRefusal(
        _ kind: CheckpointError.Kind, mentions: String, _ edit: (inout [String: SafetensorsTensor]) throws -> Void
    ) throws {
        try expectRefusal(kind, mentions: mentions, config: nil, edit)
    }

    /// Edits the fixture's config.json text with `config` and expects loading to fail with `kind`.
    static func expectConfigRefusal(
        _ kind: CheckpointError.Kind, mentions: String, config: @escaping (String) -> String
    ) throws {
        try expectRefusal(kind, mentions: mentions, config: config) { _ in }
    }

    static func expectRefusal(
        _ kind: CheckpointError.Kind, mentions: String, config: ((String) -> String)?,
        _ edit: (inout [String: SafetensorsTensor]) throws -> Void
    ) throws {
        try withTemporaryDirectory { dir in
            try writeDeepSeek(dir)
            var tensors = try Safetensors.read(path: dir + "/model.safetensors")
            try edit(&tensors)
            try Safetensors.write(tensors, to: dir + "/model.safetensors")
            if let config {
                let path = dir + "/config.json"
                try config(String(contentsOfFile: path, encoding: .utf8)).write(
                    toFile: path, atomically: true, encoding: .utf8)
            }
            do {
                _ = try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .fp8)
                Issue.record("loading succeeded; expected \(kind) mentioning \(mentions)")
            } catch let error as CheckpointError {
                #expect(error.kind == kind, "\(error.message)")
                #expect(error.message.contains(mentions), "\(error.message)")
            }
        }
    }

    static let scale = "\(prefix).experts.2.up_proj.weight_scale_inv"

    @Test func missingScales() throws {
        try Self.expectRefusal(.missingTensor, mentions: Self.scale) { $0.removeValue(forKey: Self.scale) }
    }

    @Test func scalesOfTheWrongShapeOrType() throws {
        // [3, 4] is what 64 × 64 blocks would need for [192, 256].
        try Self.expectRefusal(.shapeMismatch, mentions: Self.scale) {
            $0[Self.scale] = try SafetensorsTensor(shape: [3, 4], values: [Float](repeating: 1, count: 12))
        }
        try Self.expectRefusal(.shapeMismatch, mentions: Self.scale) {
            $0[Self.scale] = try SafetensorsTensor(shape: [2, 2], values: [Int32](repeating: 1, count: 4))
        }
    }

    @Test(arguments: [Float.nan, .infinity, -.infinity]) func nonFiniteScales(_ value: Float) throws {
        try Self.expectRefusal(.invalidScale, mentions: Self.scale) {
            $0[Self.scale] = try SafetensorsTensor(shape: [2, 2], values: [1, 1, value, 1] as [Float])
        }
    }

    @Test func aBF16ScaleTensorLoads() throws {
        try withTemporaryDirectory { dir in
            let original = try Self.writeDeepSeek(dir)
            var tensors = try Safetensors.read(path: dir + "/model.safetensors")
            // Scales that are exact in BF16 (powers of two) keep the layer's values.
            let s = try #require(tensors[Self.scale]).values(as: Float.self)
            let rounded = s.map { Float(sign: .plus, exponent: $0.exponent, significand: 1) }
            tensors[Self.scale] = try SafetensorsTensor(shape: [2, 2], values: rounded.map { BFloat16($0) })
            try Safetensors.write(tensors, to: dir + "/model.safetensors")
            let loaded = try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .fp8)
            let b = try #require(loaded.weights.w3?.fp8Blocks)
            #expect(Array(b.scales[8..<12]) == rounded)
            #expect(b.codes == original.weights.w3?.fp8Blocks?.codes)
        }
    }

    @Test func quantizationConfigsOtherThanBlockFP8() throws {
        let block = "\"weight_block_size\":[128,128]"
        try Self.expectConfigRefusal(.unsupported, mentions: "weight_block_size", config: {
            $0.replacingOccurrences(of: block, with: "\"weight_block_size\":[64,64]")
        })
        try Self.expectConfigRefusal(.unsupported, mentions: "quant_method 'awq'", config: {
            $0.replacingOccurrences(of: "\"quant_method\":\"fp8\"", with: "\"quant_method\":\"awq\"")
        })
        try Self.expectConfigRefusal(.unsupported, mentions: "activation_scheme", config: {
            $0.replacingOccurrences(of: "\"dynamic\"", with: "\"static\"")
        })
        try Self.expectConfigRefusal(.unsupported, mentions: "fmt", config: {
            $0.replacingOccurrences(of: "\"e4m3\"", with: "\"e5m2\"")
        })
    }

    @Test func fusedFP8ExpertsAndE5M2Weights() throws {
        let gate = "\(Self.prefix).experts.1.gate_proj.weight"
        try Self.expectRefusal(.safetensors, mentions: gate) {
            let t = try #require($0[gate])
            $0[gate] = try SafetensorsTensor(dtype: .float8E5M2, shape: t.shape, data: t.data)
        }
        try Self.expectRefusal(.unsupported, mentions: "\(Self.prefix).experts.gate_up_proj") {
            $0["\(Self.prefix).experts.gate_up_proj"] = try SafetensorsTensor(
                dtype: .float8E4M3, shape: [4, 384, 256], data: [UInt8](repeating: 0, count: 4 * 384 * 256))
        }
    }

    @Test func theWriterRefusesFusedFP8() throws {
        try withTemporaryDirectory { dir in
            let layer = try MoELayer(config: Self.deepSeek, weights: MoEWeights.random(config: Self.deepSeek, seed: 1))
            #expect(throws: CheckpointError.self) {
                try CheckpointWriter.saveMoELayer(layer, family: .deepSeekV3, to: dir, expertLayout: .fused)
            }
        }
    }
}
