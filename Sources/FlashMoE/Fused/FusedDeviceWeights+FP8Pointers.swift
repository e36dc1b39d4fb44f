import CCUDA

/// fp8 layers from the caller's device pointers (the C ABI's FLASHMOE_PRECISION_FP8): the routed experts' images
/// (FusedDeviceWeights+FP8.swift) built from BF16 matrices, quantized while building, or from E4M3 codes with their block
/// scales (`WeightPointers.ExpertScales`).
///
/// E4M3 codes stay on the device: each expert's image is assembled by device-to-device copies of its rows (gate
/// and up blocks interleaved as `fp8FirstSource` places them), and only the block scales, one float per 16,384
/// codes, are read to the host, checked finite and written into the images' scale sections.
///
/// BF16 experts are quantized a chunk of experts at a time: each chunk's matrices are first copied into a staging
/// buffer this code owns (so a kernel reads only memory allocated here, and a bad caller address is a failed copy
/// naming its field, not a fault in a kernel), quantized into dense codes and scales (`FP8MatrixQuantizing`: on the
/// GPU, `FP8DeviceQuantizer` with kernels/quantize.cu, by default; through host memory, `FP8HostQuantizer`, with
/// `FLASHMOE_FP8_QUANTIZER=host`; both write what `FP8Blocks(quantizing:)` writes), then assembled into the images as
/// E4M3 codes are. Device memory beside the images: one chunk (at most `chunkBytes` of BF16 source, plus its codes
/// and scales); host memory: the chunk's block scales (and with the host's quantizer its matrices).
///
/// Either way a layer built from device pointers holds the same bytes as one built from the same values on the
/// host, and the oracle's quantization is the kernel's.
extension FusedDeviceWeights {
    /// BF16 bytes of routed experts staged and quantized at once.
    static let fp8ChunkBytes = 256 << 20

    /// The fp8 first layer (W1, gated: gate and up interleaved) and W2 of experts `first ..< first + count` of
    /// `p`, in the kernel's per-expert image layout. BF16 experts are quantized by `quantizer` (default:
    /// `defaultQuantizer`) at most `chunkBytes` of source at a time (at least one expert).
    static func fp8Experts(
        config c: MoEConfig, pointers p: WeightPointers, device: CUDADevice, packRows: Int, first: Int, count e: Int,
        chunkBytes: Int = fp8ChunkBytes, quantizer: (any FP8MatrixQuantizing)? = nil
    ) throws -> (w1: DeviceBuffer<UInt8>, w2: DeviceBuffer<UInt8>) {
        guard packRows == fp8Granule else {
            throw MoEError(
                .unsupported, "the fp8 kernel packs gate/up rows in blocks of \(fp8Granule), but this module packs \(packRows)")
        }
        let copier = DeviceCopier(device: device)
        let (bytes1, bytes2) = fp8ImageBytes(c)
        // Zeros: the padding rows of a partial last gate/up block, their granules' scales and the 16-byte padding.
        let w1 = try copier.buffer(bytes: e * bytes1)
        let w2 = try copier.buffer(bytes: e * bytes2)
        try w1.fill(byte: 0)
        try w2.fill(byte: 0)
        if p.expertScales != nil {
            try fp8ImagesFromCodes(config: c, pointers: p, device: device, packRows: packRows, first: first, count: e,
                                   w1: w1, w2: w2)
        } else if e > 0 {  // a rank without routed experts needs no quantizer
            try fp8ImagesFromBF16(
                config: c, pointers: p, device: device, packRows: packRows, first: first, count: e,
                chunkBytes: chunkBytes, quantizer: try quantizer ?? defaultQuantizer(device),
                w1: w1, bytes1: bytes1, w2: w2, bytes2: bytes2)
        }
        try device.synchronize()
        return (w1, w2)
    }

    /// The quantizer of BF16 experts: the GPU's (`FP8DeviceQuantizer`), or with `FLASHMOE_FP8_QUANTIZER=host` the
    /// host's through host memory (`FP8HostQuantizer`; see `FP8HostQuantizer.hostRequested` for the evidence).
    static func defaultQuantizer(_ device: CUDADevice) throws -> any FP8MatrixQuantizing {
        FP8HostQuantizer.hostRequested() ? FP8HostQuantizer(device: device) : try FP8DeviceQuantizer(device: device)
    }

    /// `fp8Experts` from BF16 matrices: per chunk of experts, the caller's gate, up and down rows copied into a
    /// staging buffer (one copy per tensor: the chunk's matrices are contiguous in every layout), quantized from
    /// there into dense codes and scales laid out as separate E4M3 tensors, which `fp8ImagesFromCodes` then
    /// assembles into experts `start ..< start + n` of `w1` and `w2` (images of `bytes1` and `bytes2` bytes an expert).
    private static func fp8ImagesFromBF16(
        config c: MoEConfig, pointers p: WeightPointers, device: CUDADevice, packRows: Int, first: Int, count e: Int,
        chunkBytes: Int, quantizer: any FP8MatrixQuantizing,
        w1: DeviceBuffer<UInt8>, bytes1: Int, w2: DeviceBuffer<UInt8>, bytes2: Int
    ) throws {
        let (h, i) = (c.hiddenSize, c.intermediateSize)
        let gated = c.ffn == .gated
        let fusedPair = gated && p.firstLayer.isFused  // gate and up rows of a matrix in one [2I, H] block
        let copier = DeviceCopier(device: device)
        let b = FP8Scaling.blockSize
        let (bi, bh) = ((i + b - 1) / b, (h + b - 1) / b)
        let firstMatrices = gated ? 2 : 1
        let perExpert = (firstMatrices + 1) * h * i  // elements of one expert's routed matrices
        let chunk = max(1, min(e, chunkBytes / max(1, 2 * perExpert)))
        let staging = try copier.buffer(bytes: chunk * perExpert * 2)
        let codes = try copier.buffer(bytes: chunk * perExpert)
        let scales = try DeviceBuffer<Float>(device: device, count: max(1, chunk * (firstMatrices + 1) * bi * bh))
        // Dense per tensor for up to `chunk` experts: gate, up (gated), down.
        let (gateCodes, upCodes, downCodes) = (
            codes.address, codes.address + UInt64(chunk * i * h), codes.address + UInt64(firstMatrices * chunk * i * h)
        )
        let (gateScales, upScales, downScales) = (
            scales.address, scales.address + UInt64(chunk * bi * bh * 4),
            scales.address + UInt64(firstMatrices * chunk * bi * bh * 4)
        )
        let (gateName, upName) = p.firstLayer.isFused ? ("gate_up", "gate_up") : ("gate", "up")
        let rowBytes = h * 2
        var start = 0
        while start < e {
            let n = min(chunk, e - start)
            let x = first + start  // the chunk's first expert in the caller's tensors
            let rows = p.firstLayer.rows(of: x, gated: gated, rows: i, rowBytes: rowBytes)
            // Staging (elements): the first layer's n matrices from 0 (fused pairs: [n, 2I, H]; else gate [n, I, H]
            // then up [n, I, H]), then down [n, H, I].
            let firstElements = n * firstMatrices * i * h
            if fusedPair || !gated {
                try copier.copy(to: staging, at: 0, from: rows.gate, bytes: firstElements * 2, field: gateName)
            } else {
                guard let up = rows.up else { throw CUDAError.invalidArgument("a gated first layer needs its up rows") }
                try copier.copy(to: staging, at: 0, from: rows.gate, bytes: n * i * h * 2, field: gateName)
                try copier.copy(to: staging, at: n * i * h * 2, from: up, bytes: n * i * h * 2, field: upName)
            }
            try copier.copy(
                to: staging, at: firstElements * 2, from: p.down + UInt64(x * h * i * 2), bytes: n * h * i * 2,
                field: "down")
            let stride = fusedPair ? 2 * i * h : i * h
            try quantizer.quantize(
                source: staging.address, matrixStride: stride, matrices: n, rows: i, cols: h, codes: gateCodes,
                scales: gateScales)
            if gated {
                try quantizer.quantize(
                    source: staging.address + UInt64((fusedPair ? i * h : n * i * h) * 2), matrixStride: stride,
                    matrices: n, rows: i, cols: h, codes: upCodes, scales: upScales)
            }
            try quantizer.quantize(
                source: staging.address + UInt64(firstElements * 2), matrixStride: h * i, matrices: n, rows: h, cols: i,
                codes: downCodes, scales: downScales)
            let q = WeightPointers(
                router: 0, selectionBias: nil, firstLayer: .separate(gate: gateCodes, up: gated ? upCodes : nil),
                down: downCodes, b1: nil, b2: nil, sharedFirstLayer: nil, sharedDown: nil, sharedGate: nil,
                expertScales: .init(firstLayer: .separate(gate: gateScales, up: gated ? upScales : nil), down: downScales))
            try fp8ImagesFromCodes(
                config: c, pointers: q, device: device, packRows: packRows, first: 0, count: n,
                w1: DeviceBuffer(device: device, borrowing: w1.address + UInt64(start * bytes1), count: n * bytes1),
                w2: DeviceBuffer(device: device, borrowing: w2.address + UInt64(start * bytes2), count: n * bytes2))
            start += n
        }
        // The scratch buffers are used through their addresses only: alive until here, after the last chunk's copies
        // out of them (each chunk ends with synchronous reads of its scales, behind its copies on the legacy stream).
        withExtendedLifetime((staging, codes, scales)) {}
    }

    /// The row sources of the W1 and W2 images (`fp8FirstSource`, `fp8SecondSource`) over the gate, up (gated
    /// only) and down matrices that `read` returns: codes and scales, or scales alone.
    private static func fp8Sources<M>(
        config c: MoEConfig, packRows: Int, read: (WeightPointers.ExpertMatrix) throws -> M
    ) throws -> (first: (Int) -> (M, Int)?, second: (Int) -> (M, Int)?) {
        let gate = try read(.gate)
        let up = c.ffn == .gated ? try read(.up) : nil
        let down = try read(.down)
        return (fp8FirstSource(gate: gate, up: up, inner: c.intermediateSize, packRows: packRows),
                fp8SecondSource(down: down, hidden: c.hiddenSize))
    }

    /// Experts `first ..< first + count` of `p`'s E4M3 codes as images in `w1` and `w2` (zeroed by the caller,
    /// expert m's from byte m · its image size): the codes copied device to device, the scales through the host
    /// (read for all `count` experts at once: a DeepSeek-V3 layer's are 2.7 MB, from its shape).
    private static func fp8ImagesFromCodes(
        config c: MoEConfig, pointers p: WeightPointers, device: CUDADevice, packRows: Int, first: Int, count e: Int,
        w1: DeviceBuffer<UInt8>, w2: DeviceBuffer<UInt8>
    ) throws {
        let (h, i) = (c.hiddenSize, c.intermediateSize)
        let gated = c.ffn == .gated
        let copier = DeviceCopier(device: device)
        let experts = first..<(first + e)
        let rows1 = fp8FirstRows(inner: i, gated: gated, packRows: packRows)
        let (codes1, bytes1) = fp8ExpertBytes(rows: rows1, k: h)
        let (codes2, bytes2) = fp8ExpertBytes(rows: h, k: i)
        try copier.copyFirstLayer(
            p.firstLayer, into: w1, matrixBytes: bytes1, gated: gated, matrices: e, rows: i, rowBytes: h,
            packRows: packRows, names: .experts, firstMatrix: first)
        for m in 0..<e {
            try copier.copy(to: w2, at: m * bytes2, from: p.down + UInt64((first + m) * h * i), bytes: h * i, field: "down")
        }
        let copy = WeightPointers.deviceCopy(device)
        let (first1, second) = try fp8Sources(config: c, packRows: packRows) {
            try p.fp8Scales($0, experts: experts, config: c, copy: copy)
        }
        for m in 0..<e {
            let s1 = fp8ScaleSection(matrix: m, rows: rows1, k: h, source: first1)
            let s2 = fp8ScaleSection(matrix: m, rows: h, k: i, source: second)
            try s1.withUnsafeBytes { try w1.upload(Array($0), at: m * bytes1 + codes1) }
            try s2.withUnsafeBytes { try w2.upload(Array($0), at: m * bytes2 + codes2) }
        }
    }
}

/// Quantizes BF16 matrices in device memory into E4M3 codes and 128×128 block scales in device memory, as
/// `FP8Blocks(quantizing:)` does on the host: `FP8DeviceQuantizer` on a GPU (the tests of the fake driver supply
/// one that runs on its memory).
protocol FP8MatrixQuantizing {
    /// Quantizes `matrices` BF16 matrices [rows, cols] (matrix m at `source` + m · `matrixStride` elements) into
    /// dense `codes` [matrices, rows, cols] and `scales` [matrices, ⌈rows/128⌉, ⌈cols/128⌉], ordered after earlier
    /// copies on the device and before later ones.
    func quantize(
        source: UInt64, matrixStride: Int, matrices: Int, rows: Int, cols: Int, codes: UInt64, scales: UInt64
    ) throws
}

extension FP8DeviceQuantizer: FP8MatrixQuantizing {
    func quantize(
        source: UInt64, matrixStride: Int, matrices: Int, rows: Int, cols: Int, codes: UInt64, scales: UInt64
    ) throws {
        try quantize(
            source: source, matrixStride: matrixStride, matrices: matrices, rows: rows, cols: cols, codes: codes,
            scales: scales, gridLimit: nil)
    }
}

extension WeightPointers {
    /// The routed experts' matrices, as `fp8Blocks(_:experts:config:copy:)` reads them.
    public enum ExpertMatrix: Sendable { case gate, up, down }

    /// Copies `bytes` bytes at the caller's address `from` into `into`; `field` names the C field read, for the
    /// error when the address cannot be read. Host layers copy host memory, GPU layers device memory.
    public typealias Copy = @Sendable (_ into: UnsafeMutableRawPointer, _ from: UInt64, _ bytes: Int, _ field: String) throws
        -> Void

    /// Copies from the caller's host memory (addresses checked non-NULL and aligned by the caller).
    public static let hostCopy: Copy = { into, from, bytes, _ in
        guard bytes > 0, let source = UnsafeRawPointer(bitPattern: UInt(from)) else { return }
        into.copyMemory(from: source, byteCount: bytes)
    }

    /// Copies from `device`'s memory (`cuMemcpyDtoH`); a failed copy names the field.
    static func deviceCopy(_ device: CUDADevice) -> Copy {
        { into, from, bytes, field in
            guard bytes > 0 else { return }
            try device.makeCurrent()
            let result = device.driver.memcpyDtoH(into, from, bytes, nil)
            guard result == CUDA_SUCCESS else {
                throw DeviceCopier.unreadable(field, at: from, device: device, result: result, call: "cuMemcpyDtoH_v2")
            }
        }
    }

    /// Matrix `m` of the routed `experts` as FP8 blocks [n, rows, cols], read through `copy`: the codes and block
    /// scales as given (`expertScales`), or the BF16 values quantized as the host path quantizes them
    /// (`FP8Blocks(quantizing:)`). A NaN or infinite scale is refused, naming its field, expert and block. The C ABI's
    /// CPU layers read here; GPU layers (`fp8Experts`) quantize BF16 on the device and read E4M3 scales through
    /// `fp8Scales`, which this shares, so both place the scales alike.
    public func fp8Blocks(_ m: ExpertMatrix, experts: Range<Int>, config c: MoEConfig, copy: Copy) throws
        -> FP8Blocks
    {
        let (hidden, inner, gated) = (c.hiddenSize, c.intermediateSize, c.ffn == .gated)
        let (rows, cols, field, _) = fields(m, config: c)
        let shape = [experts.count, rows, cols]
        // Expert x's first row of m (its rows follow contiguously, elements of `bytes` bytes).
        func address(_ x: Int, bytes: Int) -> UInt64 {
            guard m != .down else { return down + UInt64(x * hidden * inner * bytes) }
            let r = firstLayer.rows(of: x, gated: gated, rows: inner, rowBytes: hidden * bytes)
            return m == .up ? r.up ?? r.gate : r.gate
        }
        guard expertScales != nil else {
            let values = try Self.read(BFloat16.self, matrices: experts.count, perMatrix: rows * cols, field: field,
                                       copy: copy) { j in address(experts.lowerBound + j, bytes: 2) }
            return FP8Blocks(quantizing: try HostTensor(shape: shape, bfloat16: values))
        }
        let codes = try Self.read(FP8E4M3.self, matrices: experts.count, perMatrix: rows * cols, field: field,
                                  copy: copy) { j in address(experts.lowerBound + j, bytes: 1) }
        let values = try fp8Scales(m, experts: experts, config: c, copy: copy).scales
        return try FP8Blocks(shape: shape, codes: codes, scales: values)
    }

    /// Matrix `m`'s (rows, columns) and the C fields of its values and scales.
    private func fields(_ m: ExpertMatrix, config c: MoEConfig) -> (Int, Int, String, String) {
        let (hidden, inner, fused) = (c.hiddenSize, c.intermediateSize, firstLayer.isFused)
        return switch m {
        case .gate: (inner, hidden, fused ? "gate_up" : "gate", fused ? "gate_up_scale" : "gate_scale")
        case .up: (inner, hidden, fused ? "gate_up" : "up", fused ? "gate_up_scale" : "up_scale")
        case .down: (hidden, inner, "down", "down_scale")
        }
    }

    /// The block scales of matrix `m` of the routed `experts` (given with E4M3 codes: `expertScales`), read through
    /// `copy`, [n, ⌈rows/128⌉, ⌈cols/128⌉]. A NaN or infinite scale is refused, naming its field, expert and block.
    func fp8Scales(_ m: ExpertMatrix, experts: Range<Int>, config c: MoEConfig, copy: Copy) throws -> FP8ScaleGrid {
        guard let scales = expertScales else {
            throw MoEError(.invalidInput, "weights: E4M3 expert codes need their block scales")
        }
        let gated = c.ffn == .gated
        let (rows, cols, field, scaleField) = fields(m, config: c)
        // Scales: [E, ⌈rows/128⌉, ⌈cols/128⌉] per tensor; a fused gated first layer's matrices have ⌈2I/128⌉ block
        // rows, the gate's first (I is a multiple of 128, checked with the pointers).
        let (br, bc) = ((rows + 127) / 128, (cols + 127) / 128)
        let (blockRowsPerExpert, base, offset): (Int, UInt64, Int) =
            switch (m, scales.firstLayer) {
            case (.down, _): (br, scales.down, 0)
            case (_, .fused(let base)): ((gated ? 2 : 1) * br, base, m == .up ? br : 0)
            case (.gate, .separate(let gate, _)): (br, gate, 0)
            case (.up, .separate(let gate, let up)): (br, up ?? gate, 0)
            }
        let values = try Self.read(Float.self, matrices: experts.count, perMatrix: br * bc, field: scaleField,
                                   copy: copy) { j in
            base + UInt64(((experts.lowerBound + j) * blockRowsPerExpert + offset) * bc * 4)
        }
        if let bad = values.firstIndex(where: { !$0.isFinite }) {
            let (j, within) = bad.quotientAndRemainder(dividingBy: br * bc)
            throw MoEError(
                .invalidInput,
                "weights->\(scaleField) holds \(values[bad]) for expert \(experts.lowerBound + j) (block \(within) of "
                    + "its \(field)): FP8 block scales must be finite")
        }
        return FP8ScaleGrid(scales: values, blockRows: br)
    }

    /// `matrices` × `perMatrix` elements of `T` read through `copy`, matrix j's from `address(j)`.
    private static func read<T: BitwiseCopyable>(
        _: T.Type, matrices: Int, perMatrix per: Int, field: String, copy: Copy, address: (Int) -> UInt64
    ) throws -> [T] {
        let bytes = per * MemoryLayout<T>.stride
        return try [T](unsafeUninitializedCapacity: matrices * per) { buffer, initialized in
            guard let raw = buffer.baseAddress.map(UnsafeMutableRawPointer.init) else { return }
            for j in 0..<matrices { try copy(raw + j * bytes, address(j), bytes, field) }
            initialized = matrices * per  // only once every copy landed (a throw leaves the array empty)
        }
    }
}
