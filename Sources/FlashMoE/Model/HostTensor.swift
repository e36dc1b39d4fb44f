/// A dense, row-major tensor in host memory, stored as FP32, FP16, BF16 or block-scaled FP8 (E4M3 codes with one
/// FP32 scale per 128×128 block of each matrix, `FP8Blocks`).
///
/// The last dimension is contiguous. Storage is a Swift array (copy-on-write), so copies are cheap until written.
public struct HostTensor: Sendable, Equatable {
    /// The element buffer in one of the supported element types.
    public enum Storage: Sendable, Equatable {
        case float32([Float])
        case float16([Float16])
        case bfloat16([BFloat16])
        /// E4M3 codes with 128×128 block scales (precision `fp8`'s expert weights).
        case float8E4M3(FP8Blocks)
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

    /// Wraps block-scaled FP8 codes and scales (`FP8Blocks`, built for this shape).
    public init(shape: [Int], fp8 blocks: FP8Blocks) throws(MoEError) {
        try Self.check(shape, blocks.codes.count)
        let (_, r, c) = FP8Blocks.layout(shape)
        guard blocks.rows == r, blocks.cols == c else {
            throw MoEError(
                .shapeMismatch, "FP8 blocks of \(blocks.rows)×\(blocks.cols) matrices do not fit shape \(shape)")
        }
        self.shape = shape
        self.storage = .float8E4M3(blocks)
    }

    /// FP32 values rounded to `elementType` (round to nearest even; FP8 quantizes in 128×128 blocks, `FP8Blocks`).
    public init(shape: [Int], values: [Float], as elementType: ElementType) throws(MoEError) {
        switch elementType {
        case .float32: try self.init(shape: shape, float32: values)
        case .float16: try self.init(shape: shape, float16: parallelMap(values) { Float16($0) })
        case .bfloat16: try self.init(shape: shape, bfloat16: parallelMap(values) { BFloat16($0) })
        case .float8E4M3:
            try Self.check(shape, values.count)
            try self.init(shape: shape, fp8: FP8Blocks(shape: shape, quantizing: values))
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
        case .float8E4M3: .float8E4M3
        }
    }

    /// The FP8 codes and scales, when the tensor is stored in FP8.
    public var fp8Blocks: FP8Blocks? {
        if case .float8E4M3(let b) = storage { return b }
        return nil
    }

    /// Number of elements.
    public var count: Int { shape.reduce(1, *) }

    /// Size of the storage in bytes (FP8: the codes and the FP32 block scales).
    public var byteCount: Int { count * elementType.byteSize + (fp8Blocks?.scales.count ?? 0) * 4 }

    /// All elements as FP32 (exact for FP32, FP16 and BF16; FP8: code × scale rounded to FP32).
    public func floats() -> [Float] {
        switch storage {
        case .float32(let v): v
        case .float16(let v): parallelMap(v) { Float($0) }
        case .bfloat16(let v): parallelMap(v) { $0.float }
        case .float8E4M3(let b): (0..<b.codes.count).map { b.float(at: $0) }
        }
    }

    /// Element `i` of the flattened tensor, as FP32.
    @inlinable
    public func float(at i: Int) -> Float {
        switch storage {
        case .float32(let v): v[i]
        case .float16(let v): Float(v[i])
        case .bfloat16(let v): v[i].float
        case .float8E4M3(let b): b.float(at: i)
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
        case .float8E4M3(let b):
            b.copyFloats(offset: offset, count: count, into: out)
        }
    }

    /// The same values rounded to another element type.
    public func converted(to type: ElementType) -> HostTensor {
        if type == elementType { return self }
        if type == .float8E4M3 {
            // Matrix by matrix, without an FP32 copy of the whole stack; the shape is unchanged.
            return try! HostTensor(shape: shape, fp8: FP8Blocks(quantizing: self))
        }
        // Cannot fail: the shape is unchanged.
        return try! HostTensor(shape: shape, values: floats(), as: type)
    }

    /// The same elements under another shape with the same element count (FP8: the matrices' rows and columns
    /// must stay the same, because the block scales belong to them).
    public func reshaped(_ newShape: [Int]) throws(MoEError) -> HostTensor {
        guard newShape.reduce(1, *) == count, newShape.allSatisfy({ $0 >= 0 }) else {
            throw MoEError(.shapeMismatch, "cannot reshape \(shape) to \(newShape)")
        }
        if fp8Blocks != nil {
            let (_, r, c) = FP8Blocks.layout(shape), (_, r2, c2) = FP8Blocks.layout(newShape)
            guard r == r2, c == c2 else {
                throw MoEError(
                    .unsupported, "cannot reshape the FP8 tensor \(shape) to \(newShape): its 128×128 blocks would split")
            }
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
        case .float8E4M3(let b):
            // Whole matrices of a stack keep their blocks; rows of one matrix would split them.
            guard shape.count >= 3 else {
                throw MoEError(
                    .unsupported, "cannot take rows \(range) of the FP8 matrix \(shape): its 128×128 blocks would split")
            }
            let per = shape.dropFirst().dropLast(2).reduce(1, *)
            return try HostTensor(
                shape: newShape, fp8: b.matrices((range.lowerBound * per)..<(range.upperBound * per)))
        }
    }

    /// Calls `body` with the raw bytes of the storage (little-endian, as the GPU and safetensors expect; FP8: the
    /// codes only, the scales are `fp8Blocks.scales`).
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        switch storage {
        case .float32(let v): try v.withUnsafeBytes(body)
        case .float16(let v): try v.withUnsafeBytes(body)
        case .bfloat16(let v): try v.withUnsafeBytes(body)
        case .float8E4M3(let b): try b.codes.withUnsafeBytes(body)
        }
    }
}
