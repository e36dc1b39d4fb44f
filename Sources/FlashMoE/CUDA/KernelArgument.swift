import CCUDA

/// One kernel parameter's value, copied out of a Swift value so a launch can hand the driver a `void**`.
///
/// The value must have exactly the size and alignment of the kernel's C parameter type: `int` is `.int32`, a
/// pointer is `.pointer` or `.buffer`, a plain C struct is `init(bytesOf:)` with a Swift struct of the same layout.
public struct KernelArgument: Sendable, Hashable, CustomStringConvertible {
    /// The value's bytes.
    public let bytes: [UInt8]
    /// The C type's alignment.
    public let alignment: Int

    /// The bytes of any plain value (matching a C parameter of the same size and alignment).
    public init<T: BitwiseCopyable>(bytesOf value: T) {
        bytes = withUnsafeBytes(of: value) { Array($0) }
        alignment = MemoryLayout<T>.alignment
    }

    /// Raw bytes with an explicit alignment: a C struct assembled field by field.
    public init(rawBytes: [UInt8], alignment: Int) {
        bytes = rawBytes
        self.alignment = alignment
    }

    /// A C `int`.
    public static func int32(_ value: Int32) -> Self { Self(bytesOf: value) }
    /// A C `unsigned int`.
    public static func uint32(_ value: UInt32) -> Self { Self(bytesOf: value) }
    /// A C `long long`.
    public static func int64(_ value: Int64) -> Self { Self(bytesOf: value) }
    /// A C `unsigned long long`.
    public static func uint64(_ value: UInt64) -> Self { Self(bytesOf: value) }
    /// A C `float`.
    public static func float(_ value: Float) -> Self { Self(bytesOf: value) }
    /// A C `double`.
    public static func double(_ value: Double) -> Self { Self(bytesOf: value) }
    /// A device pointer.
    public static func pointer(_ address: CUdeviceptr) -> Self { Self(bytesOf: address) }
    /// A device pointer to the first element of `buffer`.
    public static func buffer<T>(_ buffer: DeviceBuffer<T>) -> Self { .pointer(buffer.address) }

    /// The size only, e.g. "8-byte argument" (not the value).
    public var description: String { "\(bytes.count)-byte argument" }

    /// Lays `arguments` out in one aligned block and calls `body` with the array of pointers to each value that
    /// `cuLaunchKernel` takes. The driver copies the values during the call, so the block is freed right after.
    static func withParameterArray<R>(
        _ arguments: [KernelArgument], _ body: (UnsafeMutablePointer<UnsafeMutableRawPointer?>) -> R
    ) -> R {
        var offsets: [Int] = []
        var size = 0
        for argument in arguments {
            size = (size + argument.alignment - 1) / argument.alignment * argument.alignment
            offsets.append(size)
            size += argument.bytes.count
        }
        let block = UnsafeMutableRawPointer.allocate(byteCount: max(size, 1), alignment: 16)
        defer { block.deallocate() }
        let pointers = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: max(arguments.count, 1))
        defer { pointers.deallocate() }
        for (i, argument) in arguments.enumerated() {
            let destination = block + offsets[i]
            argument.bytes.withUnsafeBytes { destination.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            pointers[i] = destination
        }
        return body(pointers)
    }
}

/// A grid or block shape. An integer literal is a 1-D shape.
public struct Dim3: Sendable, Hashable, ExpressibleByIntegerLiteral, CustomStringConvertible {
    /// The extent along x.
    public var x: Int
    /// The extent along y (1 for a 1-D shape).
    public var y: Int
    /// The extent along z (1 for a 1-D or 2-D shape).
    public var z: Int

    /// The shape `x` × `y` × `z`; `y` and `z` default to 1.
    public init(_ x: Int, _ y: Int = 1, _ z: Int = 1) {
        self.x = x
        self.y = y
        self.z = z
    }

    /// The 1-D shape `value` × 1 × 1.
    public init(integerLiteral value: Int) { self.init(value) }

    /// x · y · z.
    public var total: Int { x * y * z }

    /// `x` alone for a 1-D shape, otherwise `x×y×z`.
    public var description: String { y == 1 && z == 1 ? "\(x)" : "\(x)×\(y)×\(z)" }

    /// The shape as the driver takes it, or an error naming `what` if a side is not in 1...UInt32.max.
    func driverShape(_ what: String) throws(CUDAError) -> (UInt32, UInt32, UInt32) {
        guard [x, y, z].allSatisfy({ $0 >= 1 && $0 <= Int(UInt32.max) }) else {
            throw .invalidArgument("the \(what) shape \(self) must have every side at least 1")
        }
        return (UInt32(x), UInt32(y), UInt32(z))
    }
}
