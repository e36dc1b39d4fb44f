/// A dense, row-major tensor in host memory, stored as FP32, FP16 or BF16.
///
/// The last dimension is contiguous. Storage is a Swift array (copy-on-write), so copies are cheap until written.
public struct HostTensor: Sendable, Equatable {
    /// The element buffer in one of the supported element types.
    public enum Storage: Sendable, Equatable {
        case float32([Float])
        case float16([Float16])
        case bfloat16([BFloat16])
    }

    /// The extent of each dimension, outermost first.
    public let shape: [Int]
    /// The elements.
    public private(set) var storage: Storage

    /// Wraps FP32 values; throws if `values.count` is not the product of `shape`.
    public init(shape: [Int], float32 values: [Float]) throws(MoEError) {
        try Self.check(shape, values.count)
        self.shape = shape
        self.storage = .float32(values)
    }

    /// Wraps FP16 values; throws if `values.count` is not the product of `shape`.
    public init(shape: [Int], float16 values: [Float16]) throws(MoEError) {
        try Self.check(shape, values.count)
        self.shape = shape
        self.storage = .float16(values)
    }

    /// Wraps BF16 values; throws if `values.count` is not the product of `shape`.
    public init(shape: [Int], bfloat16 values: [BFloat16]) throws(MoEError) {
        try Self.check(shape, values.count)
        self.shape = shape
        self.storage = .bfloat16(values)
    }

    /// FP32 values rounded to `elementType` (round to nearest even).
    public init(shape: [Int], values: [Float], as elementType: ElementType) throws(MoEError) {
        switch elementType {
        case .float32: try self.init(shape: shape, float32: values)
        case .float16: try self.init(shape: shape, float16: values.map { Float16($0) })
        case .bfloat16: try self.init(shape: shape, bfloat16: values.map { BFloat16($0) })
        }
    }

    /// A tensor of zeros.
    public static func zeros(shape: [Int], as elementType: ElementType = .float32) -> HostTensor {
        let n = shape.reduce(1, *)
        // Cannot fail: the count is the shape's product.
        return try! HostTensor(shape: shape, values: [Float](repeating: 0, count: n), as: elementType)
    }

    private static func check(_ shape: [Int], _ count: Int) throws(MoEError) {
        guard shape.allSatisfy({ $0 >= 0 }) else {
            throw MoEError(.shapeMismatch, "tensor shape \(shape) has a negative dimension")
        }
        let n = shape.reduce(1, *)
        guard n == count else {
            throw MoEError(.shapeMismatch, "tensor shape \(shape) needs \(n) elements, got \(count)")
        }
    }

    /// The element type of the storage.
    public var elementType: ElementType {
        switch storage {
        case .float32: .float32
        case .float16: .float16
        case .bfloat16: .bfloat16
        }
    }

    /// Number of elements.
    public var count: Int { shape.reduce(1, *) }

    /// Size of the storage in bytes.
    public var byteCount: Int { count * elementType.byteSize }

    /// All elements as FP32 (exact for every storage type).
    public func floats() -> [Float] {
        switch storage {
        case .float32(let v): v
        case .float16(let v): v.map { Float($0) }
        case .bfloat16(let v): v.map(\.float)
        }
    }

    /// Element `i` of the flattened tensor, as FP32.
    @inlinable
    public func float(at i: Int) -> Float {
        switch storage {
        case .float32(let v): v[i]
        case .float16(let v): Float(v[i])
        case .bfloat16(let v): v[i].float
        }
    }

    /// Copies `count` elements starting at flat index `offset` into `out`, converted to FP32.
    @inlinable
    public func copyFloats(offset: Int, count: Int, into out: UnsafeMutablePointer<Float>) {
        switch storage {
        case .float32(let v):
            v.withUnsafeBufferPointer { out.update(from: $0.baseAddress! + offset, count: count) }
        case .float16(let v):
            v.withUnsafeBufferPointer { b in for i in 0..<count { out[i] = Float(b[offset + i]) } }
        case .bfloat16(let v):
            v.withUnsafeBufferPointer { b in for i in 0..<count { out[i] = b[offset + i].float } }
        }
    }

    /// The same values rounded to another element type.
    public func converted(to type: ElementType) -> HostTensor {
        if type == elementType { return self }
        // Cannot fail: the shape is unchanged.
        return try! HostTensor(shape: shape, values: floats(), as: type)
    }

    /// The same elements under another shape with the same element count.
    public func reshaped(_ newShape: [Int]) throws(MoEError) -> HostTensor {
        guard newShape.reduce(1, *) == count, newShape.allSatisfy({ $0 >= 0 }) else {
            throw MoEError(.shapeMismatch, "cannot reshape \(shape) to \(newShape)")
        }
        return HostTensor(uncheckedShape: newShape, storage: storage)
    }

    private init(uncheckedShape: [Int], storage: Storage) {
        self.shape = uncheckedShape
        self.storage = storage
    }

    /// The sub-tensor of indices `range` along the first dimension (a copy).
    public func slice(_ range: Range<Int>) throws(MoEError) -> HostTensor {
        guard let first = shape.first, range.lowerBound >= 0, range.upperBound <= first else {
            throw MoEError(.shapeMismatch, "cannot take rows \(range) of a tensor of shape \(shape)")
        }
        let inner = shape.dropFirst().reduce(1, *)
        let lo = range.lowerBound * inner, hi = range.upperBound * inner
        let newShape = [range.count] + shape.dropFirst()
        switch storage {
        case .float32(let v): return try HostTensor(shape: newShape, float32: Array(v[lo..<hi]))
        case .float16(let v): return try HostTensor(shape: newShape, float16: Array(v[lo..<hi]))
        case .bfloat16(let v): return try HostTensor(shape: newShape, bfloat16: Array(v[lo..<hi]))
        }
    }

    /// Calls `body` with the raw bytes of the storage (little-endian, as the GPU and safetensors expect).
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        switch storage {
        case .float32(let v): try v.withUnsafeBytes(body)
        case .float16(let v): try v.withUnsafeBytes(body)
        case .bfloat16(let v): try v.withUnsafeBytes(body)
        }
    }
}
