import Testing
@testable import FlashMoE

/// Checkpoints written by transformers 5.17 itself (Tests/Fixtures/transformers, made by
/// scripts/make_transformers_fixtures.py): `save_pretrained`'s per-expert files and the in-memory fused state dict.
/// Each family's `expected.safetensors` holds layer 1's weights as transformers holds them, stacked
/// (router, w1, w3, w2, selection_bias, shared_*), plus an input `x` [5, 16] and the block's outputs `y` (float32)
/// and `y_f64` (float64) for forward-pass tests.
@Suite struct TransformersFixtureTests {
    static let root: String = {
        // …/Tests/FlashMoETests/ThisFile.swift → …/Tests/Fixtures/transformers
        var parts = "\(#filePath)".split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(2)
        return parts.joined(separator: "/") + "/Fixtures/transformers"
    }()

    static let variants = ["save_pretrained", "state_dict"]

    static func expected(_ family: ModelFamily) throws -> [String: SafetensorsTensor] {
        try Safetensors.read(path: "\(root)/\(family.rawValue)/expected.safetensors")
    }

    @Test(arguments: ModelFamily.allCases, variants)
    func loadsWhatTransformersWrote(_ family: ModelFamily, _ variant: String) throws {
        let layer = try CheckpointLoader.loadMoELayer(
            directory: "\(Self.root)/\(family.rawValue)/\(variant)", layer: 1, precision: .fp32)
        let expected = try Self.expected(family)
        func tensor(_ name: String) throws -> HostTensor? { try expected[name]?.hostTensor() }

        let w = layer.weights
        #expect(try w.router == tensor("router"))
        #expect(try w.w1 == tensor("w1"))
        #expect(try w.w3 == tensor("w3"))
        #expect(try w.w2 == tensor("w2"))
        #expect(try w.selectionBias == tensor("selection_bias"))
        #expect(try w.shared?.w1 == tensor("shared_w1"))
        #expect(try w.shared?.w3 == tensor("shared_w3"))
        #expect(try w.shared?.w2 == tensor("shared_w2"))
        #expect(try w.shared?.gate == tensor("shared_gate"))

        let c = layer.config
        #expect((c.hiddenSize, c.intermediateSize, c.experts, c.topK) == (16, 8, 8, 2))
        #expect(c.ffn == .gated && c.activation == .silu && !c.bias)
        switch family {
        case .mixtral:
            #expect(c.router == .softmax(renormalize: true) && c.sharedExpert == nil)
        case .qwen2Moe:
            #expect(c.router == .softmax(renormalize: false))
            #expect(c.sharedExpert == SharedExpertConfig(intermediateSize: 12, gated: true))
        case .qwen3Moe:
            #expect(c.router == .softmax(renormalize: true) && c.sharedExpert == nil)
        case .deepSeekV3:
            #expect(c.router == .deepSeek(groups: 4, groupsKept: 2, renormalize: true, scalingFactor: 2.5))
            #expect(c.sharedExpert == SharedExpertConfig(intermediateSize: 8, gated: false))
        }
    }

    @Test(arguments: ModelFamily.allCases)
    func layerZeroIsDenseWhereTheConfigSaysSo(_ family: ModelFamily) throws {
        let dir = "\(Self.root)/\(family.rawValue)/save_pretrained"
        if family == .mixtral {
            #expect(try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .bf16).config.experts == 8)
        } else {
            let e = #expect(throws: CheckpointError.self) {
                try CheckpointLoader.loadMoELayer(directory: dir, layer: 0, precision: .fp32)
            }
            #expect(e?.kind == .denseLayer)
            #expect(e?.message.contains("MoE layers 1") == true)
        }
    }

    @Test func fixturesCarryTheForwardPassData() throws {
        for family in ModelFamily.allCases {
            let e = try Self.expected(family)
            #expect(e["x"]?.shape == [5, 16] && e["y"]?.shape == [5, 16] && e["y_f64"]?.dtype == .float64)
        }
    }
}
