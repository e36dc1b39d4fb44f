/// The arithmetic a forward pass runs in.
///
/// Every precision accumulates in FP32 (the CPU oracle in Float64) and does its routing math in FP32.
/// What changes is the storage type of activations and weights and the multiplier used for the expert GEMMs.
public enum Precision: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    /// FP32 storage and exact FP32 fused multiply-adds. Expected relative error vs the oracle: ~1e-5.
    case fp32
    /// FP32 storage; expert GEMM operands rounded to TF32 (10-bit mantissa) on tensor cores. ~1e-3.
    case tf32
    /// BF16 storage and tensor-core products, FP32 accumulation. ~1e-2.
    case bf16
    /// FP16 storage and tensor-core products, FP32 accumulation. ~1e-2.
    case fp16

    /// The element type that activations and weights are stored in for this precision.
    public var storage: ElementType {
        switch self {
        case .fp32, .tf32: .float32
        case .bf16: .bfloat16
        case .fp16: .float16
        }
    }

    /// The relative error (‖out − ref‖ / ‖ref‖) a correct implementation stays under, against the Float64 oracle.
    public var tolerance: Double {
        switch self {
        case .fp32: 1e-5
        case .tf32: 2e-3
        case .bf16, .fp16: 1e-2
        }
    }

    public var description: String { rawValue }
}

/// The element types a host tensor can hold.
public enum ElementType: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    case float32
    case float16
    case bfloat16

    /// Bytes per element.
    public var byteSize: Int {
        switch self {
        case .float32: 4
        case .float16, .bfloat16: 2
        }
    }

    public var description: String { rawValue }
}
