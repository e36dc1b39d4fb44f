import CCUDA
import Testing

@testable import FlashMoE

/// fp8 layers from the caller's device memory (the C ABI's FLASHMOE_PRECISION_FP8) against the same layer from host
/// weights, on the fake driver: the routed experts given as BF16 matrices (staged and quantized while building) and
/// as E4M3 codes with their block scales, in both layouts, must give the same bytes in every buffer; so must a rank's
/// share of the experts and a build that quantizes one expert at a time. The fake driver runs no kernel, so BF16
/// experts are quantized by `FakeMemoryQuantizer` (the host's quantization on the fake device memory, with the GPU
/// kernel's arguments; the default on a GPU too); `flashmoe verify` checks the GPU kernel against the host byte
/// for byte
/// (`Verifier.fp8QuantizerChecks`).
@Suite struct DevicePointerFP8Tests {
    /// gated, a gated shared expert; I = 128 so the fused codes are allowed, H = 160 a partial column block.
    static let config = MoEConfig(
        hiddenSize: 160, intermediateSize: 128, experts: 3, topK: 2, ffn: .gated, activation: .silu,
        sharedExpert: SharedExpertConfig(intermediateSize: 64, gated: true), precision: .fp8)
    /// The kernel's fp8 packing (`FusedDeviceWeights.fp8Granule`).
    static let packRows = 64

    /// The BF16 weights of `config` (the fp8 layer's values before quantization), with magnitudes that differ by
    /// matrix, expert and 128-row block (powers of two), so that every block scale differs from the others: a scale
    /// taken from the wrong place changes the bytes.
    static func bf16Weights(_ c: MoEConfig, seed: UInt64) throws -> MoEWeights {
        var b = c
        b.precision = .bf16
        var w = try MoEWeights.random(config: b, seed: seed)
        func scaled(_ t: HostTensor, _ factor: Float) throws -> HostTensor {
            let (r, cols) = (t.shape[1], t.shape[2])
            var v = t.floats()
            for i in v.indices {
                let (matrix, row) = (i / (r * cols), i / cols % r)
                v[i] *= factor * Float(1 << matrix) * (row >= 128 ? 4 : 1)
            }
            return try HostTensor(shape: t.shape, values: v, as: .bfloat16)
        }
        w.w1 = try scaled(w.w1, 1)
        w.w3 = try scaled(w.w3!, 8)
        w.w2 = try scaled(w.w2, 0.25)
        return w
    }

    /// Pointers to `w` (BF16) as the C ABI passes them, the experts as BF16 or, with `codes`, as the E4M3 codes and
    /// scales of `q` (its prepared fp8 weights).
    private func pointers(_ w: MoEWeights, _ q: MoEWeights, codes: Bool, fused: Bool, memory: inout CallerMemory) throws
        -> WeightPointers
    {
        let e = w.router.shape[0]
        let s = w.shared!
        let sharedFirst: WeightPointers.FirstLayer =
            fused ? .fused(try memory.put(CallerMemory.fused(s.w1, s.w3!, matrices: 1)))
            : .separate(gate: try memory.put(s.w1), up: try memory.put(s.w3!))
        var p = WeightPointers(
            router: try memory.put(w.router), selectionBias: nil, firstLayer: .fused(0), down: 0, b1: nil, b2: nil,
            sharedFirstLayer: sharedFirst, sharedDown: try memory.put(s.w2), sharedGate: try memory.put(s.gate!))
        if !codes {
            p.firstLayer =
                fused ? .fused(try memory.put(CallerMemory.fused(w.w1, w.w3!, matrices: e)))
                : .separate(gate: try memory.put(w.w1), up: try memory.put(w.w3!))
            p.down = try memory.put(w.w2)
            return p
        }
        let (g, u, d) = (q.w1.fp8Blocks!, q.w3!.fp8Blocks!, q.w2.fp8Blocks!)
        p.down = try memory.put(codes: d.codes)
        if fused {
            p.firstLayer = .fused(try memory.put(codes: CallerMemory.interleave(g.codes, u.codes, matrices: e)))
            p.expertScales = .init(
                firstLayer: .fused(try memory.put(CallerMemory.interleave(g.scales, u.scales, matrices: e))),
                down: try memory.put(d.scales))
        } else {
            p.firstLayer = .separate(gate: try memory.put(codes: g.codes), up: try memory.put(codes: u.codes))
            p.expertScales = .init(
                firstLayer: .separate(gate: try memory.put(g.scales), up: try memory.put(u.scales)),
                down: try memory.put(d.scales))
        }
        return p
    }

    /// The first byte where `a` and `b` differ (-1 for different lengths, or one nil), or nil when they are equal:
    /// a short failure message instead of two dumps of megabytes.
    static func firstDifference(_ a: [UInt8]?, _ b: [UInt8]?) -> Int? {
        guard let a, let b else { return a == nil && b == nil ? nil : -1 }
        guard a.count == b.count else { return -1 }
        return a.indices.first { a[$0] != b[$0] }
    }

    private func contents(_ w: FusedDeviceWeights) throws -> [[UInt8]?] {
        try [w.router, w.selectionBias, w.w1, w.w2, w.b1, w.b2, w.sharedW1, w.sharedW2].map { try $0?.download() }
    }

    @Test(arguments: [false, true], [true, false])
    func sameBytesAsFromHostWeights(codes: Bool, fused: Bool) throws {
        let c = Self.config
        let w = try Self.bf16Weights(c, seed: 11)
        let layer = try MoELayer(config: c, weights: w)
        let device = try CUDADevice(ordinal: 0, driver: FakeDriver())
        var memory = CallerMemory(device: device)
        let p = try pointers(w, w.prepared(for: .fp8), codes: codes, fused: fused, memory: &memory)
        let what = "\(codes ? "E4M3 codes" : "BF16 experts"), \(fused ? "fused" : "separate")"
        let fromHost = try FusedDeviceWeights(layer: layer, device: device, packRows: Self.packRows)
        let quantizer = FakeMemoryQuantizer(device: device)
        let fromDevice = try FusedDeviceWeights(
            config: c, pointers: p, device: device, packRows: Self.packRows, fp8Quantizer: quantizer)
        #expect(quantizer.calls.count == (codes ? 0 : 3), "\(what): one launch per matrix kind")
        let (a, b) = (try contents(fromHost), try contents(fromDevice))
        for (field, (x, y)) in zip(["router", "selectionBias", "w1", "w2", "b1", "b2", "sharedW1", "sharedW2"], zip(a, b)) {
            #expect(Self.firstDifference(x, y) == nil, "\(what): \(field) differs")
        }
        // A rank's share, read one expert at a time.
        let share = 1..<3
        let hostShare = try FusedDeviceWeights(layer: layer, experts: share, device: device, packRows: Self.packRows)
        let oneAtATime = FakeMemoryQuantizer(device: device)
        let (w1, w2) = try FusedDeviceWeights.fp8Experts(
            config: c, pointers: p, device: device, packRows: Self.packRows, first: share.lowerBound,
            count: share.count, chunkBytes: 1, quantizer: oneAtATime)
        #expect(oneAtATime.calls.allSatisfy { $0.matrices == 1 } && oneAtATime.calls.count == (codes ? 0 : 6))
        // Two experts a chunk over all 3: a full chunk, then a partial one (its staging offsets sized by 1 expert,
        // its code offsets by the chunk's 2).
        let perExpert = 3 * c.hiddenSize * c.intermediateSize * 2
        let twoAtATime = FakeMemoryQuantizer(device: device)
        let (t1, t2) = try FusedDeviceWeights.fp8Experts(
            config: c, pointers: p, device: device, packRows: Self.packRows, first: 0, count: c.experts,
            chunkBytes: 2 * perExpert, quantizer: twoAtATime)
        #expect(twoAtATime.calls.map(\.matrices) == (codes ? [] : [2, 2, 2, 1, 1, 1]))
        #expect(Self.firstDifference(try t1.download(), try fromHost.w1.download()) == nil, "\(what): w1, 2 a chunk")
        #expect(Self.firstDifference(try t2.download(), try fromHost.w2.download()) == nil, "\(what): w2, 2 a chunk")
        #expect(Self.firstDifference(try w1.download(), try hostShare.w1.download()) == nil, "\(what): the share's w1")
        #expect(Self.firstDifference(try w2.download(), try hostShare.w2.download()) == nil, "\(what): the share's w2")
    }

    /// I = 96: the last packed gate/up block is partial (32 rows of 64), its padding rows and their scales zero.
    /// Separate tensors only (fused E4M3 codes need I % 128 == 0).
    @Test(arguments: [false, true])
    func partialPackedBlock(codes: Bool) throws {
        var c = Self.config
        c.intermediateSize = 96
        let w = try Self.bf16Weights(c, seed: 13)
        let layer = try MoELayer(config: c, weights: w)
        let device = try CUDADevice(ordinal: 0, driver: FakeDriver())
        var memory = CallerMemory(device: device)
        let p = try pointers(w, w.prepared(for: .fp8), codes: codes, fused: false, memory: &memory)
        let fromHost = try FusedDeviceWeights(layer: layer, device: device, packRows: Self.packRows)
        let fromDevice = try FusedDeviceWeights(
            config: c, pointers: p, device: device, packRows: Self.packRows,
            fp8Quantizer: FakeMemoryQuantizer(device: device))
        #expect(Self.firstDifference(try fromHost.w1.download(), try fromDevice.w1.download()) == nil)
        #expect(Self.firstDifference(try fromHost.w2.download(), try fromDevice.w2.download()) == nil)
    }

    @Test func nonFiniteScalesAreRefusedNamingTheField() throws {
        let c = Self.config
        let w = try Self.bf16Weights(c, seed: 12)
        let device = try CUDADevice(ordinal: 0, driver: FakeDriver())
        var memory = CallerMemory(device: device)
        var p = try pointers(w, w.prepared(for: .fp8), codes: true, fused: false, memory: &memory)
        var scales = w.prepared(for: .fp8).w2.fp8Blocks!.scales
        scales[scales.count - 1] = .infinity
        p.expertScales!.down = try memory.put(scales)
        #expect {
            try FusedDeviceWeights(config: c, pointers: p, device: device, packRows: Self.packRows)
        } throws: { error in
            guard let e = error as? MoEError else { return false }
            return e.message.contains("weights->down_scale holds inf for expert 2") && e.message.contains("finite")
        }
    }
}

/// `FP8HostQuantizer` (the host's quantization through the fake driver's memory, with the GPU kernel's arguments),
/// recording each call: what `FP8DeviceQuantizer` does on a GPU, for the tests of everything around it.
final class FakeMemoryQuantizer: FP8MatrixQuantizing, @unchecked Sendable {
    struct Call { let matrices: Int, rows: Int, cols: Int, matrixStride: Int }
    let host: FP8HostQuantizer
    private(set) var calls: [Call] = []

    init(device: CUDADevice) { host = FP8HostQuantizer(device: device) }

    func quantize(
        source: UInt64, matrixStride: Int, matrices: Int, rows: Int, cols: Int, codes: UInt64, scales: UInt64
    ) throws {
        calls.append(Call(matrices: matrices, rows: rows, cols: cols, matrixStride: matrixStride))
        try host.quantize(
            source: source, matrixStride: matrixStride, matrices: matrices, rows: rows, cols: cols, codes: codes,
            scales: scales)
    }
}

@Suite struct FP8QuantizerSelectionTests {
    @Test func theEnvironmentChoosesTheHostQuantizer() {
        // The GPU's by default (it passed verify's byte-for-byte checks on an H100); `host` asks for the host's.
        #expect(FP8HostQuantizer.hostRequested(environment: ["FLASHMOE_FP8_QUANTIZER": "host"]))
        #expect(!FP8HostQuantizer.hostRequested(environment: [:]))
        #expect(!FP8HostQuantizer.hostRequested(environment: ["FLASHMOE_FP8_QUANTIZER": "gpu"]))
    }
}
