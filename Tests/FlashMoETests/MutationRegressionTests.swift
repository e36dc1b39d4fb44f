import Foundation
import Testing
@testable import FlashMoE

/// The defects the mutation fuzzer found (MutationFuzzTests), each as a named case.
@Suite struct MutationRegressionTests {
    /// A qwen3_moe fixture whose config.json says moe_intermediate_size = `width`.
    static func checkpoint(width: String, in dir: String) throws -> Int {
        let source = "\(TransformersFixtureTests.root)/qwen3_moe/save_pretrained"
        let config = try String(contentsOfFile: source + "/config.json", encoding: .utf8)
            .replacingOccurrences(of: "\"moe_intermediate_size\": 8", with: "\"moe_intermediate_size\": \(width)")
        let model = try readBytes(source + "/model.safetensors")
        try writeBytes(Array(config.utf8), to: dir + "/config.json")
        try writeBytes(model, to: dir + "/model.safetensors")
        return config.utf8.count + model.count
    }

    /// Found by the fuzzer: the per-expert stacks were reserved from config.json's sizes before any expert's
    /// header entry was checked, so a config.json claiming a huge intermediate size (with a router that matches
    /// the file) trapped on a terabyte allocation. Now every entry is checked first: a typed shape mismatch, and
    /// nothing is allocated past the files' size.
    @Test(arguments: ["4294967296", "1099511627776", "16"])
    func hugeIntermediateSizeIsAShapeMismatch(_ width: String) throws {
        try withTemporaryDirectory { dir in
            let total = try Self.checkpoint(width: width, in: dir)
            let recorder = ReadAllocation.Recorder()
            let error = ReadAllocation.$recorder.withValue(recorder) {
                #expect(throws: CheckpointError.self) {
                    try CheckpointLoader.loadMoELayer(directory: dir, layer: 1, precision: .fp32)
                }
            }
            #expect(error?.kind == .shapeMismatch, "\(error?.message ?? "loaded")")
            #expect(error?.message.contains("moe_intermediate_size = \(width)") == true)
            let s = recorder.snapshot
            #expect(s.largestBytes <= total && s.largestElements <= total, "\(s)")
        }
    }

    /// Found while profiling the fuzzer: a config.json with 65,536 layers, every other one MoE, and a long
    /// mlp_only_layers put every layer into the dense-layer message (hundreds of kilobytes). Both lists are cut.
    @Test func layerListsInMessagesAreCut() throws {
        let only = (0..<5000).map { String($0 * 4 + 1) }.joined(separator: ",")  // every other MoE layer
        let json = #"{"model_type": "qwen3_moe", "num_hidden_layers": 65536, "decoder_sparse_step": 2, "#
            + #""mlp_only_layers": [\#(only)]}"#
        let spec = try CheckpointConfig(json: Array(json.utf8))
        #expect(spec.moeLayers.count == 32768 - 5000)
        #expect(spec.moeLayerSummary.hasPrefix("3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63, …"))
        #expect(spec.moeLayerSummary.hasSuffix("(27768 MoE layers)") && spec.moeLayerSummary.count < 200)
        #expect(spec.denseReason.contains("… (5000 layers)") && spec.denseReason.count < 300)
    }

    /// The guard itself: a stack larger than the tensors backing it is refused before it is allocated.
    @Test func aStackLargerThanItsTensorsIsRefused() {
        let recorder = ReadAllocation.Recorder()
        let error = ReadAllocation.$recorder.withValue(recorder) {
            #expect(throws: SafetensorsError.self) {
                _ = try ElementStack(elementType: .float32, capacity: 1 << 40, backing: 100)
            }
        }
        #expect(error?.kind == .sizeMismatch)
        #expect(recorder.snapshot.refused == 1 && recorder.snapshot.largestElements == 0)
    }
}
