#if _endian(big)
#error("safetensors data is little-endian; this code copies elements bytewise and needs a little-endian host")
#endif

/// A tensor as safetensors stores it: a dtype, a shape and the little-endian element bytes, row-major.
///
/// The byte count always equals the shape's element count × the dtype's size (every initializer checks it).
public struct SafetensorsTensor: Sendable, Equatable {
    /// The element type.
    public let dtype: SafetensorsDType
    /// The extent of each dimension, outermost first (empty for a scalar).
    public let shape: [Int]
    /// The raw element bytes.
    public let data: [UInt8]

    /// Wraps raw bytes; throws unless `data.count` is the shape's element count × the dtype's size.
    public init(dtype: SafetensorsDType, shape: [Int], data: [UInt8]) throws(SafetensorsError) {
        let bytes = try Self.byteCount(dtype: dtype, shape: shape, name: "tensor")
        guard bytes == data.count else {
            throw SafetensorsError(
                .sizeMismatch, "a \(dtype) tensor of shape \(shape) needs \(bytes) bytes, got \(data.count)")
        }
        self.dtype = dtype
        self.shape = shape
        self.data = data
    }

    /// The number of elements.
    public var count: Int { data.count / dtype.byteSize }

    /// The byte size of `shape` in `dtype`, with every multiplication checked for overflow.
    static func byteCount(dtype: SafetensorsDType, shape: [Int], name: String) throws(SafetensorsError) -> Int {
        var total = dtype.byteSize
        for d in shape {
            guard d >= 0 else {
                throw SafetensorsError(.invalidShape, "\(name): shape \(shape) has a negative dimension")
            }
            let (p, overflow) = total.multipliedReportingOverflow(by: d)
            guard !overflow else {
                throw SafetensorsError(.invalidShape, "\(name): shape \(shape) of \(dtype) overflows a byte count")
            }
            total = p
        }
        return total
    }
}

/// A Swift type whose memory layout is one safetensors element (little-endian).
public protocol SafetensorsScalar: BitwiseCopyable, Sendable {
    /// The safetensors dtype with this layout.
    static var safetensorsDType: SafetensorsDType { get }
}

extension Float: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .float32 } }
extension Double: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .float64 } }
extension Float16: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .float16 } }
extension BFloat16: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .bfloat16 } }
extension Int64: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .int64 } }
extension Int32: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .int32 } }
extension Int16: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .int16 } }
extension Int8: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .int8 } }
extension UInt64: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .uint64 } }
extension UInt32: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .uint32 } }
extension UInt16: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .uint16 } }
extension UInt8: SafetensorsScalar { public static var safetensorsDType: SafetensorsDType { .uint8 } }

extension SafetensorsTensor {
    /// A tensor of `T.safetensorsDType` holding `values`; throws unless `values.count` is the shape's product.
    public init<T: SafetensorsScalar>(shape: [Int], values: [T]) throws(SafetensorsError) {
        try self.init(dtype: T.safetensorsDType, shape: shape, data: values.withUnsafeBytes { Array($0) })
    }

    /// A BOOL tensor (one byte per element, 0 or 1).
    public init(shape: [Int], bools: [Bool]) throws(SafetensorsError) {
        try self.init(dtype: .bool, shape: shape, data: bools.map { $0 ? 1 : 0 })
    }

    /// The elements as `T`; throws unless the dtype is exactly `T.safetensorsDType`.
    public func values<T: SafetensorsScalar>(as type: T.Type) throws(SafetensorsError) -> [T] {
        guard dtype == T.safetensorsDType else {
            throw SafetensorsError(.dtypeMismatch, "the tensor is \(dtype), not \(T.safetensorsDType) (\(T.self))")
        }
        let n = count
        return [T](unsafeUninitializedCapacity: n) { buffer, initialized in
            data.withUnsafeBytes { src in
                UnsafeMutableRawBufferPointer(buffer).copyMemory(from: src)
            }
            initialized = n
        }
    }

    /// The elements of a BOOL tensor (any non-zero byte is true).
    public func bools() throws(SafetensorsError) -> [Bool] {
        guard dtype == .bool else { throw SafetensorsError(.dtypeMismatch, "the tensor is \(dtype), not BOOL") }
        return data.map { $0 != 0 }
    }
}

extension SafetensorsTensor {
    /// The tensor's bytes in its own element type: F32, F16, BF16, or F8_E4M3 codes (an FP8 tensor's block
    /// scales are a tensor of their own: `SafetensorsTensor(fp8ScalesOf:)`).
    public init(_ tensor: HostTensor) {
        dtype = SafetensorsDType(tensor.elementType)
        shape = tensor.shape
        data = tensor.withUnsafeBytes { Array($0) }
    }

    /// The tensor converted to `HostTensor` in its own element type (F64 rounds to FP32).
    public func hostTensor() throws(SafetensorsError) -> HostTensor {
        try hostTensor(as: dtype.hostElementType ?? .float32)
    }

    /// The tensor converted to a `HostTensor` of `elementType`, rounding to nearest even where it narrows (to FP8:
    /// quantized in 128×128 blocks). Throws for integer, BOOL and FP8 tensors (an FP8 tensor needs its scales).
    public func hostTensor(as elementType: ElementType) throws(SafetensorsError) -> HostTensor {
        if elementType == .float8E4M3 { return try hostTensor(as: .float32).converted(to: .float8E4M3) }
        var stack = try ElementStack(elementType: elementType, capacity: count, backing: count)
        try stack.append(self, elements: 0..<count)
        return try stack.tensor(shape: shape)
    }
}

/// A growing buffer of one `HostTensor` element type that float tensors of any safetensors float dtype are
/// appended to, converted on the way (the loader stacks per-expert matrices into [E, …] tensors with it).
struct ElementStack {
    private var storage: HostTensor.Storage

    /// An empty stack of `elementType`, with room for `capacity` elements; throws unless the tensors it will be
    /// filled from hold at least that many (`backing`, counted from their validated headers), so a size taken from
    /// config.json is never allocated before the file is known to hold it.
    init(elementType: ElementType, capacity: Int, backing: Int) throws(SafetensorsError) {
        guard ReadAllocation.allows(.elements, requested: capacity, available: backing) else {
            throw SafetensorsError(
                .sizeMismatch,
                "\(capacity) elements were asked for but the file's tensors hold \(backing): the sizes disagree")
        }
        switch elementType {
        case .float32:
            var v: [Float] = []
            v.reserveCapacity(capacity)
            storage = .float32(v)
        case .float16:
            var v: [Float16] = []
            v.reserveCapacity(capacity)
            storage = .float16(v)
        case .bfloat16:
            var v: [BFloat16] = []
            v.reserveCapacity(capacity)
            storage = .bfloat16(v)
        case .float8E4M3:
            throw SafetensorsError(
                .dtypeMismatch, "FP8 tensors are read with their block scales (FP8CheckpointTensors), not stacked")
        }
    }

    /// Elements appended so far.
    var count: Int {
        switch storage {
        case .float32(let v): v.count
        case .float16(let v): v.count
        case .bfloat16(let v): v.count
        case .float8E4M3(let b): b.codes.count
        }
    }

    /// Appends the flat elements `elements` of `tensor`, converted to the stack's type.
    mutating func append(_ tensor: SafetensorsTensor, elements: Range<Int>) throws(SafetensorsError) {
        guard tensor.dtype.isHostFloat else {
            throw SafetensorsError(
                .dtypeMismatch,
                "a \(tensor.dtype) tensor cannot be converted to floating point: only F64, F32, F16 and BF16 can")
        }
        guard elements.lowerBound >= 0, elements.upperBound <= tensor.count else {
            throw SafetensorsError(
                .invalidOffsets, "elements \(elements) lie outside a tensor of \(tensor.count) elements")
        }
        tensor.data.withUnsafeBytes { raw in
            switch storage {
            case .float32(var v):
                storage = .float32([])  // keep `v` uniquely referenced while it grows
                Self.append(raw, tensor.dtype, elements, into: &v) { $0 }
                storage = .float32(v)
            case .float16(var v):
                storage = .float16([])
                Self.append(raw, tensor.dtype, elements, into: &v) { Float16($0) }
                storage = .float16(v)
            case .bfloat16(var v):
                storage = .bfloat16([])
                Self.append(raw, tensor.dtype, elements, into: &v) { BFloat16($0) }
                storage = .bfloat16(v)
            case .float8E4M3:
                break  // never built: init throws for FP8
            }
        }
    }

    /// Copies elements bytewise when the layouts match, otherwise decodes each to FP32 (exact for F16/BF16;
    /// F64 rounds once to FP32 and again to a 16-bit target) and encodes it with `encode`.
    private static func append<T: SafetensorsScalar>(
        _ raw: UnsafeRawBufferPointer, _ dtype: SafetensorsDType, _ elements: Range<Int>, into out: inout [T],
        encode: (Float) -> T
    ) {
        let size = dtype.byteSize
        if dtype == T.safetensorsDType {
            let start = elements.lowerBound * size
            let bytes = UnsafeRawBufferPointer(rebasing: raw[start..<(start + elements.count * size)])
            out.append(
                contentsOf: [T](unsafeUninitializedCapacity: elements.count) { buffer, initialized in
                    UnsafeMutableRawBufferPointer(buffer).copyMemory(from: bytes)
                    initialized = elements.count
                })
            return
        }
        switch dtype {
        case .float64:
            for i in elements { out.append(encode(Float(raw.loadUnaligned(fromByteOffset: i * size, as: Double.self)))) }
        case .float32:
            for i in elements { out.append(encode(raw.loadUnaligned(fromByteOffset: i * size, as: Float.self))) }
        case .float16:
            for i in elements { out.append(encode(Float(raw.loadUnaligned(fromByteOffset: i * size, as: Float16.self)))) }
        case .bfloat16:
            for i in elements {
                out.append(encode(BFloat16(bitPattern: raw.loadUnaligned(fromByteOffset: i * size, as: UInt16.self)).float))
            }
        default:
            break  // rejected by the caller
        }
    }

    /// The stacked elements as a tensor of `shape`; throws unless exactly the shape's element count was appended.
    func tensor(shape: [Int]) throws(SafetensorsError) -> HostTensor {
        do {
            switch storage {
            case .float32(let v): return try HostTensor(shape: shape, float32: v)
            case .float16(let v): return try HostTensor(shape: shape, float16: v)
            case .bfloat16(let v): return try HostTensor(shape: shape, bfloat16: v)
            case .float8E4M3(let b): return try HostTensor(shape: shape, fp8: b)
            }
        } catch {
            throw SafetensorsError(.sizeMismatch, error.message)
        }
    }
}
