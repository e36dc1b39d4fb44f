import CCUDA

/// A TMA descriptor (`CUtensorMap`) of a row-major matrix of 16-bit elements (bf16 or fp16), in the layout the sm_90a
/// engine reads (Sources/CKernels/kernels/tma_engine.cuh): boxes of 64 elements of a row (128 bytes) × `boxRows` rows,
/// 128-byte swizzle, elements outside the matrix read as zeros.
///
/// The 128 bytes go to the kernel as a `__grid_constant__` parameter or in device memory (any `cuMemAlloc` address is
/// 64-byte aligned, as TMA requires).
public struct TensorMap2D: Sendable, Hashable {
    /// The 16-bit element types the engine reads.
    public enum Element: Sendable, Hashable {
        case bf16
        case fp16
    }

    /// The descriptor's 16 words.
    public let words: [UInt64]

    /// Encodes the descriptor of the `rows` × `columns` matrix at `address` whose rows are `rowStride` elements apart.
    /// Throws `CUDAError.invalidArgument` naming the argument that TMA cannot describe, or the driver's error.
    public init(
        driver: any CUDADriverAPI, element: Element, address: CUdeviceptr, rows: Int, columns: Int, rowStride: Int,
        boxRows: Int
    ) throws(CUDAError) {
        try Self.validate(address: address, rows: rows, columns: columns, rowStride: rowStride, boxRows: boxRows)
        var map = CUtensorMap()
        let type = element == .bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16
        try driver.check(
            driver.tensorMapEncodeTiled(
                &map, type, address, [UInt64(columns), UInt64(rows)], [UInt64(rowStride * 2)],
                [UInt32(Self.boxColumns), UInt32(boxRows)], CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B),
            "cuTensorMapEncodeTiled(\(rows)×\(columns), box \(boxRows)×\(Self.boxColumns))",
            hint: "tensor maps need a CUDA 12 driver and a GPU with TMA (sm_90 or newer)")
        words = withUnsafeBytes(of: map) { raw in (0..<16).map { raw.load(fromByteOffset: $0 * 8, as: UInt64.self) } }
    }

    /// Elements of a row per box: 128 bytes, the span of the 128-byte swizzle.
    public static let boxColumns = 64

    /// The limits of `cuTensorMapEncodeTiled` for this layout, checked before the driver sees them.
    static func validate(address: CUdeviceptr, rows: Int, columns: Int, rowStride: Int, boxRows: Int)
        throws(CUDAError)
    {
        func fail(_ m: String) -> CUDAError { .invalidArgument("tensor map: \(m)") }
        guard address % 16 == 0 else {
            throw fail("address must be 16-byte aligned; got 0x\(String(address, radix: 16))")
        }
        guard rows >= 1 && rows <= Int(UInt32.max) else { throw fail("rows must be 1 … 2³²; got \(rows)") }
        guard columns >= 1 && columns <= Int(UInt32.max) else {
            throw fail("columns must be 1 … 2³²; got \(columns)")
        }
        guard rowStride >= columns else { throw fail("rowStride (\(rowStride)) must be at least columns (\(columns))") }
        guard (rowStride * 2) % 16 == 0 && rowStride * 2 < (1 << 40) else {
            throw fail(
                "a row must be a multiple of 16 bytes and under 2⁴⁰ bytes; rowStride \(rowStride) is "
                    + "\(rowStride * 2) bytes")
        }
        guard (1...256).contains(boxRows) else { throw fail("boxRows must be 1 … 256; got \(boxRows)") }
    }
}
