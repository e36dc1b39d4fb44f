import CCUDA

/// A TMA descriptor (`CUtensorMap`) in the layout the sm_90a engines read (Sources/CKernels/kernels/tma_engine.cuh,
/// tma_fp8_engine.cuh): boxes of one 128-byte span of a row (64 bf16/fp16 elements, or 128 E4M3 codes) × `boxRows`
/// rows, 128-byte swizzle, elements outside the tensor read as zeros. Two shapes: a row-major matrix (2-D), or a
/// stack of equal matrices a fixed byte stride apart (3-D: the fp8 experts' weight images, whose codes are followed
/// by their scales, so the matrices are not contiguous), read one matrix a box.
///
/// The 128 bytes go to the kernel as a `__grid_constant__` parameter or in device memory (any `cuMemAlloc` address is
/// 64-byte aligned, as TMA requires).
public struct TensorMap: Sendable, Hashable {
    /// The element types the engines read.
    public enum Element: Sendable, Hashable {
        case bf16
        case fp16
        /// E4M3 codes, described to TMA as bytes.
        case e4m3

        /// Bytes of one element.
        public var byteSize: Int { self == .e4m3 ? 1 : 2 }
        /// Elements of a row per box: one 128-byte swizzle span.
        public var boxColumns: Int { TensorMap.boxBytes / byteSize }

        var driverType: CUtensorMapDataType {
            switch self {
            case .bf16: CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
            case .fp16: CU_TENSOR_MAP_DATA_TYPE_FLOAT16
            case .e4m3: CU_TENSOR_MAP_DATA_TYPE_UINT8
            }
        }
    }

    /// Bytes of a row per box: the span of the 128-byte swizzle.
    public static let boxBytes = 128

    /// The descriptor's 16 words.
    public let words: [UInt64]

    /// Encodes the descriptor of the `rows` × `columns` matrix at `address` whose rows are `rowStride` elements apart.
    /// Throws `CUDAError.invalidArgument` naming the argument that TMA cannot describe, or the driver's error.
    public init(
        driver: any CUDADriverAPI, element: Element, address: CUdeviceptr, rows: Int, columns: Int, rowStride: Int,
        boxRows: Int
    ) throws(CUDAError) {
        try self.init(
            driver: driver, element: element, address: address, rows: rows, columns: columns, rowStride: rowStride,
            boxRows: boxRows, stack: nil)
    }

    /// Encodes the descriptor of `matrices` matrices of `rows` × `columns` (rows `rowStride` elements apart), the first
    /// at `address` and each `matrixStride` bytes after the one before; a box reads rows of one matrix, and rows past
    /// `rows` read as zeros rather than as the next matrix's. Throws as the 2-D form does.
    public init(
        driver: any CUDADriverAPI, element: Element, address: CUdeviceptr, rows: Int, columns: Int, rowStride: Int,
        boxRows: Int, matrices: Int, matrixStride: Int
    ) throws(CUDAError) {
        try self.init(
            driver: driver, element: element, address: address, rows: rows, columns: columns, rowStride: rowStride,
            boxRows: boxRows, stack: (matrices, matrixStride))
    }

    private init(
        driver: any CUDADriverAPI, element: Element, address: CUdeviceptr, rows: Int, columns: Int, rowStride: Int,
        boxRows: Int, stack: (count: Int, stride: Int)?
    ) throws(CUDAError) {
        try Self.validate(
            address: address, element: element, rows: rows, columns: columns, rowStride: rowStride, boxRows: boxRows,
            stack: stack)
        var dims = [UInt64(columns), UInt64(rows)]
        var strides = [UInt64(rowStride * element.byteSize)]
        var box = [UInt32(element.boxColumns), UInt32(boxRows)]
        if let stack {
            dims.append(UInt64(stack.count))
            strides.append(UInt64(stack.stride))
            box.append(1)
        }
        var map = CUtensorMap()
        let shape = (stack.map { "\($0.count)×" } ?? "") + "\(rows)×\(columns)"
        try driver.check(
            driver.tensorMapEncodeTiled(
                &map, element.driverType, address, dims, strides, box, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B),
            "cuTensorMapEncodeTiled(\(shape), box \(boxRows)×\(element.boxColumns))",
            hint: "tensor maps need a CUDA 12 driver and a GPU with TMA (sm_90 or newer)")
        words = withUnsafeBytes(of: map) { raw in (0..<16).map { raw.load(fromByteOffset: $0 * 8, as: UInt64.self) } }
    }

    /// The limits of `cuTensorMapEncodeTiled` for this layout, checked before the driver sees them.
    static func validate(
        address: CUdeviceptr, element: Element, rows: Int, columns: Int, rowStride: Int, boxRows: Int,
        stack: (count: Int, stride: Int)? = nil
    ) throws(CUDAError) {
        func fail(_ m: String) -> CUDAError { .invalidArgument("tensor map: \(m)") }
        guard address % 16 == 0 else {
            throw fail("address must be 16-byte aligned; got 0x\(String(address, radix: 16))")
        }
        guard rows >= 1 && rows <= Int(UInt32.max) else { throw fail("rows must be 1 … 2³²; got \(rows)") }
        guard columns >= 1 && columns <= Int(UInt32.max) else {
            throw fail("columns must be 1 … 2³²; got \(columns)")
        }
        guard rowStride >= columns else { throw fail("rowStride (\(rowStride)) must be at least columns (\(columns))") }
        let rowBytes = rowStride * element.byteSize
        guard rowBytes % 16 == 0 && rowBytes < (1 << 40) else {
            throw fail(
                "a row must be a multiple of 16 bytes and under 2⁴⁰ bytes; rowStride \(rowStride) is \(rowBytes) bytes")
        }
        guard (1...256).contains(boxRows) else { throw fail("boxRows must be 1 … 256; got \(boxRows)") }
        if let stack {
            guard stack.count >= 1 && stack.count <= Int(UInt32.max) else {
                throw fail("matrices must be 1 … 2³²; got \(stack.count)")
            }
            guard stack.stride % 16 == 0 && stack.stride < (1 << 40) && stack.stride >= rows * rowBytes else {
                throw fail(
                    "matrixStride must be a multiple of 16 bytes under 2⁴⁰ and at least a matrix (\(rows * rowBytes) "
                        + "bytes); got \(stack.stride)")
            }
        }
    }
}
