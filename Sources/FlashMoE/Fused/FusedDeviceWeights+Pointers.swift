import CCUDA

/// The addresses of a layer's weights as the C ABI (include/flashmoe.h) passes them: matrices in the precision's
/// storage type, biases and the selection bias in float32, row-major [out, in]. Device addresses for GPU layers,
/// host addresses for CPU layers; the caller checked presence, shapes and alignment against the config.
/// fp8 layers: the routed experts' matrices are BF16 (quantized when the layer is built) unless `expertScales` is
/// set, in which case they are E4M3 codes with those block scales.
public struct WeightPointers: Sendable {
    /// The float32 block scales of FP8 expert matrices, one per 128×128 block of each matrix (DeepSeek-V3's
    /// `weight_scale_inv`: value = code × scale): [E, ⌈rows/128⌉, ⌈cols/128⌉].
    public struct ExpertScales: Sendable {
        /// The first layer's scales, in the first layer's layout: fused, one tensor over each matrix's gate and
        /// up rows (2I rows gated, so I must be a multiple of 128); separate, W1's and (gated) W3's.
        public var firstLayer: FirstLayer
        /// W2's scales, [E, ⌈H/128⌉, ⌈I/128⌉].
        public var down: UInt64

        /// Scales as described on each property.
        public init(firstLayer: FirstLayer, down: UInt64) {
            self.firstLayer = firstLayer
            self.down = down
        }
    }

    /// Where an FFN's first-layer matrices are (M matrices of R rows of C columns each).
    public enum FirstLayer: Sendable {
        /// One tensor: gated, [M, 2R, C] with each matrix's R gate rows first and its R up rows next (transformers'
        /// fused `gate_up_proj`); plain, W1 [M, R, C].
        case fused(UInt64)
        /// W1 (gate) [M, R, C] and, gated only, W3 (up) [M, R, C].
        case separate(gate: UInt64, up: UInt64?)

        /// Whether gate and up rows come in one tensor (`gate_up`).
        public var isFused: Bool {
            if case .fused = self { return true }
            return false
        }

        /// The address of matrix `m`'s first gate (or plain W1) row and first up row (nil when plain). Within
        /// one matrix the R gate rows are contiguous, and so are the R up rows, in every layout.
        public func rows(of m: Int, gated: Bool, rows r: Int, rowBytes: Int) -> (gate: UInt64, up: UInt64?) {
            switch self {
            case .fused(let base):
                guard gated else { return (base + UInt64(m * r * rowBytes), nil) }
                let first = base + UInt64(m * 2 * r * rowBytes)
                return (first, first + UInt64(r * rowBytes))
            case .separate(let gate, let up):
                let offset = UInt64(m * r * rowBytes)
                return (gate + offset, gated ? up.map { $0 + offset } : nil)
            }
        }
    }

    /// [E, H].
    public var router: UInt64
    /// [E] float32, with the sigmoid router's selection bias.
    public var selectionBias: UInt64?
    /// Experts' first layer: M = E, R = I, C = H.
    public var firstLayer: FirstLayer
    /// W2 [E, H, I].
    public var down: UInt64
    /// [E, I] float32 (plain FFN with bias).
    public var b1: UInt64?
    /// [E, H] float32 (plain FFN with bias).
    public var b2: UInt64?
    /// The shared expert's first layer (M = 1, R = IS, C = H).
    public var sharedFirstLayer: FirstLayer?
    /// The shared expert's W2 [H, IS].
    public var sharedDown: UInt64?
    /// The shared expert's sigmoid gate row [H] (a gated shared expert).
    public var sharedGate: UInt64?
    /// fp8 layers given E4M3 expert matrices: their block scales; nil when the matrices are in the storage type.
    public var expertScales: ExpertScales?

    /// Addresses as described on each property; nil where the layer has no such tensor.
    public init(
        router: UInt64, selectionBias: UInt64?, firstLayer: FirstLayer, down: UInt64, b1: UInt64?, b2: UInt64?,
        sharedFirstLayer: FirstLayer?, sharedDown: UInt64?, sharedGate: UInt64?, expertScales: ExpertScales? = nil
    ) {
        self.expertScales = expertScales
        self.router = router
        self.selectionBias = selectionBias
        self.firstLayer = firstLayer
        self.down = down
        self.b1 = b1
        self.b2 = b2
        self.sharedFirstLayer = sharedFirstLayer
        self.sharedDown = sharedDown
        self.sharedGate = sharedGate
    }
}

extension FusedOperator {
    /// Builds the operator from the caller's device weights (`pointers`, device addresses on
    /// `options.deviceOrdinal`, in one of the layouts `WeightPointers` describes), copied into memory the operator
    /// owns: the caller may free its weights once this returns. See `FusedDeviceWeights.init(config:pointers:…)`
    /// for what the copies cost.
    ///
    /// - Parameter maxTokens: the most tokens one forward may pass (the workspace is allocated for it now).
    public convenience init(config: MoEConfig, pointers: WeightPointers, options: FusedOptions, maxTokens: Int)
        throws
    {
        try self.init(config: config, options: options, maxTokens: maxTokens) { kernel in
            try FusedDeviceWeights(config: config, pointers: pointers, device: kernel.device, packRows: kernel.packRows)
        }
    }
}

extension FusedDeviceWeights {
    /// Builds the kernel's weights from the caller's device memory (`pointers`, on `device`), leaving the result
    /// identical, byte for byte, to `init(layer:device:packRows:)` on the same values.
    ///
    /// Everything is copied into buffers the operator owns, so the caller may free its weights as soon as this
    /// returns (include/flashmoe.h promises that); nothing of the caller's memory is used in place. All copies are
    /// device to device (TF32 layers then round the expert matrices once, through host memory in 64 MiB pieces):
    /// - router (+ the shared expert's gate row), selection bias, biases, W2 and a plain W1: one `cuMemcpyDtoD`
    ///   per tensor, at device bandwidth (about 1 ms per 2 GB on an H200);
    /// - gated first layers, from either layout: packed into the kernel's interleaved blocks with two
    ///   `cuMemcpyDtoD` per block of `packRows` rows per expert (E·⌈I/packRows⌉·2 copies of a few µs each: tens
    ///   of ms for Qwen3-30B-A3B's 128 experts), after one `cuMemsetD8` of the padding.
    /// - Device memory: exactly the packed copy (`byteCount`: the gated first layer padded to a multiple of
    ///   `packRows` rows), as for host weights; nothing temporary, no host memory.
    /// - fp8: the routed experts are assembled into their images by device-to-device copies, quantized first when
    ///   given in BF16 (a chunk at a time, through a staging buffer of at most 256 MiB: `fp8Experts`,
    ///   FusedDeviceWeights+FP8Pointers.swift); the router and the shared expert are copied as above, in BF16.
    /// - The device is synchronized before the copies (so writes the caller queued on any stream of the context
    ///   have landed) and after them (so the copies are done when this returns).
    /// - `experts`: the routed experts to copy (a rank's share; all by default); `pointersStart`: the expert the
    ///   per-expert tensors of `p` start at (0 when they hold every expert, `experts.lowerBound` when they hold
    ///   only the share). The router and the shared expert are always copied whole.
    /// - `fp8Quantizer`: what quantizes BF16 experts of an fp8 layer (nil: an `FP8DeviceQuantizer` on `device`).
    init(
        config c: MoEConfig, pointers p: WeightPointers, device: CUDADevice, packRows: Int,
        experts: Range<Int>? = nil, pointersStart: Int = 0, fp8Quantizer: (any FP8MatrixQuantizing)? = nil
    ) throws {
        if p.expertScales != nil && c.precision != .fp8 {
            throw MoEError(.invalidInput, "FP8 block scales are for fp8 layers; this one is \(c.precision)")
        }
        let element = c.precision.storage.byteSize
        let (h, i) = (c.hiddenSize, c.intermediateSize)
        let range = experts ?? 0..<c.experts
        let (e, first) = (range.count, range.lowerBound - pointersStart)
        let gated = c.ffn == .gated
        let copier = DeviceCopier(device: device)
        try device.synchronize()

        let gateRow = c.sharedExpert?.gated == true ? p.sharedGate : nil
        let routerRows = c.experts
        let router = try copier.buffer(bytes: (routerRows + (gateRow == nil ? 0 : 1)) * h * element)
        try copier.copy(to: router, at: 0, from: p.router, bytes: routerRows * h * element, field: "router")
        if let gateRow {
            try copier.copy(
                to: router, at: routerRows * h * element, from: gateRow, bytes: h * element, field: "shared_gate")
        }
        var sharedW1: DeviceBuffer<UInt8>?, sharedW2: DeviceBuffer<UInt8>?
        if let s = c.sharedExpert, let first = p.sharedFirstLayer, let down = p.sharedDown {
            sharedW1 = try copier.firstLayer(
                first, gated: gated, matrices: 1, rows: s.intermediateSize, rowBytes: h * element, packRows: packRows,
                names: .shared)
            sharedW2 = try copier.whole(from: down, bytes: h * s.intermediateSize * element, field: "shared_down")
        }
        let w1: DeviceBuffer<UInt8>, w2: DeviceBuffer<UInt8>
        if c.precision == .fp8 {
            // Quantized first when given in BF16 (FusedDeviceWeights+FP8Pointers.swift).
            (w1, w2) = try Self.fp8Experts(
                config: c, pointers: p, device: device, packRows: packRows, first: first, count: e,
                quantizer: fp8Quantizer)
        } else {
            w1 = try copier.firstLayer(
                p.firstLayer, gated: gated, matrices: e, rows: i, rowBytes: h * element, packRows: packRows,
                names: .experts, firstMatrix: first)
            w2 = try copier.whole(from: p.down + UInt64(first * h * i * element), bytes: e * h * i * element, field: "down")
        }
        self.init(
            router: router,
            selectionBias: try p.selectionBias.map {
                try copier.whole(from: $0, bytes: c.experts * 4, field: "selection_bias")
            },
            w1: w1,
            w2: w2,
            b1: try p.b1.map { try copier.whole(from: $0 + UInt64(first * i * 4), bytes: e * i * 4, field: "b1") },
            b2: try p.b2.map { try copier.whole(from: $0 + UInt64(first * h * 4), bytes: e * h * 4, field: "b2") },
            sharedW1: sharedW1,
            sharedW2: sharedW2)
        try device.synchronize()
        // TF32: the expert matrices rounded to TF32 once, as the host path does (gemm_tile.cuh states the rule).
        if c.precision == .tf32 {
            for buffer in [self.w1, self.w2, self.sharedW1, self.sharedW2].compactMap({ $0 }) {
                try Self.roundToTF32(buffer)
            }
        }
        // The non-finite rules of docs/nonfinite.md: a NaN or infinite selection bias is refused, as on the CPU.
        if let bias = self.selectionBias {
            _ = try Router.checkedBias(try bias.download(as: Float.self, count: e), config: c)
        }
    }
}

/// Device-to-device copies from the caller's memory into new buffers (also the fp8 experts' codes:
/// FusedDeviceWeights+FP8Pointers.swift).
struct DeviceCopier {
    let device: CUDADevice

    /// The C ABI's fields of a first layer: the fused tensor, and the separate gate and up tensors.
    struct FieldNames {
        let fused: String, gate: String, up: String
        static let experts = FieldNames(fused: "gate_up", gate: "gate", up: "up")
        static let shared = FieldNames(fused: "shared_gate_up", gate: "shared_gate_up", up: "shared_up")
    }

    func buffer(bytes: Int) throws -> DeviceBuffer<UInt8> {
        try DeviceBuffer<UInt8>(device: device, count: max(bytes, 1))
    }

    /// A new buffer holding `bytes` bytes copied from `source` (the weight `field`).
    func whole(from source: UInt64, bytes: Int, field: String) throws -> DeviceBuffer<UInt8> {
        let b = try buffer(bytes: bytes)
        try copy(to: b, at: 0, from: source, bytes: bytes, field: field)
        return b
    }

    /// A first layer as the kernel reads it, in a new buffer (`copyFirstLayer`, matrices back to back).
    func firstLayer(
        _ layer: WeightPointers.FirstLayer, gated: Bool, matrices: Int, rows: Int, rowBytes: Int, packRows: Int,
        names: FieldNames, firstMatrix: Int = 0
    ) throws -> DeviceBuffer<UInt8> {
        let matrixBytes = (gated ? (rows + packRows - 1) / packRows * 2 * packRows : rows) * rowBytes
        let b = try buffer(bytes: matrices * matrixBytes)
        if gated { try b.fill(byte: 0) }  // the padding rows of a partial last block
        try copyFirstLayer(
            layer, into: b, matrixBytes: matrixBytes, gated: gated, matrices: matrices, rows: rows, rowBytes: rowBytes,
            packRows: packRows, names: names, firstMatrix: firstMatrix)
        return b
    }

    /// Copies `matrices` matrices of a first layer, from matrix `firstMatrix` of `layer`, into `b` as the kernel
    /// reads them, matrix m from byte m · `matrixBytes` on: plain W1 as is; gated, gate and up rows interleaved in
    /// blocks of `packRows` (see `FusedDeviceWeights.packGated`). The padding rows of a partial last block are left
    /// as `b` holds them. `names` gives the C fields, for error messages.
    func copyFirstLayer(
        _ layer: WeightPointers.FirstLayer, into b: DeviceBuffer<UInt8>, matrixBytes: Int, gated: Bool, matrices: Int,
        rows: Int, rowBytes: Int, packRows: Int, names: FieldNames, firstMatrix: Int = 0
    ) throws {
        let (gateName, upName) = layer.isFused ? (names.fused, names.fused) : (names.gate, names.up)
        if !gated && matrixBytes == rows * rowBytes {  // contiguous on both sides: one copy
            let (start, _) = layer.rows(of: firstMatrix, gated: false, rows: rows, rowBytes: rowBytes)
            return try copy(to: b, at: 0, from: start, bytes: matrices * matrixBytes, field: gateName)
        }
        for m in 0..<matrices {
            let (gate, upRows) = layer.rows(of: firstMatrix + m, gated: gated, rows: rows, rowBytes: rowBytes)
            guard gated else {
                try copy(to: b, at: m * matrixBytes, from: gate, bytes: rows * rowBytes, field: gateName)
                continue
            }
            guard let up = upRows else { throw CUDAError.invalidArgument("a gated first layer needs its up rows") }
            for block in 0..<(rows + packRows - 1) / packRows {
                let first = block * packRows, bytes = min(packRows, rows - first) * rowBytes
                let destination = m * matrixBytes + block * 2 * packRows * rowBytes
                let offset = UInt64(first * rowBytes)
                try copy(to: b, at: destination, from: gate + offset, bytes: bytes, field: gateName)
                try copy(to: b, at: destination + packRows * rowBytes, from: up + offset, bytes: bytes, field: upName)
            }
        }
    }

    /// Copies `bytes` from device address `source` (the weight `field`) into `buffer` at byte `offset`
    /// (`cuMemcpyDtoD`). A failed copy names the field: the usual cause is a pointer that is not device memory of
    /// this GPU.
    func copy(to buffer: DeviceBuffer<UInt8>, at offset: Int, from source: UInt64, bytes: Int, field: String) throws {
        guard bytes > 0 else { return }
        guard offset >= 0, bytes <= buffer.byteCount - offset else {
            throw CUDAError.invalidArgument(
                "copy of \(bytes) bytes at \(offset) overruns a \(buffer.byteCount)-byte weight buffer")
        }
        try device.makeCurrent()
        let result = device.driver.memcpyDtoD(buffer.address + UInt64(offset), source, bytes, nil)
        guard result == CUDA_SUCCESS else {
            throw Self.unreadable(field, at: source, device: device, result: result, call: "cuMemcpyDtoD_v2")
        }
    }

    /// The error for a caller's pointer `address` (the weight `field`) that `call` could not read as device memory.
    static func unreadable(_ field: String, at address: UInt64, device: CUDADevice, result: CUresult, call: String)
        -> CUDAError
    {
        .invalidArgument(
            "weights->\(field) (0x\(String(address, radix: 16))) could not be read as device memory of GPU "
                + "\(device.properties.ordinal) (\(device.driver.error(for: result, call: call))): pass a device pointer "
                + "of that GPU holding the whole tensor")
    }
}
