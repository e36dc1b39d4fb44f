/// The routed experts' FP8 weights in the layout the kernel's fp8 path reads (docs/fp8.md; `W1_EXPERT_BYTES` and
/// `W2_EXPERT_BYTES` in Sources/CKernels/kernels/moe_params.cuh): per expert, the E4M3 codes [rows, K] (W1 gated:
/// gate and up rows interleaved in blocks of `packRows` = 64), then one FP32 scale per 64-row granule of those
/// rows and 128-wide K block, [⌈rows/64⌉][⌈K/128⌉]; each part padded to 16 bytes.
extension FusedDeviceWeights {
    /// Rows per scale granule: half the fp8 kernel's 128-wide expert tile.
    static let fp8Granule = 64

    /// The bytes of one expert of an FP8 stack: codes of `rows` packed rows of `k` columns, then the scales.
    static func fp8ExpertBytes(rows: Int, k: Int) -> (codes: Int, total: Int) {
        func round16(_ v: Int) -> Int { (v + 15) / 16 * 16 }
        let codes = round16(rows * k)
        let scales = (rows + fp8Granule - 1) / fp8Granule * ((k + 127) / 128) * 4
        return (codes, round16(codes + scales))
    }

    /// The bytes of one expert's W1 image (gated: gate and up interleaved in blocks of `fp8Granule` rows) and W2
    /// image in an fp8 layer of `c`'s shape.
    static func fp8ImageBytes(_ c: MoEConfig) -> (first: Int, second: Int) {
        let rows1 = fp8FirstRows(inner: c.intermediateSize, gated: c.ffn == .gated, packRows: fp8Granule)
        return (fp8ExpertBytes(rows: rows1, k: c.hiddenSize).total,
                fp8ExpertBytes(rows: c.hiddenSize, k: c.intermediateSize).total)
    }

    /// Packed row r of W1's fp8 image → (matrix, source row) of `gate` / `up`: the gated FFN interleaves blocks of
    /// `packRows` gate rows and the matching up rows; padding rows (past `inner`) have no source. `M`: the matrices'
    /// codes and scales (`FP8Blocks`), or their scales alone (`FP8ScaleGrid`).
    static func fp8FirstSource<M>(gate: M, up: M?, inner: Int, packRows: Int) -> (Int) -> (M, Int)? {
        { r in
            guard let up else { return r < inner ? (gate, r) : nil }
            let (block, within) = r.quotientAndRemainder(dividingBy: 2 * packRows)
            let row = block * packRows + within % packRows
            return row < inner ? (within < packRows ? gate : up, row) : nil
        }
    }

    /// Rows of W1's fp8 image: `inner`, or for the gated FFN ⌈inner/packRows⌉ blocks of 2·packRows rows.
    static func fp8FirstRows(inner: Int, gated: Bool, packRows: Int) -> Int {
        gated ? (inner + packRows - 1) / packRows * 2 * packRows : inner
    }

    /// Uploads W1 (and W3 for the gated FFN) of `matrices` experts, FP8 blocks of [matrices, inner, k].
    static func uploadFP8First(
        gate: FP8Blocks, up: FP8Blocks?, matrices: Int, inner: Int, k: Int, packRows: Int, device: CUDADevice
    ) throws -> DeviceBuffer<UInt8> {
        guard packRows == fp8Granule else {
            throw MoEError(
                .unsupported, "the fp8 kernel packs gate/up rows in blocks of \(fp8Granule), but this module packs \(packRows)")
        }
        let rows = fp8FirstRows(inner: inner, gated: up != nil, packRows: packRows)
        let source = fp8FirstSource(gate: gate, up: up, inner: inner, packRows: packRows)
        return try uploadFP8(matrices: matrices, rows: rows, k: k, device: device, source: source)
    }

    /// Uploads W2 of `matrices` experts, FP8 blocks of [matrices, H, I].
    static func uploadFP8Second(down: FP8Blocks, matrices: Int, hidden: Int, k: Int, device: CUDADevice) throws
        -> DeviceBuffer<UInt8>
    {
        try uploadFP8(
            matrices: matrices, rows: hidden, k: k, device: device, source: fp8SecondSource(down: down, hidden: hidden))
    }

    /// Row r of W2's fp8 image → (matrix, source row): the rows as they are, `hidden` of them.
    static func fp8SecondSource<M>(down: M, hidden: Int) -> (Int) -> (M, Int)? {
        { r in r < hidden ? (down, r) : nil }
    }

    /// Copies each expert's image (`fp8Image`) to the device, one expert at a time.
    private static func uploadFP8(
        matrices: Int, rows: Int, k: Int, device: CUDADevice, source: (Int) -> (FP8Blocks, Int)?
    ) throws -> DeviceBuffer<UInt8> {
        let expertBytes = fp8ExpertBytes(rows: rows, k: k).total
        let buffer = try DeviceBuffer<UInt8>(device: device, count: max(1, matrices * expertBytes))
        for m in 0..<matrices {
            try buffer.upload(fp8Image(matrix: m, rows: rows, k: k, source: source), at: m * expertBytes)
        }
        return buffer
    }

    /// The bytes of expert `m`: its packed rows' codes, then the scale of each 64-row granule and K block.
    static func fp8Image(matrix m: Int, rows: Int, k: Int, source: (Int) -> (FP8Blocks, Int)?) -> [UInt8] {
        let (codeBytes, expertBytes) = fp8ExpertBytes(rows: rows, k: k)
        let scales = fp8ScaleSection(matrix: m, rows: rows, k: k) { r in source(r).map { ($0.0.scaleGrid, $0.1) } }
        var bytes = [UInt8](repeating: 0, count: expertBytes)
        bytes.withUnsafeMutableBytes { raw in
            for r in 0..<rows {
                guard let (blocks, row) = source(r) else { continue }
                let from = (m * blocks.rows + row) * k
                blocks.codes.withUnsafeBytes { codes in
                    (raw.baseAddress! + r * k).copyMemory(from: codes.baseAddress! + from, byteCount: k)
                }
            }
            scales.withUnsafeBytes { (raw.baseAddress! + codeBytes).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        }
        return bytes
    }

    /// The scales of expert `m`'s image, [⌈rows/64⌉][⌈k/128⌉]: each 64-row granule's, from the 128-row scale block of
    /// the source matrix that holds it; 0 for padding granules.
    static func fp8ScaleSection(matrix m: Int, rows: Int, k: Int, source: (Int) -> (FP8ScaleGrid, Int)?) -> [Float] {
        let kb = (k + 127) / 128
        let granules = (rows + fp8Granule - 1) / fp8Granule
        var scales = [Float](repeating: 0, count: granules * kb)
        for g in 0..<granules {
            // A granule's rows come from one matrix and one 128-row scale block (64 divides 128).
            guard let (grid, row) = source(g * fp8Granule) else { continue }
            let base = (m * grid.blockRows + row / 128) * kb
            for j in 0..<kb { scales[g * kb + j] = grid.scales[base + j] }
        }
        return scales
    }
}

/// The block scales of a stack of FP8 matrices of `k` columns, [matrices, blockRows, ⌈k/128⌉] row-major: the scale
/// half of `FP8Blocks`, for images whose codes are copied without passing through host memory.
struct FP8ScaleGrid {
    let scales: [Float]
    /// Scale blocks along each matrix's rows, ⌈rows/128⌉.
    let blockRows: Int
}

extension FP8Blocks {
    /// The scales alone.
    var scaleGrid: FP8ScaleGrid { FP8ScaleGrid(scales: scales, blockRows: blockRows) }
}
