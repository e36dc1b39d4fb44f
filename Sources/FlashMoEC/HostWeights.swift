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
        func matrix(_ address: UInt64, _ shape: [Int], as t: ElementType? = nil) throws -> HostTensor {
            try HostCopy.tensor(address, shape: shape, type: t ?? type)
        }
        func firstLayer(_ layer: WeightPointers.FirstLayer, matrices m: Int, rows r: Int, shape: [Int]) throws
            -> (HostTensor, HostTensor?)
        {
            let rowBytes = h * type.byteSize
            func gather(_ up: Bool) throws -> HostTensor {
                try HostCopy.tensor(
                    count: m * r * h, shape: shape, type: type, matrixBytes: r * rowBytes,
                    matrix: { matrix in
                        let rows = layer.rows(of: matrix, gated: gated, rows: r, rowBytes: rowBytes)
                        return up ? rows.up ?? rows.gate : rows.gate  // up is present: `gated` asked for it
                    })
            }
            return (try gather(false), gated ? try gather(true) : nil)
        }
        let w1: HostTensor, w3: HostTensor?, w2: HostTensor
        if p.expertScales != nil {
            // E4M3 codes and their scales, read as the GPU path reads them (WeightPointers.fp8Blocks).
            func fp8(_ m: WeightPointers.ExpertMatrix, _ shape: [Int]) throws -> HostTensor {
                try HostTensor(
                    shape: shape, fp8: p.fp8Blocks(m, experts: 0..<e, config: c, copy: WeightPointers.hostCopy))
            }
            (w1, w3, w2) = (try fp8(.gate, [e, i, h]), gated ? try fp8(.up, [e, i, h]) : nil, try fp8(.down, [e, h, i]))
        } else {
            (w1, w3) = try firstLayer(p.firstLayer, matrices: e, rows: i, shape: [e, i, h])
            w2 = try matrix(p.down, [e, h, i])
        }
        self.init(
            router: try matrix(p.router, [e, h]),
            selectionBias: try p.selectionBias.map { try matrix($0, [e], as: .float32) },
            w1: w1, w3: w3, w2: w2,
            b1: try p.b1.map { try matrix($0, [e, i], as: .float32) },
            b2: try p.b2.map { try matrix($0, [e, h], as: .float32) })
        if let s = c.sharedExpert, let first = p.sharedFirstLayer, let down = p.sharedDown {
            let si = s.intermediateSize
            let (sw1, sw3) = try firstLayer(first, matrices: 1, rows: si, shape: [si, h])
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
            // E4M3 matrices carry block scales: they are read by WeightPointers.fp8Blocks, never here.
            throw MoEError(.unsupported, "FP8 matrices are read with their block scales (WeightPointers.fp8Blocks)")
        }
    }

    /// Bytes of physical memory, or nil where the system does not say.
    static var physicalMemoryBytes: Int? {
        let pages = sysconf(Int32(_SC_PHYS_PAGES)), size = sysconf(Int32(_SC_PAGESIZE))
        return pages > 0 && size > 0 ? pages * size : nil
    }
}
