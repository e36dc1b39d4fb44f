import CCUDA

/// The addresses of a layer's weights as the C ABI (include/flashmoe.h) passes them: matrices in the precision's
/// storage type, biases and the selection bias in float32, row-major [out, in]. Device addresses for GPU layers,
/// host addresses for CPU layers; the caller checked presence, shapes and alignment against the config.
package struct WeightPointers: Sendable {
    /// Where an FFN's first-layer matrices are (M matrices of R rows of C columns each).
    package enum FirstLayer: Sendable {
        /// One tensor: gated, [M, 2R, C] with each matrix's R gate rows first and its R up rows next (transformers'
        /// fused `gate_up_proj`); plain, W1 [M, R, C].
        case fused(UInt64)
        /// W1 (gate) [M, R, C] and, gated only, W3 (up) [M, R, C].
        case separate(gate: UInt64, up: UInt64?)

        /// The address of matrix `m`'s first gate (or plain W1) row and first up row (nil when plain). Within
        /// one matrix the R gate rows are contiguous, and so are the R up rows, in every layout.
        package func rows(of m: Int, gated: Bool, rows r: Int, rowBytes: Int) -> (gate: UInt64, up: UInt64?) {
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
    package var router: UInt64
    /// [E] float32, with the sigmoid router's selection bias.
    package var selectionBias: UInt64?
    /// Experts' first layer: M = E, R = I, C = H.
    package var firstLayer: FirstLayer
    /// W2 [E, H, I].
    package var down: UInt64
    /// [E, I] and [E, H] float32 (plain FFN with bias).
    package var b1: UInt64?
    package var b2: UInt64?
    /// The shared expert's first layer (M = 1, R = IS, C = H), W2 [H, IS] and sigmoid gate row [H].
    package var sharedFirstLayer: FirstLayer?
    package var sharedDown: UInt64?
    package var sharedGate: UInt64?

    package init(
        router: UInt64, selectionBias: UInt64?, firstLayer: FirstLayer, down: UInt64, b1: UInt64?, b2: UInt64?,
        sharedFirstLayer: FirstLayer?, sharedDown: UInt64?, sharedGate: UInt64?
    ) {
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

extension FusedDeviceWeights {
    /// Builds the kernel's weights from the caller's device memory (`pointers`, on `device`), leaving the result
    /// identical, byte for byte, to `init(layer:device:packRows:)` on the same values.
    ///
    /// Everything is copied into buffers the operator owns, so the caller may free its weights as soon as this
    /// returns (include/flashmoe.h promises that); nothing of the caller's memory is used in place.
    ///
    /// - Router (+ the shared expert's gate row), selection bias, biases, W2 and the plain W1: one
    ///   `cuMemcpyDtoD` per tensor (at device bandwidth: ~1 ms per 2 GB on an H200).
    /// - Gated first layers: packed into the kernel's interleaved blocks with two `cuMemcpyDtoD` per block of
    ///   `packRows` rows per expert (E·⌈I/packRows⌉·2 copies, a few µs each: ~30 ms for Qwen3-30B-A3B's
    ///   128 experts), from either layout.
    /// - TF32 layers: each expert matrix is rounded to TF32 on the host, so it goes through a host staging buffer
    ///   one expert at a time (device → host, round, host → device: PCIe speed, ~0.1 s per GB, and one expert's
    ///   matrix of host memory at a time). The router stays FP32.
    /// - Device memory: exactly the packed copy (`byteCount`, the gated first layer padded to a multiple of
    ///   `packRows` rows), as for host weights; no temporary device memory.
    /// - The device is synchronized before the copies (so writes the caller queued on any stream of the context
    ///   have landed) and after them (so the copies are done when this returns).
    init(config c: MoEConfig, pointers p: WeightPointers, device: CUDADevice, packRows: Int) throws {
        let element = c.precision.storage.byteSize
        let tf32 = c.precision == .tf32
        let (e, h, i) = (c.experts, c.hiddenSize, c.intermediateSize)
        let copier = DeviceCopier(device: device)
        try device.synchronize()

        let gateRow = c.sharedExpert?.gated == true ? p.sharedGate : nil
        router = try copier.buffer(bytes: (e + (gateRow == nil ? 0 : 1)) * h * element)
        try copier.copy(to: router, at: 0, from: p.router, bytes: e * h * element, roundTF32: false)
        if let gateRow {
            try copier.copy(to: router, at: e * h * element, from: gateRow, bytes: h * element, roundTF32: false)
        }
        selectionBias = try p.selectionBias.map { try copier.whole(from: $0, bytes: e * 4, roundTF32: false) }
        b1 = try p.b1.map { try copier.whole(from: $0, bytes: e * i * 4, roundTF32: false) }
        b2 = try p.b2.map { try copier.whole(from: $0, bytes: e * h * 4, roundTF32: false) }
        w2 = try copier.matrices(from: p.down, count: e, matrixBytes: h * i * element, roundTF32: tf32)
        w1 = try copier.firstLayer(
            p.firstLayer, gated: c.ffn == .gated, matrices: e, rows: i, rowBytes: h * element, packRows: packRows,
            roundTF32: tf32)
        if let s = c.sharedExpert, let first = p.sharedFirstLayer, let down = p.sharedDown {
            sharedW1 = try copier.firstLayer(
                first, gated: c.ffn == .gated, matrices: 1, rows: s.intermediateSize, rowBytes: h * element,
                packRows: packRows, roundTF32: tf32)
            sharedW2 = try copier.matrices(
                from: down, count: 1, matrixBytes: h * s.intermediateSize * element, roundTF32: tf32)
        } else {
            sharedW1 = nil
            sharedW2 = nil
        }
        try device.synchronize()
    }
}

/// Device-to-device copies into new buffers, with the TF32 rounding staged through the host.
private struct DeviceCopier {
    let device: CUDADevice

    func buffer(bytes: Int) throws -> DeviceBuffer<UInt8> {
        try DeviceBuffer<UInt8>(device: device, count: max(bytes, 1))
    }

    /// A new buffer holding `bytes` bytes copied from `source`.
    func whole(from source: UInt64, bytes: Int, roundTF32: Bool) throws -> DeviceBuffer<UInt8> {
        let b = try buffer(bytes: bytes)
        try copy(to: b, at: 0, from: source, bytes: bytes, roundTF32: roundTF32)
        return b
    }

    /// `count` matrices of `matrixBytes` each: one copy, or with TF32 rounding one staged copy per matrix.
    func matrices(from source: UInt64, count: Int, matrixBytes: Int, roundTF32: Bool) throws -> DeviceBuffer<UInt8> {
        guard roundTF32 else { return try whole(from: source, bytes: count * matrixBytes, roundTF32: false) }
        let b = try buffer(bytes: count * matrixBytes)
        for m in 0..<count {
            try copy(to: b, at: m * matrixBytes, from: source + UInt64(m * matrixBytes), bytes: matrixBytes,
                     roundTF32: true)
        }
        return b
    }

    /// A first layer as the kernel reads it: plain W1 as is; gated, gate and up rows interleaved in blocks of
    /// `packRows` (see `FusedDeviceWeights.packGated`), the padding rows of a partial last block zero.
    func firstLayer(
        _ layer: WeightPointers.FirstLayer, gated: Bool, matrices: Int, rows: Int, rowBytes: Int, packRows: Int,
        roundTF32: Bool
    ) throws -> DeviceBuffer<UInt8> {
        let matrixBytes = rows * rowBytes
        guard gated else {
            let (start, _) = layer.rows(of: 0, gated: false, rows: rows, rowBytes: rowBytes)
            return try self.matrices(from: start, count: matrices, matrixBytes: matrixBytes, roundTF32: roundTF32)
        }
        let blocks = (rows + packRows - 1) / packRows
        let packedMatrixBytes = blocks * 2 * packRows * rowBytes
        let b = try buffer(bytes: matrices * packedMatrixBytes)
        try b.fill(byte: 0)
        for m in 0..<matrices {
            let (gate, upRows) = layer.rows(of: m, gated: true, rows: rows, rowBytes: rowBytes)
            guard let upRows else { throw CUDAError.invalidArgument("a gated first layer needs its up rows") }
            // TF32: this expert's gate and up rows rounded once on the host, then copied block by block.
            let g = try Source(device: device, address: gate, bytes: matrixBytes, roundTF32: roundTF32)
            let u = try Source(device: device, address: upRows, bytes: matrixBytes, roundTF32: roundTF32)
            for block in 0..<blocks {
                let first = block * packRows, count = min(packRows, rows - first)
                let destination = m * packedMatrixBytes + block * 2 * packRows * rowBytes
                try g.copy(bytes: count * rowBytes, from: first * rowBytes, to: b, at: destination)
                try u.copy(bytes: count * rowBytes, from: first * rowBytes, to: b, at: destination + packRows * rowBytes)
            }
        }
        return b
    }

    /// Copies `bytes` from device address `source` into `buffer` at byte `offset`, rounding float32 values to
    /// TF32 on the way when `roundTF32`.
    func copy(to buffer: DeviceBuffer<UInt8>, at offset: Int, from source: UInt64, bytes: Int, roundTF32: Bool)
        throws
    {
        let s = try Source(device: device, address: source, bytes: bytes, roundTF32: roundTF32)
        try s.copy(bytes: bytes, from: 0, to: buffer, at: offset)
    }

    /// Rows to copy from: the caller's device memory, or a rounded host copy of it.
    private enum Storage {
        case device(UInt64)
        case host([Float])
    }

    private struct Source {
        let device: CUDADevice
        let storage: Storage

        init(device: CUDADevice, address: UInt64, bytes: Int, roundTF32: Bool) throws {
            self.device = device
            guard roundTF32 else {
                storage = .device(address)
                return
            }
            let count = bytes / 4
            var failure: CUDAError?
            let staged = [Float](unsafeUninitializedCapacity: count) { values, initialized in
                do throws(CUDAError) {
                    try device.makeCurrent()
                    if count > 0, let base = values.baseAddress {
                        try device.driver.check(
                            device.driver.memcpyDtoH(base, address, count * 4, nil), "cuMemcpyDtoH_v2 (weights)")
                    }
                    initialized = count
                } catch {
                    failure = error
                    initialized = 0
                }
            }
            if let failure { throw failure }
            storage = .host(staged.map(FusedDeviceWeights.roundedToTF32))
        }

        /// Copies `bytes` from byte `offset` of the source to byte `destination` of `buffer`.
        func copy(bytes: Int, from offset: Int, to buffer: DeviceBuffer<UInt8>, at destination: Int) throws {
            guard bytes > 0 else { return }
            switch storage {
            case .host(let values):
                try values.withUnsafeBytes { raw in
                    try buffer.upload(UnsafeRawBufferPointer(rebasing: raw[offset..<offset + bytes]), at: destination)
                }
            case .device(let address):
                guard destination >= 0, bytes <= buffer.byteCount - destination else {
                    throw CUDAError.invalidArgument(
                        "copy of \(bytes) bytes at \(destination) overruns a \(buffer.byteCount)-byte weight buffer")
                }
                try device.makeCurrent()
                try device.driver.check(
                    device.driver.memcpyDtoD(buffer.address + UInt64(destination), address + UInt64(offset), bytes, nil),
                    "cuMemcpyDtoD_v2 (weights)")
            }
        }
    }
}
