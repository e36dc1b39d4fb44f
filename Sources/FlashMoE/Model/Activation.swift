#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The element-wise non-linearity of an expert FFN.
public enum Activation: String, Sendable, Hashable, Codable, CaseIterable, CustomStringConvertible {
    /// max(x, 0).
    case relu
    /// x · Φ(x) with the exact error function (PyTorch `gelu`, approximate = "none").
    case gelu
    /// The tanh approximation of GELU (PyTorch `gelu(approximate="tanh")`, HF `gelu_new` / `gelu_pytorch_tanh`).
    case geluTanh = "gelu-tanh"
    /// x · sigmoid(x) (HF `silu` / `swish`).
    case silu

    /// Applies the activation in Float64 (the oracle's arithmetic).
    @inlinable
    public func apply(_ x: Double) -> Double {
        switch self {
        case .relu: return x > 0 ? x : (x.isNaN ? x : 0)
        case .gelu: return 0.5 * x * (1 + erf(x * 0.70710678118654752440))
        case .geluTanh:
            let c = 0.79788456080286535588  // sqrt(2/pi)
            return 0.5 * x * (1 + tanh(c * (x + 0.044715 * x * x * x)))
        case .silu: return x / (1 + exp(-x))
        }
    }

    /// Applies the activation in Float32 (the default CPU backend's arithmetic).
    @inlinable
    public func apply(_ x: Float) -> Float {
        switch self {
        case .relu: return x > 0 ? x : (x.isNaN ? x : 0)
        case .gelu: return 0.5 * x * (1 + erff(x * 0.70710678))
        case .geluTanh:
            let c: Float = 0.7978845608
            return 0.5 * x * (1 + tanhf(c * (x + 0.044715 * x * x * x)))
        case .silu: return x / (1 + expf(-x))
        }
    }

    /// Maps a Hugging Face `hidden_act` string to an activation, or nil if it is not supported.
    public init?(huggingFace name: String) {
        switch name {
        case "relu": self = .relu
        case "gelu": self = .gelu
        case "gelu_new", "gelu_pytorch_tanh", "gelu_fast": self = .geluTanh
        case "silu", "swish": self = .silu
        default: return nil
        }
    }

    /// The raw value, e.g. `gelu-tanh`.
    public var description: String { rawValue }
}
