import Foundation
@testable import FlashMoE

/// The valid inputs the mutation fuzzer starts from: the transformers fixtures (Tests/Fixtures/transformers) and
/// files generated here, so every input is one or a few mutations away from something that loads.
struct MutationCorpus: Sendable {
    /// One Hugging Face checkpoint directory's files.
    struct Checkpoint: Sendable {
        var config: [UInt8]
        /// File name → bytes (model.safetensors, or the shards and model.safetensors.index.json).
        var files: [String: [UInt8]]
        /// The index file's name when the checkpoint is sharded.
        var index: String?
        /// The parsed seeds the mutations start from (parsed once, not per input).
        var configParts: JSONParts
        var indexParts: JSONParts?
        var safetensorsParts: [String: SafetensorsParts]

        init(config: [UInt8], files: [String: [UInt8]], index: String? = nil) throws {
            self.config = config
            self.files = files
            self.index = index
            configParts = try JSONParts(valid: config)
            indexParts = try index.map { try JSONParts(valid: files[$0] ?? []) }
            var parts: [String: SafetensorsParts] = [:]
            for (name, bytes) in files where name.hasSuffix(".safetensors") {
                parts[name] = try SafetensorsParts(valid: bytes)
            }
            safetensorsParts = parts
        }
    }

    var safetensors: [[UInt8]] = []
    var configs: [[UInt8]] = []
    var checkpoints: [Checkpoint] = []
    var safetensorsParts: [SafetensorsParts] = []
    var configParts: [JSONParts] = []

    static func load() throws -> MutationCorpus {
        var c = MutationCorpus()
        let root = TransformersFixtureTests.root
        for family in ModelFamily.allCases {
            c.safetensors.append(try readBytes("\(root)/\(family.rawValue)/expected.safetensors"))
            for variant in TransformersFixtureTests.variants {
                let dir = "\(root)/\(family.rawValue)/\(variant)"
                let config = try readBytes(dir + "/config.json")
                let model = try readBytes(dir + "/model.safetensors")
                c.configs.append(config)
                c.safetensors.append(model)
                c.checkpoints.append(try Checkpoint(config: config, files: ["model.safetensors": model]))
            }
        }
        c.safetensors += try generatedFiles()
        // One sharded checkpoint per family (the per-expert layout in three shards plus the index).
        for family in ModelFamily.allCases {
            let dir = "\(root)/\(family.rawValue)/save_pretrained"
            let tensors = try Safetensors.read(path: dir + "/model.safetensors")
            try withTemporaryDirectory { tmp in
                try SafetensorsCheckpoint.write(tensors, to: tmp, shards: 3)
                c.checkpoints.append(
                    try Checkpoint(
                        config: try readBytes(dir + "/config.json"), files: try filesOf(tmp),
                        index: SafetensorsCheckpoint.indexFileName))
            }
        }
        // FP8 checkpoints in the DeepSeek-V3 / Qwen3 FP8 format (docs/fp8.md): E4M3 experts with their
        // weight_scale_inv blocks and config.json's quantization_config. One file with a BF16 shared expert, and
        // three shards with an FP8 one (dequantized at load); layer 1, as the transformers fixtures.
        for (fp8Shared, shards) in [(false, 1), (true, 3)] {
            try withTemporaryDirectory { tmp in
                try FP8CheckpointTests.writeDeepSeek(
                    tmp, config: fp8Layer, fp8Shared: fp8Shared, layerIndex: 1, shards: shards)
                // A seed that did not load would leave its mutations only the errors.
                _ = try CheckpointLoader.loadMoELayer(directory: tmp, layer: 1, precision: .fp8)
                let files = try filesOf(tmp, except: "config.json")
                let config = try readBytes(tmp + "/config.json")
                c.configs.append(config)
                if let model = files["model.safetensors"] { c.safetensors.append(model) }
                c.checkpoints.append(
                    try Checkpoint(
                        config: config, files: files, index: shards > 1 ? SafetensorsCheckpoint.indexFileName : nil))
            }
        }
        c.safetensorsParts = try c.safetensors.map { try SafetensorsParts(valid: $0) }
        c.configParts = try c.configs.map { try JSONParts(valid: $0) }
        return c
    }

    /// The files of directory `dir` (but `except`), name → bytes.
    static func filesOf(_ dir: String, except: String? = nil) throws -> [String: [UInt8]] {
        var files: [String: [UInt8]] = [:]
        for name in try FileManager.default.contentsOfDirectory(atPath: dir) where name != except {
            files[name] = try readBytes(dir + "/" + name)
        }
        return files
    }

    /// The FP8 checkpoints' layer: small, with partial 128 × 128 blocks in both dimensions (H = 136, I = 72) and a
    /// shared expert.
    static let fp8Layer = MoEConfig(
        hiddenSize: 136, intermediateSize: 72, experts: 4, topK: 2, ffn: .gated, activation: .silu,
        router: .deepSeek(groups: 2, groupsKept: 1, renormalize: true, scalingFactor: 2.5),
        sharedExpert: SharedExpertConfig(intermediateSize: 72), precision: .fp8)

    /// Small files of every dtype, an empty file, a scalar, zero-size tensors and metadata.
    static func generatedFiles() throws -> [[UInt8]] {
        var every: [String: SafetensorsTensor] = [:]
        for (i, dtype) in SafetensorsDType.allCases.enumerated() {
            let shape = [1 + i % 3, 2]
            let bytes = (0..<(shape[0] * shape[1] * dtype.byteSize)).map { UInt8(truncatingIfNeeded: $0 * 37 + i) }
            every["t\(i)_\(dtype.rawValue)"] = try SafetensorsTensor(dtype: dtype, shape: shape, data: bytes)
        }
        let scalar = try SafetensorsTensor(shape: [], values: [Float(1.5)])
        let empty = try SafetensorsTensor(shape: [0, 3], values: [Float]())
        let x = try SafetensorsTensor(shape: [2, 4], values: (0..<8).map { Float($0) })
        return [
            Safetensors.encode(every, metadata: ["format": "pt", "note": "é ✓"]),
            Safetensors.encode([:]),
            Safetensors.encode(["s": scalar, "z": empty, "x": x]),
            Safetensors.encode(["x": x], metadata: ["format": "pt"]),
        ]
    }
}

/// Runs one input through a reader and names its outcome class: a valid load, or the typed error's kind.
/// Anything else (an untyped error, an allocation past the input's size) is a defect and is returned as such.
enum MutationTargets {
    /// An input's outcome: its class, and a defect description when it is not a typed error or a valid load.
    struct Outcome {
        var label: String
        var defect: String? = nil
    }

    /// A typed error's outcome; an empty message (nothing to tell the user) is a defect.
    static func typed(_ label: String, _ message: String) -> Outcome {
        Outcome(label: label, defect: message.isEmpty ? "a typed error without a message" : nil)
    }

    /// Runs `body` with an allocation recorder and checks that nothing sized from the input's contents was
    /// allocated past the `bytes` the input holds.
    static func guarded(bytes: Int, _ body: () -> Outcome) -> Outcome {
        let recorder = ReadAllocation.Recorder()
        var outcome = ReadAllocation.$recorder.withValue(recorder) { body() }
        let s = recorder.snapshot
        if s.largestBytes > bytes || s.largestElements > bytes {
            outcome.defect = "allocated \(s.largestBytes) bytes / \(s.largestElements) elements from an input of \(bytes) bytes"
        }
        return outcome
    }

    /// A safetensors file decoded in memory; every float tensor converted, integer and BOOL tensors read.
    static func decode(_ bytes: [UInt8]) -> Outcome {
        guarded(bytes: bytes.count) {
            do throws(SafetensorsError) {
                let tensors = try Safetensors.decode(bytes)
                for t in tensors.values {
                    if t.dtype.isHostFloat {
                        _ = try t.hostTensor()
                    } else if t.dtype == .bool {
                        _ = try t.bools()
                    } else if t.dtype == .int32 {
                        _ = try t.values(as: Int32.self)
                    }
                }
                return Outcome(label: "safetensors: loaded")
            } catch {
                return typed("safetensors: \(error.kind)", error.message)
            }
        }
    }

    /// A config.json parsed; when it parses, its MoE layers listed and its layer configuration validated.
    static func config(_ bytes: [UInt8]) -> Outcome {
        guarded(bytes: bytes.count) {
            do throws(CheckpointError) {
                let spec = try CheckpointConfig(json: bytes)
                _ = spec.moeLayerSummary
                do throws(MoEError) {
                    try spec.layerConfig.validate()
                } catch {
                    return typed("config: parsed, layer invalid (\(error.kind))", error.message)
                }
                return Outcome(label: "config: valid")
            } catch {
                return typed("config: \(error.kind)", error.message)
            }
        }
    }

    /// A checkpoint directory written to `dir` and one MoE layer loaded from it (every file read from disk).
    static func load(_ files: [String: [UInt8]], config: [UInt8], layer: Int, precision: Precision, in dir: String)
        -> Outcome
    {
        do {
            for name in try FileManager.default.contentsOfDirectory(atPath: dir) {
                try FileManager.default.removeItem(atPath: dir + "/" + name)
            }
            // The library's writer: no fsync (Foundation's atomic write syncs, and the wait dominated this target).
            try FileSystem.writeFile(dir + "/config.json", chunks: [config])
            for (name, bytes) in files { try FileSystem.writeFile(dir + "/" + name, chunks: [bytes]) }
        } catch {
            return Outcome(label: "harness", defect: "could not write the checkpoint: \(error)")
        }
        let total = files.values.reduce(config.count) { $0 + $1.count }
        return guarded(bytes: total) {
            do throws(CheckpointError) {
                _ = try CheckpointLoader.loadMoELayer(directory: dir, layer: layer, precision: precision)
                return Outcome(label: "checkpoint: loaded")
            } catch {
                return typed("checkpoint: \(error.kind)", error.message)
            }
        }
    }
}
