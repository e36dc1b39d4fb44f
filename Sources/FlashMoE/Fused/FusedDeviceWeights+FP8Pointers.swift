import CCUDA

/// fp8 layers from the caller's device pointers (the C ABI's FLASHMOE_PRECISION_FP8): the routed experts' images
/// (FusedDeviceWeights+FP8.swift) built from BF16 matrices, quantized here, or from E4M3 codes with their block
/// scales (`WeightPointers.ExpertScales`).
///
/// The experts pass through host memory, a few at a time: each chunk is read from the device, turned into
/// `FP8Blocks` exactly as the host path does (`MoEWeights.prepared(for: .fp8)` quantizes BF16 values with
/// `FP8Blocks(quantizing:)`, on all cores), laid out per expert (`fp8Image`) and written back. So a layer built from
/// device pointers holds the same bytes as one built from the same values on the host, and the oracle's
/// quantization is the kernel's. Host memory: one chunk (at most `chunkBytes` of source matrices, plus its FP32
/// quantization scratch per core); time: the PCIe copies both ways plus, for BF16, the quantization.
extension FusedDeviceWeights {
    /// Source bytes of routed experts read from the device at once.
    static let fp8ChunkBytes = 256 << 20

    /// The fp8 first layer (W1, gated: gate and up interleaved) and W2 of experts `first ..< first + count` of
    /// `p`, in the kernel's per-expert image layout, reading at most `chunkBytes` of source matrices at a time
    /// (at least one expert).
    static func fp8Experts(
        config c: MoEConfig, pointers p: WeightPointers, device: CUDADevice, packRows: Int, first: Int, count e: Int,
        chunkBytes: Int = fp8ChunkBytes
    ) throws -> (w1: DeviceBuffer<UInt8>, w2: DeviceBuffer<UInt8>) {
        guard packRows == fp8Granule else {
            throw MoEError(
                .unsupported, "the fp8 kernel packs gate/up rows in blocks of \(fp8Granule), but this module packs \(packRows)")
        }
        let (h, i) = (c.hiddenSize, c.intermediateSize)
        let gated = c.ffn == .gated
        let source = ExpertSource(pointers: p, device: device, hidden: h, inner: i, gated: gated)
        let rows1 = fp8FirstRows(inner: i, gated: gated, packRows: packRows)
        let (bytes1, bytes2) = (fp8ExpertBytes(rows: rows1, k: h).total, fp8ExpertBytes(rows: h, k: i).total)
        let w1 = try DeviceBuffer<UInt8>(device: device, count: max(1, e * bytes1))
        let w2 = try DeviceBuffer<UInt8>(device: device, count: max(1, e * bytes2))
        let perExpert = (gated ? 3 : 2) * h * i * source.elementBytes
        let chunk = max(1, min(e, chunkBytes / max(1, perExpert)))
        var start = 0
        while start < e {
            let n = min(chunk, e - start)
            let experts = (first + start)..<(first + start + n)
            let gate = try source.blocks(.gate, experts: experts)
            let up = gated ? try source.blocks(.up, experts: experts) : nil
            let down = try source.blocks(.down, experts: experts)
            let firstRows = fp8FirstSource(gate: gate, up: up, inner: i, packRows: packRows)
            let secondRows = fp8SecondSource(down: down, hidden: h)
            for m in 0..<n {
                try w1.upload(fp8Image(matrix: m, rows: rows1, k: h, source: firstRows), at: (start + m) * bytes1)
                try w2.upload(fp8Image(matrix: m, rows: h, k: i, source: secondRows), at: (start + m) * bytes2)
            }
            start += n
        }
        return (w1, w2)
    }
}

/// Reads the routed experts' matrices of a `WeightPointers` from device memory as `FP8Blocks`.
private struct ExpertSource {
    enum Matrix { case gate, up, down }

    let pointers: WeightPointers
    let device: CUDADevice
    let hidden: Int, inner: Int, gated: Bool

    /// Bytes per element of the caller's expert matrices: 1 for E4M3 codes, 2 for BF16.
    var elementBytes: Int { pointers.expertScales == nil ? 2 : 1 }

    /// Rows, columns, the C field of the matrices and of their scales.
    private func shape(_ m: Matrix) -> (rows: Int, cols: Int, field: String, scaleField: String) {
        let fused: Bool
        if case .fused = pointers.firstLayer { fused = true } else { fused = false }
        switch m {
        case .gate: return (inner, hidden, fused ? "gate_up" : "gate", fused ? "gate_up_scale" : "gate_scale")
        case .up: return (inner, hidden, fused ? "gate_up" : "up", fused ? "gate_up_scale" : "up_scale")
        case .down: return (hidden, inner, "down", "down_scale")
        }
    }

    /// The address of expert `x`'s first row of `m` (its rows follow contiguously, elements of `bytes` bytes).
    private func address(_ m: Matrix, expert x: Int, bytes: Int) -> UInt64 {
        switch m {
        case .down: return pointers.down + UInt64(x * hidden * inner * bytes)
        case .gate, .up:
            let rows = pointers.firstLayer.rows(of: x, gated: gated, rows: inner, rowBytes: hidden * bytes)
            return m == .up ? rows.up ?? rows.gate : rows.gate
        }
    }

    /// Matrix `m` of `experts` as FP8 blocks [n, rows, cols]: the codes and scales as given, or the BF16 values
    /// quantized as the host path quantizes them.
    func blocks(_ m: Matrix, experts: Range<Int>) throws -> FP8Blocks {
        let s = shape(m)
        let shape = [experts.count, s.rows, s.cols]
        let per = s.rows * s.cols
        guard let scales = pointers.expertScales else {
            let values = try read(BFloat16.self, matrices: experts.count, perMatrix: per, field: s.field) { j in
                address(m, expert: experts.lowerBound + j, bytes: 2)
            }
            return FP8Blocks(quantizing: try HostTensor(shape: shape, bfloat16: values))
        }
        let codes = try read(FP8E4M3.self, matrices: experts.count, perMatrix: per, field: s.field) { j in
            address(m, expert: experts.lowerBound + j, bytes: 1)
        }
        // Scales: [E, ⌈rows/128⌉, ⌈cols/128⌉] per tensor; a fused gated first layer's matrices have ⌈2I/128⌉ block
        // rows, the gate's first (I is a multiple of 128, checked with the pointers).
        let (br, bc) = ((s.rows + 127) / 128, (s.cols + 127) / 128)
        let blockRowsPerExpert: Int
        let scaleBase: UInt64
        var offset = 0
        switch (m, scales.firstLayer) {
        case (.down, _): (blockRowsPerExpert, scaleBase) = (br, scales.down)
        case (_, .fused(let base)):
            (blockRowsPerExpert, scaleBase) = ((gated ? 2 : 1) * br, base)
            offset = m == .up ? br : 0
        case (.gate, .separate(let gate, _)): (blockRowsPerExpert, scaleBase) = (br, gate)
        case (.up, .separate(let gate, let up)): (blockRowsPerExpert, scaleBase) = (br, up ?? gate)
        }
        let blockBytes = bc * 4
        let values = try read(Float.self, matrices: experts.count, perMatrix: br * bc, field: s.scaleField) { j in
            scaleBase + UInt64(((experts.lowerBound + j) * blockRowsPerExpert + offset) * blockBytes)
        }
        if let bad = values.firstIndex(where: { !$0.isFinite }) {
            let (j, within) = bad.quotientAndRemainder(dividingBy: br * bc)
            throw MoEError(
                .invalidInput,
                "weights->\(s.scaleField) holds \(values[bad]) for expert \(experts.lowerBound + j) (block \(within) of its "
                    + "\(s.field)): FP8 block scales must be finite")
        }
        return try FP8Blocks(shape: shape, codes: codes, scales: values)
    }

    /// `matrices` × `perMatrix` elements of `T` read from the device, matrix j's from `address(j)` (the C field
    /// `field`, named when a copy fails).
    private func read<T: BitwiseCopyable>(
        _: T.Type, matrices: Int, perMatrix per: Int, field: String, address: (Int) -> UInt64
    ) throws -> [T] {
        let count = matrices * per
        guard count > 0 else { return [] }
        try device.makeCurrent()
        var failure: CUresult?
        var failedAt: UInt64 = 0
        let out = [T](unsafeUninitializedCapacity: count) { buffer, initialized in
            let raw = UnsafeMutableRawPointer(buffer.baseAddress!)
            for j in 0..<matrices where failure == nil {
                let bytes = per * MemoryLayout<T>.stride
                let result = device.driver.memcpyDtoH(raw + j * bytes, address(j), bytes, nil)
                if result != CUDA_SUCCESS { (failure, failedAt) = (result, address(j)) }
            }
            if failure != nil { raw.initializeMemory(as: UInt8.self, repeating: 0, count: count * MemoryLayout<T>.stride) }
            initialized = count
        }
        if let failure {
            throw CUDAError.invalidArgument(
                "weights->\(field) (0x\(String(failedAt, radix: 16))) could not be read as device memory of GPU "
                    + "\(device.properties.ordinal) (\(device.driver.error(for: failure, call: "cuMemcpyDtoH_v2"))): "
                    + "pass a device pointer of that GPU holding the whole tensor")
        }
        return out
    }
}
