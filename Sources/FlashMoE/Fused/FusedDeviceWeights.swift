/// A layer's weights on the device, in the layout the fused kernel reads.
///
/// - Matrices are stored in the precision's storage type, rows `[out, in]` as Hugging Face keeps them.
/// - The router gets one extra row for the shared expert's sigmoid gate, when it has one.
/// - Gated FFNs pack W1 (gate) and W3 (up) into blocks of `2·packRows` rows: `packRows` gate rows, then the
///   matching up rows (I padded with zero rows to a multiple of `packRows`), so one GEMM0 tile holds matching gate
///   and up columns and its epilogue emits act(g)·u. `packRows` is half the kernel's expert tile width, read from
///   the compiled module so host and kernel cannot disagree. Packing happens once, when the layer is created.
/// - TF32 mode rounds the expert matrices to the nearest TF32 value (ties away from zero, as `cvt.rna`) once here;
///   the kernel rounds x and h itself (gemm_tile.cuh states the rule), the same on every architecture. The router
///   keeps FP32 (routing is exact FP32 FFMA).
struct FusedDeviceWeights {
    let router: DeviceBuffer<UInt8>
    let selectionBias: DeviceBuffer<UInt8>?
    let w1: DeviceBuffer<UInt8>
    let w2: DeviceBuffer<UInt8>
    let b1: DeviceBuffer<UInt8>?
    let b2: DeviceBuffer<UInt8>?
    let sharedW1: DeviceBuffer<UInt8>?
    let sharedW2: DeviceBuffer<UInt8>?

    /// Total device bytes.
    var byteCount: Int {
        [router, selectionBias, w1, w2, b1, b2, sharedW1, sharedW2].compactMap { $0?.byteCount }.reduce(0, +)
    }

    /// Weights already in device memory in the kernel's layout (for operators built from the caller's device
    /// weights; gated W1/W3 packed in blocks of the kernel's `packRows`).
    init(
        router: DeviceBuffer<UInt8>, selectionBias: DeviceBuffer<UInt8>?, w1: DeviceBuffer<UInt8>,
        w2: DeviceBuffer<UInt8>, b1: DeviceBuffer<UInt8>?, b2: DeviceBuffer<UInt8>?, sharedW1: DeviceBuffer<UInt8>?,
        sharedW2: DeviceBuffer<UInt8>?
    ) {
        self.router = router
        self.selectionBias = selectionBias
        self.w1 = w1
        self.w2 = w2
        self.b1 = b1
        self.b2 = b2
        self.sharedW1 = sharedW1
        self.sharedW2 = sharedW2
    }

    /// - Parameter experts: the routed experts to upload (a rank's share); all of them by default. The router and
    ///   the shared expert are always uploaded whole.
    init(layer: MoELayer, experts: Range<Int>? = nil, device: CUDADevice, packRows: Int) throws {
        let c = layer.config
        let type = c.precision.storage
        var w = layer.weights
        let range = experts ?? 0..<c.experts
        if range != 0..<c.experts {
            w.w1 = try w.w1.slice(range)
            w.w3 = try w.w3?.slice(range)
            w.w2 = try w.w2.slice(range)
            w.b1 = try w.b1?.slice(range)
            w.b2 = try w.b2?.slice(range)
        }
        func prepared(_ t: HostTensor) -> HostTensor {
            let converted = t.converted(to: type)
            guard c.precision == .tf32, case .float32(let v) = converted.storage else { return converted }
            return try! HostTensor(shape: converted.shape, float32: v.map(Self.roundedToTF32))  // same shape: cannot fail
        }
        func upload(_ t: HostTensor) throws -> DeviceBuffer<UInt8> {
            let buffer = try DeviceBuffer<UInt8>(device: device, count: max(t.byteCount, 1))
            try t.withUnsafeBytes { try buffer.upload($0) }
            return buffer
        }

        // Router rows, then the shared expert's gate row.
        var routerTensor = w.router.converted(to: type)
        if let gate = w.shared?.gate, c.sharedExpert?.gated == true {
            let rows = routerTensor.floats() + gate.floats()
            routerTensor = try HostTensor(shape: [c.experts + 1, c.hiddenSize], values: rows, as: type)
        }
        router = try upload(routerTensor)
        selectionBias = try w.selectionBias.map { try upload($0.converted(to: .float32)) }
        b1 = try w.b1.map { try upload($0.converted(to: .float32)) }
        b2 = try w.b2.map { try upload($0.converted(to: .float32)) }
        if c.precision == .fp8 {
            // E4M3 codes and block scales (FusedDeviceWeights+FP8.swift); the shared expert below stays BF16.
            let q = w.prepared(for: .fp8)
            guard let g = q.w1.fp8Blocks, let d = q.w2.fp8Blocks else {
                throw MoEError(.unsupported, "fp8 expert weights must be FP8 blocks")
            }
            w2 = try Self.uploadFP8Second(
                down: d, matrices: range.count, hidden: c.hiddenSize, k: c.intermediateSize, device: device)
            self.w1 = try Self.uploadFP8First(
                gate: g, up: q.w3?.fp8Blocks, matrices: range.count, inner: c.intermediateSize, k: c.hiddenSize,
                packRows: packRows, device: device)
        } else if c.ffn == .gated, let w3raw = w.w3 {
            w2 = try upload(prepared(w.w2))
            self.w1 = try Self.packGated(
                gate: prepared(w.w1), up: prepared(w3raw), matrices: range.count, rows: c.intermediateSize,
                columns: c.hiddenSize, packRows: packRows, device: device)
        } else {
            w2 = try upload(prepared(w.w2))
            self.w1 = try upload(prepared(w.w1))
        }
        if let s = w.shared, let sc = c.sharedExpert {
            let sw1 = prepared(s.w1)
            if c.ffn == .gated, let sw3 = s.w3 {
                sharedW1 = try Self.packGated(
                    gate: sw1, up: prepared(sw3), matrices: 1, rows: sc.intermediateSize,
                    columns: c.hiddenSize, packRows: packRows, device: device)
            } else {
                sharedW1 = try upload(sw1)
            }
            sharedW2 = try upload(prepared(s.w2))
        } else {
            sharedW1 = nil
            sharedW2 = nil
        }
    }

    /// Interleaves gate and up rows in blocks of `packRows`, per matrix, straight into device memory (one copy per
    /// block of rows, no packed host copy: the largest layers have tens of GB of weights).
    static func packGated(
        gate: HostTensor, up: HostTensor, matrices: Int, rows: Int, columns: Int, packRows: Int, device: CUDADevice
    ) throws -> DeviceBuffer<UInt8> {
        let blocks = (rows + packRows - 1) / packRows
        let rowBytes = columns * gate.elementType.byteSize
        let packedRowsPerMatrix = blocks * 2 * packRows
        let buffer = try DeviceBuffer<UInt8>(device: device, count: max(matrices * packedRowsPerMatrix * rowBytes, 1))
        try buffer.fill(byte: 0)  // padding rows of a partial last block stay zero
        try gate.withUnsafeBytes { g in
            try up.withUnsafeBytes { u in
                for m in 0..<matrices {
                    for b in 0..<blocks {
                        let first = b * packRows, count = min(packRows, rows - first)
                        let source = (m * rows + first) * rowBytes
                        let destination = (m * packedRowsPerMatrix + b * 2 * packRows) * rowBytes
                        let bytes = count * rowBytes
                        try buffer.upload(UnsafeRawBufferPointer(rebasing: g[source..<source + bytes]), at: destination)
                        try buffer.upload(
                            UnsafeRawBufferPointer(rebasing: u[source..<source + bytes]),
                            at: destination + packRows * rowBytes)
                    }
                }
            }
        }
        return buffer
    }

    /// Rounds an FP32 value to the nearest TF32 (10-bit mantissa), ties away from zero like `cvt.rna.tf32.f32`;
    /// NaN and ±∞ are returned unchanged, and values that round past the largest finite become ±∞ as IEEE does.
    static func roundedToTF32(_ x: Float) -> Float {
        guard x.isFinite else { return x }
        return Float(bitPattern: (x.bitPattern &+ 0x1000) & ~0x1FFF)
    }

    /// Rounds the FP32 values of `buffer` to TF32 in place (`roundedToTF32`), through host memory in 64 MiB pieces:
    /// for TF32 weights copied from the caller's device memory, once when the layer is created.
    static func roundToTF32(_ buffer: DeviceBuffer<UInt8>) throws {
        let piece = 64 << 20
        var offset = 0
        while offset < buffer.byteCount {
            let n = min(piece, buffer.byteCount - offset) / 4
            guard n > 0 else { break }
            var v: [Float] = try buffer.download(as: Float.self, count: n, from: offset)
            for i in v.indices { v[i] = roundedToTF32(v[i]) }
            try v.withUnsafeBytes { try buffer.upload($0, at: offset) }
            offset += n * 4
        }
    }
}
