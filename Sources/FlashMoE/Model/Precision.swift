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
    /// Block-scaled FP8 experts (docs/fp8.md): expert weights E4M3 with one FP32 scale per 128×128 block,
    /// activations quantized to E4M3 per token and 128-channel group before each expert GEMM, FP32 accumulation
    /// with the scales applied per 128-wide K block. The router, the shared expert, x and h between the GEMMs
    /// are BF16. The oracle runs the same quantization (tolerance against it: 5e-3 on the CPU, 5e-2 on the GPU's
    /// tensor cores, `tolerance(for:)`); against the BF16 oracle the error is that of E4M3 itself, a few percent.
    case fp8

    /// The element type that activations and weights are stored in for this precision:
    /// fp32 and tf32: `float32`; bf16 and fp8: `bfloat16` (fp8's routed experts: `expertWeights`); fp16: `float16`.
    public var storage: ElementType {
        switch self {
        case .fp32, .tf32: .float32
        case .bf16, .fp8: .bfloat16
        case .fp16: .float16
        }
    }

    /// The element type the routed experts' matrices (w1, w3, w2) are stored in: FP8 for `fp8`, else `storage`.
    public var expertWeights: ElementType { self == .fp8 ? .float8E4M3 : storage }

    /// The relative error (‖out − ref‖ / ‖ref‖) a correct implementation stays under, against the Float64 oracle
    /// of the same precision (for fp8 the oracle quantizes exactly as the precision says, so the bound covers
    /// FP32 accumulation and the rare E4M3 code that flips when h is computed in FP32 rather than Float64).
    public var tolerance: Double {
        switch self {
        case .fp32: 1e-5
        case .tf32: 2e-3
        case .bf16, .fp16: 1e-2
        case .fp8: 5e-3
        }
    }

    /// The relative error against the Float64 oracle of the same precision that a correct backend computing
    /// with `arithmetic` stays under: `tolerance`, except fp8 on the GPU's tensor cores.
    ///
    /// fp8 on `.tensorCores`: 5e-2. The FP8 MMA keeps about 13 bits of each block sum (~1e-4), and the quantization
    /// of h amplifies that when it moves a group's largest |h| across a BF16 rounding boundary: the group's scale
    /// changes and the group's codes are rounded anew. The bit-level model of the MMA (`scripts/fp8_tolerance.py`,
    /// 2,000 random verify-like layers at S = 1) puts the error's median at 5.2e-4, its 99th percentile at 1.7e-2
    /// and its largest at 3.0e-2; with more tokens it settles near 4e-3 (docs/fp8.md, "Tolerances"). A scale read
    /// from the wrong block is caught by the one-binade case's 1e-3 (`VerificationCase.Values.fp8OneBinade`).
    public func tolerance(for arithmetic: ExpertArithmetic) -> Double {
        switch (self, arithmetic) {
        case (.fp8, .tensorCores): 5e-2
        default: tolerance
        }
    }

    /// The raw value, e.g. `bf16`.
    public var description: String { rawValue }
}

/// How a backend computes the routed experts, as far as its tolerance against the oracle depends on it
/// (`Precision.tolerance(for:)`).
public enum ExpertArithmetic: String, Sendable, Hashable, CaseIterable {
    /// FP32 or Float64 on the CPU (`CPUBackend`): fp8's block sums exact or in FP32.
    case cpu
    /// The GPU's tensor cores (`FusedMoE`, the expert-parallel ranks): fp8's FP8 MMA truncates its block sums.
    case tensorCores

    /// The arithmetic of the backend named `name` (`MoEBackend.name`): `cuda` computes on the tensor cores,
    /// every other backend (`cpu`, `oracle`, test doubles wrapping them) on the CPU.
    public init(backendName name: String) {
        self = name == "cuda" ? .tensorCores : .cpu
    }
}

/// The element types a host tensor can hold.
public enum ElementType: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    case float32
    case float16
    case bfloat16
    /// FP8 E4M3 codes with one FP32 scale per 128×128 block (`FP8Blocks`).
    case float8E4M3

    /// Bytes per element (FP8: the code; its block scale adds 4/16384 bytes per element).
    public var byteSize: Int {
        switch self {
        case .float32: 4
        case .float16, .bfloat16: 2
        case .float8E4M3: 1
        }
    }

    /// The raw value, e.g. `bfloat16`.
    public var description: String { rawValue }
}
