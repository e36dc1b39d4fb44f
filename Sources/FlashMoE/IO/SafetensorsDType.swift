/// The element types of the safetensors format, spelled as in the header's `dtype` field.
///
/// Every type here can be read and written as raw bytes. The float types F64, F32, F16 and BF16 convert to and
/// from `HostTensor`; the integer types and BOOL have typed accessors (`SafetensorsTensor.values(as:)`). The 8-bit
/// float formats are recognised so that a quantised checkpoint's header parses, but they convert to nothing.
public enum SafetensorsDType: String, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// IEEE binary64.
    case float64 = "F64"
    /// IEEE binary32.
    case float32 = "F32"
    /// IEEE binary16.
    case float16 = "F16"
    /// Brain float: FP32's exponent, 7-bit mantissa.
    case bfloat16 = "BF16"
    /// Signed 64-bit integer.
    case int64 = "I64"
    /// Signed 32-bit integer.
    case int32 = "I32"
    /// Signed 16-bit integer.
    case int16 = "I16"
    /// Signed 8-bit integer.
    case int8 = "I8"
    /// Unsigned 64-bit integer.
    case uint64 = "U64"
    /// Unsigned 32-bit integer.
    case uint32 = "U32"
    /// Unsigned 16-bit integer.
    case uint16 = "U16"
    /// Unsigned 8-bit integer.
    case uint8 = "U8"
    /// One byte per element, 0 or 1.
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
        case .float8E4M3: self = .float8E4M3
        }
    }

    /// The header's `dtype` spelling, e.g. `BF16`.
    public var description: String { rawValue }
}
