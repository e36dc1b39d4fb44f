/// The TMA engine's tensor maps (`TmaMaps` in Sources/CKernels/kernels/phase_experts_tma.cuh): the kernel's second
/// parameter in `FusedSpecialization.tmaEngine` builds, passed by value in every launch like `Params`, so a CUDA
/// graph that captured a launch replays it with the same maps.
///
/// Six 128-byte `CUtensorMap`s in the kernel's order: W1 and W2 (all experts' rows, boxes of 256 rows), the shared
/// expert's Ws1 and Ws2 (copies of W1's and W2's where there is none: never read), then h: the routed rows `hbuf` and
/// the shared expert's `hs` (boxes of 128 rows, the workspace's capacity). Weights are the operator's own copies
/// and h lives in its arena, so the maps change only when the arena is reallocated.
///
/// Precision fp8 (tma_fp8_tasks.cuh): W1 and W2 are stacks of the experts' E4M3 images (3-D maps: each
/// image's codes are followed by its scales, FusedDeviceWeights+FP8.swift) read in boxes of the engine's tile rows
/// (`FusedSpecialization.tmaFP8TileRows`: a box of other rows than the kernel's stage holds would overrun it), and
/// the routed h map is over the E4M3 codes `hq` the GEMM1 tiles read; the shared expert's maps stay BF16.
enum FusedTensorMaps {
    /// Bytes of the parameter: six maps.
    static let byteCount = 6 * 128

    /// The parameter's bytes for `weights` and the workspace `ws` of an arena at `arenaBase`.
    static func encode(
        device: CUDADevice, spec: FusedSpecialization, weights w: FusedDeviceWeights, workspace ws: FusedWorkspace,
        arenaBase: UInt64
    ) throws -> [UInt8] {
        let c = spec.config
        let fp8 = c.precision == .fp8
        let element: TensorMap.Element = c.precision == .fp16 ? .fp16 : .bf16
        let (h, i) = (c.hiddenSize, c.intermediateSize)
        let sharedI = c.sharedExpert?.intermediateSize ?? 0
        func map(_ address: UInt64, bytes: Int, columns: Int, boxRows: Int, element: TensorMap.Element = element)
            throws -> TensorMap
        {
            try TensorMap(
                driver: device.driver, element: element, address: address,
                rows: max(bytes / (columns * element.byteSize), 1), columns: columns, rowStride: columns,
                boxRows: boxRows)
        }
        // An fp8 stack: every expert's image of `rows` packed rows of `k` codes (its scales after them).
        func images(_ buffer: DeviceBuffer<UInt8>, rows: Int, k: Int) throws -> TensorMap {
            let stride = FusedDeviceWeights.fp8ExpertBytes(rows: rows, k: k).total
            return try TensorMap(
                driver: device.driver, element: .e4m3, address: buffer.address, rows: rows, columns: k, rowStride: k,
                boxRows: spec.tmaFP8TileRows, matrices: max(buffer.byteCount / stride, 1), matrixStride: stride)
        }
        let w1: TensorMap, w2: TensorMap, hbuf: TensorMap
        if fp8 {
            let n0 = FusedDeviceWeights.fp8FirstRows(
                inner: i, gated: c.ffn == .gated, packRows: FusedDeviceWeights.fp8Granule)
            w1 = try images(w.w1, rows: n0, k: h)
            w2 = try images(w.w2, rows: h, k: i)
            hbuf = try map(
                arenaBase + UInt64(ws.offset(.hq)), bytes: ws.rowCapacity * i, columns: i, boxRows: 128,
                element: .e4m3)
        } else {
            w1 = try map(w.w1.address, bytes: w.w1.byteCount, columns: h, boxRows: 256)
            w2 = try map(w.w2.address, bytes: w.w2.byteCount, columns: i, boxRows: 256)
            hbuf = try map(
                arenaBase + UInt64(ws.offset(.hbuf)), bytes: ws.rowCapacity * i * 2, columns: i, boxRows: 128)
        }
        let ws1 = try w.sharedW1.map { try map($0.address, bytes: $0.byteCount, columns: h, boxRows: 256) } ?? w1
        let ws2 =
            try w.sharedW2.map { try map($0.address, bytes: $0.byteCount, columns: sharedI, boxRows: 256) } ?? w2
        let hs =
            sharedI > 0
            ? try map(arenaBase + UInt64(ws.offset(.hs)), bytes: ws.maxTokens * sharedI * 2, columns: sharedI, boxRows: 128)
            : hbuf
        var bytes: [UInt8] = []
        bytes.reserveCapacity(byteCount)
        for m in [w1, w2, ws1, ws2, hbuf, hs] {
            for word in m.words { withUnsafeBytes(of: word.littleEndian) { bytes += $0 } }
        }
        return bytes
    }
}
