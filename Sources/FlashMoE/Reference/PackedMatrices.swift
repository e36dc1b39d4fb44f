import CGemm

/// The FP32 GEMM micro-kernels of the CGemm target, as a Swift enum.
enum GemmKernel: Int, CaseIterable, Sendable, CustomStringConvertible {
    /// Plain C for any CPU.
    case portable
    /// x86-64 AVX2 + FMA.
    case avx2
    /// x86-64 AVX-512F.
    case avx512

    /// The fastest kernel this CPU and OS support (checked with CPUID/XGETBV once).
    static var best: GemmKernel { GemmKernel(rawValue: Int(fm_gemm_best_kind().rawValue)) ?? .portable }

    /// Whether this machine can run the kernel.
    var isSupported: Bool { fm_gemm_supported(cKind) != 0 }

    /// Output columns per packed panel.
    var panelWidth: Int { Int(fm_gemm_panel_width(cKind)) }

    var cKind: fm_gemm_kind { fm_gemm_kind(rawValue: UInt32(rawValue)) }

    var description: String { String(cString: fm_gemm_kind_name(cKind)) }
}

/// A stack of `count` matrices [rows, cols] (Hugging Face [out, in]) packed once for one GEMM kernel, each rounded
/// to the layer's storage type and widened to FP32, in 64-byte-aligned memory.
///
/// Immutable after init, so sharing it across threads is safe.
final class PackedMatrices: @unchecked Sendable {
    let kernel: GemmKernel
    let count: Int
    let rows: Int
    let cols: Int
    /// Floats between consecutive packed matrices (a multiple of 16, so every matrix stays 64-byte aligned).
    let stride: Int
    private let base: UnsafeMutablePointer<Float>

    /// Packs the `count` consecutive [rows, cols] matrices of `tensor`, rounding each value to `storage`.
    init(_ tensor: HostTensor, count: Int, rows: Int, cols: Int, storage: ElementType, kernel: GemmKernel) {
        self.kernel = kernel
        self.count = count
        self.rows = rows
        self.cols = cols
        let packed = fm_gemm_packed_count(kernel.cKind, Int32(rows), Int32(cols))
        stride = (packed + 15) / 16 * 16
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(1, count * stride) * 4, alignment: 64)
        base = raw.bindMemory(to: Float.self, capacity: max(1, count * stride))
        let round = tensor.elementType != storage
        // Each chunk packs its own matrices into disjoint ranges of the buffer.
        nonisolated(unsafe) let dst = base
        parallelChunks(count: count) { [stride] matrices in
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: rows * cols)
            defer { scratch.deallocate() }
            for i in matrices {
                tensor.copyFloats(offset: i * rows * cols, count: rows * cols, into: scratch)
                if round { for j in 0..<rows * cols { scratch[j] = storage.round(scratch[j]) } }
                fm_gemm_pack(kernel.cKind, Int32(rows), Int32(cols), scratch, cols, dst + i * stride)
            }
        }
    }

    deinit { base.deallocate() }

    /// Panels per matrix: ceil(rows / panel width).
    var panels: Int { (rows + kernel.panelWidth - 1) / kernel.panelWidth }

    /// C[i, j] = Σ_k A[i, k]·W[j, k] over rows i < m and the columns of `panels`, for matrix `index` of the stack.
    ///
    /// - Parameters:
    ///   - a: A [m, cols] with row stride `lda`.
    ///   - c: C's row 0, column 0; row stride `ldc`.
    func multiply(
        _ index: Int, m: Int, a: UnsafePointer<Float>, lda: Int, panels: Range<Int>, c: UnsafeMutablePointer<Float>,
        ldc: Int
    ) {
        guard m > 0, !panels.isEmpty else { return }
        fm_gemm_packed(
            kernel.cKind, Int32(m), Int32(rows), Int32(cols), a, lda, base + index * stride, Int32(panels.lowerBound),
            Int32(panels.upperBound), c, ldc, 0)
    }
}
