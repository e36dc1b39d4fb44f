#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import FlashMoE

extension MoEWeights {
    /// Copies the caller's host weights (checked `pointers` into host memory) into `MoEWeights` for `config`:
    /// the fused gate_up [E, 2I, H] is split into w1 (rows 0..<I of each expert) and w3 (rows I..<2I). fp8 layers
    /// given E4M3 expert matrices (`expertScales`) get `FP8Blocks` of the codes and their scales; given BF16 ones,
    /// BF16 tensors that the backend quantizes (`prepared(for:)`).
    init(copyingHost p: WeightPointers, config c: MoEConfig) throws {
        let (e, h, i) = (c.experts, c.hiddenSize, c.intermediateSize)
        let type = c.precision.storage
        let gated = c.ffn == .gated
        let scales = p.expertScales
        let expertType = scales == nil ? type : .float8E4M3
        func matrix(_ address: UInt64, _ shape: [Int], as t: ElementType? = nil) throws -> HostTensor {
            try HostCopy.tensor(address, shape: shape, type: t ?? type)
        }
        // Matrices of `layer` (m matrices of r rows), gate and (gated) up, in `t`.
        func firstLayer(
            _ layer: WeightPointers.FirstLayer, matrices m: Int, rows r: Int, shape: [Int], type t: ElementType
        ) throws -> (HostTensor, HostTensor?) {
            let rowBytes = h * t.byteSize
            func gather(_ up: Bool) throws -> HostTensor {
                try HostCopy.tensor(
                    count: m * r * h, shape: shape, type: t, matrixBytes: r * rowBytes,
                    matrix: { matrix in
                        let rows = layer.rows(of: matrix, gated: gated, rows: r, rowBytes: rowBytes)
                        return up ? rows.up ?? rows.gate : rows.gate  // up is present: `gated` asked for it
                    })
            }
            return (try gather(false), gated ? try gather(true) : nil)
        }
        var (w1, w3) = try firstLayer(p.firstLayer, matrices: e, rows: i, shape: [e, i, h], type: expertType)
        var w2 = try matrix(p.down, [e, h, i], as: expertType)
        if let scales {
            // The codes were gathered with unit scales; each matrix gets its block scales.
            let first = HostCopy.firstLayerScales(scales.firstLayer, experts: e, inner: i, hidden: h, gated: gated)
            w1 = try HostCopy.fp8(codes: w1, scales: try first.gate(), field: first.gateField)
            if let up = w3 { w3 = try HostCopy.fp8(codes: up, scales: try first.up(), field: first.upField) }
            w2 = try HostCopy.fp8(
                codes: w2, scales: try HostCopy.scales(scales.down, matrices: e, rows: h, cols: i), field: "down_scale")
        }
        self.init(
            router: try matrix(p.router, [e, h]),
            selectionBias: try p.selectionBias.map { try matrix($0, [e], as: .float32) },
            w1: w1, w3: w3, w2: w2,
            b1: try p.b1.map { try matrix($0, [e, i], as: .float32) },
            b2: try p.b2.map { try matrix($0, [e, h], as: .float32) })
        if let s = c.sharedExpert, let first = p.sharedFirstLayer, let down = p.sharedDown {
            let si = s.intermediateSize
            let (sw1, sw3) = try firstLayer(first, matrices: 1, rows: si, shape: [si, h], type: type)
            shared = SharedExpertWeights(
                w1: sw1, w3: sw3, w2: try matrix(down, [h, si]), gate: try p.sharedGate.map { try matrix($0, [1, h]) })
        }
    }
}

/// Copies from the caller's host memory into `HostTensor`s, after checking they fit in this machine's memory.
enum HostCopy {
    /// A tensor of `shape` from the contiguous elements at `address`.
    static func tensor(_ address: UInt64, shape: [Int], type: ElementType) throws -> HostTensor {
        let count = shape.reduce(1, *)
        return try tensor(
            count: count, shape: shape, type: type, matrixBytes: count * type.byteSize, matrix: { _ in address })
    }

    /// A tensor of `count` elements gathered from blocks of `matrixBytes` bytes: block `m` starts at `matrix(m)`.
    static func tensor(
        count: Int, shape: [Int], type: ElementType, matrixBytes: Int, matrix: (Int) -> UInt64
    ) throws -> HostTensor {
        let blocks = matrixBytes == 0 ? 0 : count * type.byteSize / matrixBytes
        func gather<T: BitwiseCopyable>(_: T.Type) -> [T] {
            [T](unsafeUninitializedCapacity: count) { buffer, initialized in
                guard count > 0 else { return }
                let destination = UnsafeMutableRawPointer(buffer.baseAddress!)
                for m in 0..<blocks {
                    // The caller guaranteed these are readable host addresses (checked non-NULL and aligned).
                    let source = UnsafeRawPointer(bitPattern: UInt(matrix(m)))!
                    (destination + m * matrixBytes).copyMemory(from: source, byteCount: matrixBytes)
                }
                initialized = count
            }
        }
        switch type {
        case .float32: return try HostTensor(shape: shape, float32: gather(Float.self))
        case .bfloat16: return try HostTensor(shape: shape, bfloat16: gather(BFloat16.self))
        case .float16: return try HostTensor(shape: shape, float16: gather(Float16.self))
        case .float8E4M3:
            // Raw E4M3 codes with unit scales; `fp8(codes:scales:field:)` gives them their block scales.
            return try HostTensor(
                shape: shape,
                fp8: FP8Blocks(
                    shape: shape, codes: gather(FP8E4M3.self),
                    scales: [Float](repeating: 1, count: FP8Blocks.scaleShape(shape).reduce(1, *))))
        }
    }

    /// `codes` (FP8 codes with unit scales, from `tensor`) with the block scales `scales`; a non-finite scale is
    /// refused, naming `field` (as the checkpoint loader refuses one).
    static func fp8(codes: HostTensor, scales: [Float], field: String) throws -> HostTensor {
        guard let blocks = codes.fp8Blocks else {
            throw MoEError(.invalidInput, "weights->\(field): the codes were not read as FP8")
        }
        if let bad = scales.firstIndex(where: { !$0.isFinite }) {
            throw ArgumentError("weights->\(field) holds \(scales[bad]) at block \(bad): FP8 block scales must be finite")
        }
        return try HostTensor(
            shape: codes.shape, fp8: FP8Blocks(shape: codes.shape, codes: blocks.codes, scales: scales))
    }

    /// The float32 block scales [matrices, ⌈rows/128⌉, ⌈cols/128⌉] at host `address`.
    static func scales(_ address: UInt64, matrices: Int, rows: Int, cols: Int) throws -> [Float] {
        try tensor(address, shape: FP8Blocks.scaleShape([matrices, rows, cols]), type: .float32).floats()
    }

    /// Readers of W1's and W3's block scales in the caller's first-layer scales, and the C fields they come
    /// from: fused (gated), each matrix's ⌈2I/128⌉ block rows hold the gate's ⌈I/128⌉, then the up's (I is a
    /// multiple of 128: `WeightPointers(checking:config:)`).
    static func firstLayerScales(
        _ layer: WeightPointers.FirstLayer, experts e: Int, inner i: Int, hidden h: Int, gated: Bool
    ) -> (gate: () throws -> [Float], up: () throws -> [Float], gateField: String, upField: String) {
        let (br, bc) = ((i + 127) / 128, (h + 127) / 128)
        switch layer {
        case .fused(let base):
            let perMatrix = (gated ? 2 : 1) * br * bc * 4
            func part(_ up: Bool) throws -> [Float] {
                try tensor(
                    count: e * br * bc, shape: [e, br, bc], type: .float32, matrixBytes: br * bc * 4,
                    matrix: { m in base + UInt64(m * perMatrix + (up ? br * bc * 4 : 0)) }
                ).floats()
            }
            return ({ try part(false) }, { try part(true) }, "gate_up_scale", "gate_up_scale")
        case .separate(let gate, let up):
            return (
                { try scales(gate, matrices: e, rows: i, cols: h) },
                { try scales(up ?? gate, matrices: e, rows: i, cols: h) }, "gate_scale", "up_scale"
            )
        }
    }

    /// Bytes of physical memory, or nil where the system does not say.
    static var physicalMemoryBytes: Int? {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        return pages > 0 && size > 0 ? pages * size : nil
    }
}
