/// The element types of the safetensors format, spelled as in the header's `dtype` field.
///
/// Every type here can be read and written as raw bytes. The float types F64, F32, F16 and BF16 convert to and
/// from `HostTensor`; the integer types and BOOL have typed accessors (`SafetensorsTensor.values(as:)`). The 8-bit
/// float formats are recognised so that a quantised checkpoint's header parses, but they convert to nothing.
public enum SafetensorsDType: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case float64 = "F64"
    case float32 = "F32"
    case float16 = "F16"
    case bfloat16 = "BF16"
    case int64 = "I64"
    case int32 = "I32"
    case int16 = "I16"
    case int8 = "I8"
    case uint64 = "U64"
    case uint32 = "U32"
    case uint16 = "U16"
    case uint8 = "U8"
    case bool = "BOOL"
    /// FP8 with 4 exponent bits (raw bytes only).
    case float8E4M3 = "F8_E4M3"
    /// FP8 with 5 exponent bits (raw bytes only).
    case float8E5M2 = "F8_E5M2"
    /// An 8-bit power-of-two scale (raw bytes only).
    case float8E8M0 = "F8_E8M0"

    /// Bytes per element.
    public var byteSize: Int {
        switch self {
        case .float64, .int64, .uint64: 8
        case .float32, .int32, .uint32: 4
        case .float16, .bfloat16, .int16, .uint16: 2
        case .int8, .uint8, .bool, .float8E4M3, .float8E5M2, .float8E8M0: 1
        }
    }

    /// Whether the type converts to and from `HostTensor`.
    public var isHostFloat: Bool { self == .float64 || hostElementType != nil }

    /// The `HostTensor` element type with exactly this layout, if any.
    public var hostElementType: ElementType? {
        switch self {
        case .float32: .float32
        case .float16: .float16
        case .bfloat16: .bfloat16
        default: nil
        }
    }

    /// The safetensors type that stores a `HostTensor` element type.
    public init(_ elementType: ElementType) {
        switch elementType {
        case .float32: self = .float32
        case .float16: self = .float16
        case .bfloat16: self = .bfloat16
        }
    }

    public var description: String { rawValue }
}
