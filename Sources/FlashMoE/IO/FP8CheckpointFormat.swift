/// config.json's `quantization_config` for the block-scaled FP8 checkpoints of DeepSeek-V3 and Qwen3 (docs/fp8.md):
/// `{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}`.
///
/// Anything else that config.json says there is refused with a `CheckpointError` naming the field: another
/// `quant_method`, another `fmt`, a block size other than [128, 128] (the kernels' K block), static activation
/// scales. A missing `quant_method` is taken as fp8 (some published configs omit it). A config without
/// `quantization_config` is unquantized (FP8 tensors in it still load with their scales).
public struct FP8QuantizationConfig: Sendable, Equatable {
    /// The weight block [rows, columns]; always [128, 128] once parsed.
    public let weightBlockSize: [Int]

    /// Parses `quantization_config`, or returns nil when config.json has none (or `null`).
    init?(_ value: JSONValue?) throws(CheckpointError) {
        guard let value, value != .null else { return nil }
        func fail(_ m: String) -> CheckpointError { CheckpointError(.unsupported, "config.json: quantization_config \(m)") }
        guard case .object(let o) = value else {
            throw CheckpointError(
                .invalidConfig, "config.json: 'quantization_config' must be an object, found \(value.kindDescription)")
        }
        func string(_ key: String) throws(CheckpointError) -> String? {
            guard let v = o[key], v != .null else { return nil }
            guard case .string(let s) = v else {
                throw CheckpointError(
                    .invalidConfig, "config.json: quantization_config.\(key) must be a string, found \(v.kindDescription)")
            }
            return s
        }
        // Absent means fp8: the block-scaled FP8 configs are the ones that describe a weight_block_size.
        if let method = try string("quant_method"), method != "fp8" {
            throw fail(
                "quant_method '\(method)' is not supported: FlashMoE loads block-scaled FP8 checkpoints (quant_method fp8) and unquantized ones")
        }
        if let fmt = try string("fmt"), fmt != "e4m3" {
            throw fail("fmt '\(fmt)' is not supported: only e4m3 weights are (F8_E4M3)")
        }
        if let scheme = try string("activation_scheme"), scheme != "dynamic" {
            throw fail(
                "activation_scheme '\(scheme)' is not supported: FlashMoE quantizes activations per token and 128-channel group (dynamic)")
        }
        var block = [FP8Scaling.blockSize, FP8Scaling.blockSize]
        if let v = o["weight_block_size"], v != .null {
            guard case .array(let a) = v else {
                throw CheckpointError(
                    .invalidConfig,
                    "config.json: quantization_config.weight_block_size must be a list of two integers, found \(v.kindDescription)")
            }
            block = a.compactMap { if case .number(let n) = $0 { n.integer } else { nil } }
            guard block.count == a.count else {
                throw CheckpointError(
                    .invalidConfig, "config.json: quantization_config.weight_block_size must be a list of two integers")
            }
            guard block == [FP8Scaling.blockSize, FP8Scaling.blockSize] else {
                throw fail(
                    "weight_block_size \(block) is not supported: FP8 weights need 128 × 128 blocks ([128, 128]), the K block the GEMMs promote at")
            }
        }
        weightBlockSize = block
    }
}

/// Reads one FP8 weight of a checkpoint with its block scales (`<name>_scale_inv`, e.g. `…weight_scale_inv`),
/// checking both before any value is used.
struct FP8CheckpointTensor {
    /// The E4M3 codes and the scales of one matrix.
    let blocks: FP8Blocks

    /// The name of the scale tensor of weight `name`: `<name>_scale_inv` (DeepSeek-V3 and Qwen3 FP8).
    static func scaleName(_ name: String) -> String { name + "_scale_inv" }

    /// Reads weight `name` (F8_E4M3, of `shape`, already checked) and its scales from `checkpoint`.
    ///
    /// Throws `.missingTensor` when the scale tensor is absent, `.shapeMismatch` when it is not
    /// [⌈rows/128⌉, ⌈cols/128⌉] or not a float tensor, `.invalidScale` for a NaN or ±∞ scale.
    init(_ name: String, shape: [Int], checkpoint: SafetensorsCheckpoint) throws(CheckpointError) {
        let scaleName = Self.scaleName(name)
        let expected = FP8Blocks.scaleShape(shape)
        guard checkpoint.contains(scaleName) else {
            throw CheckpointError(
                .missingTensor,
                "FP8 tensor '\(name)' has no block scales: the checkpoint lacks '\(scaleName)' (shape \(expected), one scale per 128 × 128 block)")
        }
        let codes: SafetensorsTensor, scaleTensor: SafetensorsTensor
        do {
            let info = try checkpoint.info(named: scaleName)
            guard info.shape == expected else {
                throw CheckpointError(
                    .shapeMismatch,
                    "scale tensor '\(scaleName)' has shape \(info.shape) but '\(name)' \(shape) in 128 × 128 blocks needs \(expected): only weight_block_size [128, 128] is supported")
            }
            guard info.dtype.isHostFloat else {
                throw CheckpointError(
                    .shapeMismatch, "scale tensor '\(scaleName)' is \(info.dtype): block scales must be F32, BF16 or F16")
            }
            codes = try checkpoint.tensor(named: name)
            scaleTensor = try checkpoint.tensor(named: scaleName)
        } catch let error as CheckpointError {
            throw error
        } catch let error as SafetensorsError {
            throw CheckpointError(error)
        } catch {
            throw CheckpointError(.safetensors, "\(scaleName): \(error)")
        }
        let scales: [Float]
        do {
            scales = try scaleTensor.hostTensor(as: .float32).floats()
        } catch {
            throw CheckpointError(.safetensors, "scale tensor '\(scaleName)': \(error.message)")
        }
        if let bad = scales.firstIndex(where: { !$0.isFinite }) {
            throw CheckpointError(
                .invalidScale,
                "scale tensor '\(scaleName)' holds \(scales[bad]) at block \(bad): FP8 block scales must be finite (the checkpoint is corrupt)")
        }
        do {
            blocks = try FP8Blocks(shape: shape, codes: codes.data.map(FP8E4M3.init(bitPattern:)), scales: scales)
        } catch {
            throw CheckpointError(.shapeMismatch, "'\(name)': \(error.message)")
        }
    }
}
