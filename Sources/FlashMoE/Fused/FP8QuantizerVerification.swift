/// `flashmoe verify`'s checks of the GPU's weight quantizer for precision fp8 (`FP8DeviceQuantizer`,
/// kernels/quantize.cu): its codes and scales against the host's `FP8Blocks(quantizing:)` byte for byte, and fp8
/// layers built from BF16 device pointers against the same layers built from host weights.
extension Verifier {
    /// The quantizer's matrix stacks: each BF16 pattern once; per-block binade windows (partial blocks, wide and
    /// narrow loads and stores, a misaligned source, matrices further apart than their size); then fp8 layers from
    /// device pointers. Skipped (one passing line that says why) on GPUs without E4M3 conversions.
    public static func fp8QuantizerChecks(deviceOrdinal: Int, seed: UInt64 = 1) -> [DeviceForwardCheck] {
        var checks: [DeviceForwardCheck] = []
        func check(_ name: String, _ body: () throws -> (String?, String)) {
            checks.append(DeviceForwardCheck.run(name, body))
        }
        let device: CUDADevice, quantizer: FP8DeviceQuantizer
        do {
            device = try CUDADevice(ordinal: deviceOrdinal, driver: try CUDADriver.shared.get())
            guard device.properties.architecture.number >= 89 else {
                return [DeviceForwardCheck(
                    name: "fp8 quantizer", failure: nil,
                    detail: "skipped: \(device.properties.architecture) has no E4M3 conversions (sm_89 or later)")]
            }
            quantizer = try FP8DeviceQuantizer(device: device)
        } catch {
            return [DeviceForwardCheck(name: "fp8 quantizer", failure: "\(error)", detail: "error")]
        }
        check("fp8 quantizer: every BF16 value, shuffled [4,128,128]") {
            var random = FuzzRandom(seed, 0xF8)
            var bits = (0...UInt16.max).map { $0 }
            bits.shuffle(using: &random)
            return try compareQuantizer(quantizer, values: bits, matrices: 4, rows: 128, cols: 128)
        }
        // (matrices, rows, cols, the form): partial blocks; a grid of 7 blocks looping over 36 (uneven turns); cols
        // not a multiple of 4 (narrow loads and stores); a source 2 bytes past 8-byte alignment; matrices 2·rows·cols
        // apart; a stride that is not a multiple of 4 with codes 1 byte past 4-byte alignment (narrow loads and
        // stores again, from the addresses alone); more blocks than the default grid (16 per SM).
        let stacks: [(Int, Int, Int, QuantizerForm)] = [
            (6, 200, 260, QuantizerForm(gridLimit: 7, what: ", 7 blocks looping")),
            (3, 131, 130, QuantizerForm(what: ", cols not a multiple of 4")),
            (2, 64, 256, QuantizerForm(offset: 1, what: ", source 2 bytes past 8-byte alignment")),
            (3, 130, 384, QuantizerForm(gap: 130 * 384, what: ", matrices 2·rows·cols apart")),
            (3, 128, 256, QuantizerForm(gap: 2, codesOffset: 1, what: ", stride 2 past rows·cols, codes misaligned")),
            (48, 768, 1024, QuantizerForm(what: ", 2,304 blocks (past 16 a SM up to 144 SMs)")),
        ]
        for (i, (m, r, c, form)) in stacks.enumerated() {
            check("fp8 quantizer: binade windows [\(m),\(r),\(c)]\(form.what)") {
                var random = FuzzRandom(seed, 0xF8, UInt64(i + 1))
                let values = binadeWindows(matrices: m, rows: r, cols: c, random: &random)
                return try compareQuantizer(quantizer, values: values, matrices: m, rows: r, cols: c, form: form)
            }
        }
        let shared = SharedExpertConfig(intermediateSize: 64, gated: true)
        let layers: [(String, MoEConfig, Bool)] = [
            ("gated, fused gate_up, I=128", MoEConfig(hiddenSize: 160, intermediateSize: 128, experts: 5, topK: 2,
                ffn: .gated, activation: .silu, sharedExpert: shared, precision: .fp8), true),
            ("gated, separate, I=96", MoEConfig(hiddenSize: 256, intermediateSize: 96, experts: 4, topK: 2,
                ffn: .gated, activation: .silu, precision: .fp8), false),
            ("plain, I=200", MoEConfig(hiddenSize: 192, intermediateSize: 200, experts: 3, topK: 1,
                ffn: .plain, activation: .gelu, precision: .fp8), false),
        ]
        for (i, (name, config, fused)) in layers.enumerated() {
            check("fp8 layer from device BF16 = from host (\(name))") {
                try compareLayerFromPointers(
                    config, fused: fused, seed: seed &+ 0xF80 &+ UInt64(i), device: device, quantizer: quantizer)
            }
        }
        return checks
    }

    /// Random BF16 bit patterns for `matrices` × `rows` × `cols` values, each 128 × 128 block drawn from its own
    /// window of 13 binades anywhere in BF16's range (random signs and mantissas), so the block scales span the
    /// format; one block in 8 is all zeros, one in 8 holds only subnormals (its amax below 2⁻⁹⁶: the kernel's IEEE
    /// division path); in those and in one more block in 8, 1 % of the values are NaN or ±∞.
    private static func binadeWindows(matrices: Int, rows: Int, cols: Int, random: inout FuzzRandom) -> [UInt16] {
        let b = FP8Scaling.blockSize
        let (br, bc) = ((rows + b - 1) / b, (cols + b - 1) / b)
        var kinds: [Int: (kind: Int, low: Int)] = [:]  // block → (kind 0 ... 7, lowest exponent field)
        for block in 0..<(matrices * br * bc) { kinds[block] = (random.int(0...7), random.int(1...242)) }
        var out = [UInt16](repeating: 0, count: matrices * rows * cols)
        for m in 0..<matrices {
            for r in 0..<rows {
                for c in 0..<cols {
                    let (kind, low) = kinds[(m * br + r / b) * bc + c / b]!
                    let sign = UInt16(random.next() & 1) << 15
                    let mantissa = UInt16(random.next() & 0x7F)
                    var v: UInt16
                    switch kind {
                    case 0: v = 0
                    case 1: v = sign | mantissa  // subnormal (or ±0)
                    default: v = sign | UInt16(random.int(low...(low + 12))) << 7 | mantissa
                    }
                    if kind <= 2 && random.chance(0.01) { v = random.pick([0x7FC0, 0xFFC1, 0x7F80, 0xFF80]) }
                    out[(m * rows + r) * cols + c] = v
                }
            }
        }
        return out
    }

    /// How a stack is laid out for the quantizer: `offset` elements before the first matrix (1 misaligns the
    /// source), `gap` elements between matrices (filled with 2.0), codes `codesOffset` bytes into their buffer,
    /// at most `gridLimit` blocks (nil: the default grid).
    struct QuantizerForm {
        var offset = 0, gap = 0, codesOffset = 0
        var gridLimit: Int? = nil
        var what = ""
    }

    /// The GPU quantizer on `values` (BF16 bits, [matrices, rows, cols]) laid out as `form` says, against
    /// `FP8Blocks(quantizing:)`: every code and scale equal, twice, over codes poisoned with 0xA5 and then 0x5A
    /// (a code left unwritten differs from the host's in one of the two).
    private static func compareQuantizer(
        _ q: FP8DeviceQuantizer, values: [UInt16], matrices m: Int, rows r: Int, cols c: Int,
        form: QuantizerForm = QuantizerForm()
    ) throws -> (String?, String) {
        let per = r * c
        let stride = per + form.gap
        let offset = form.offset
        var source = [UInt16](repeating: 0x4000, count: offset + m * stride)  // 2.0 in the gaps
        for j in 0..<m {
            source.replaceSubrange(
                (offset + j * stride)..<(offset + j * stride + per), with: values[(j * per)..<((j + 1) * per)])
        }
        let device = q.device
        let input = try DeviceBuffer(device: device, copying: source)
        let b = FP8Scaling.blockSize
        let scaleCount = m * ((r + b - 1) / b) * ((c + b - 1) / b)
        let codes = try DeviceBuffer<UInt8>(device: device, count: form.codesOffset + m * per)
        let scales = try DeviceBuffer<Float>(device: device, count: scaleCount)
        var runs: [(codes: [UInt8], scales: [Float])] = []
        var elapsed = Duration.zero
        for poison: UInt8 in [0xA5, 0x5A] {
            try codes.fill(byte: poison)  // a code never written shows in one of the two runs
            try scales.fill(word: 0x7FC0_0001)
            let clock = ContinuousClock()
            let start = clock.now
            try q.quantize(
                source: input.address + UInt64(offset * 2), matrixStride: stride, matrices: m, rows: r, cols: c,
                codes: codes.address + UInt64(form.codesOffset), scales: scales.address, gridLimit: form.gridLimit)
            try device.synchronize()
            elapsed = clock.now - start
            runs.append((Array(try codes.download().dropFirst(form.codesOffset)), try scales.download()))
        }
        let expected = FP8Blocks(
            quantizing: try HostTensor(shape: [m, r, c], bfloat16: values.map(BFloat16.init(bitPattern:))))
        let detail = "\(m * per) codes, \(scaleCount) scales, \(formatDecimal(elapsed.milliseconds, 2)) ms"
        for (gotCodes, gotScales) in runs {
            let wrongCodes = zip(gotCodes, expected.codes).filter { $0 != $1.bitPattern }.count
            let wrongScales = zip(gotScales, expected.scales).filter { $0.bitPattern != $1.bitPattern }.count
            guard wrongCodes == 0 && wrongScales == 0 else {
                let i = zip(gotCodes, expected.codes).enumerated().first { $1.0 != $1.1.bitPattern }?.offset
                let example = i.map {
                    ": value 0x\(String(values[$0], radix: 16)) at \($0) got code 0x\(String(gotCodes[$0], radix: 16)), "
                        + "the host 0x\(String(expected.codes[$0].bitPattern, radix: 16))"
                } ?? ""
                return ("\(wrongCodes) codes and \(wrongScales) scales differ from the host's\(example)", detail)
            }
        }
        return (nil, detail + ", all equal to the host's")
    }

    /// An fp8 layer's routed experts built from BF16 device pointers (quantized on the GPU) against the same layer
    /// from host weights (quantized on the host): w1 and w2 byte for byte, whole (in one chunk and two experts a
    /// chunk) and as a share of 2 experts built one expert at a time.
    private static func compareLayerFromPointers(
        _ c: MoEConfig, fused: Bool, seed: UInt64, device: CUDADevice, quantizer: FP8DeviceQuantizer
    ) throws -> (String?, String) {
        var bf16 = c
        bf16.precision = .bf16
        let w = try MoEWeights.random(config: bf16, seed: seed)
        let layer = try MoELayer(config: c, weights: w)
        var kept: [DeviceBuffer<UInt8>] = []
        func put(_ t: HostTensor) throws -> UInt64 {
            let b = try DeviceBuffer<UInt8>(device: device, copying: t.withUnsafeBytes { Array($0) })
            kept.append(b)
            return b.address
        }
        let gated = c.ffn == .gated
        let first: WeightPointers.FirstLayer
        if gated && fused {
            let (g, u) = (w.w1.withUnsafeBytes { Array($0) }, w.w3!.withUnsafeBytes { Array($0) })
            let per = g.count / c.experts
            var both: [UInt8] = []
            for e in 0..<c.experts {
                let rows: Range<Int> = (e * per)..<((e + 1) * per)
                both.append(contentsOf: g[rows])
                both.append(contentsOf: u[rows])
            }
            let b = try DeviceBuffer<UInt8>(device: device, copying: both)
            kept.append(b)
            first = .fused(b.address)
        } else {
            first = .separate(gate: try put(w.w1), up: gated ? try put(w.w3!) : nil)
        }
        let s = w.shared
        let sharedFirst: WeightPointers.FirstLayer? = try s.map {
            .separate(gate: try put($0.w1), up: $0.w3 == nil ? nil : try put($0.w3!))
        }
        let p = WeightPointers(
            router: try put(w.router), selectionBias: nil, firstLayer: first, down: try put(w.w2), b1: nil, b2: nil,
            sharedFirstLayer: sharedFirst, sharedDown: try s.map { try put($0.w2) },
            sharedGate: try s?.gate.map { try put($0) })
        let packRows = FusedDeviceWeights.fp8Granule
        let fromHost = try FusedDeviceWeights(layer: layer, device: device, packRows: packRows)
        let fromDevice = try FusedDeviceWeights(
            config: c, pointers: p, device: device, packRows: packRows, fp8Quantizer: quantizer)
        // Two experts a chunk: full chunks and a partial last one (where staging offsets, sized by the chunk's
        // experts, and code offsets, sized by the chunk, differ).
        let perExpert = ((c.ffn == .gated ? 2 : 1) + 1) * c.hiddenSize * c.intermediateSize * 2
        let (c1, c2) = try FusedDeviceWeights.fp8Experts(
            config: c, pointers: p, device: device, packRows: packRows, first: 0, count: c.experts,
            chunkBytes: 2 * perExpert, quantizer: quantizer)
        let share = 1..<3
        let hostShare = try FusedDeviceWeights(layer: layer, experts: share, device: device, packRows: packRows)
        let (w1, w2) = try FusedDeviceWeights.fp8Experts(
            config: c, pointers: p, device: device, packRows: packRows, first: share.lowerBound, count: share.count,
            chunkBytes: 1, quantizer: quantizer)
        let pairs: [(String, DeviceBuffer<UInt8>, DeviceBuffer<UInt8>)] = [
            ("w1", fromHost.w1, fromDevice.w1), ("w2", fromHost.w2, fromDevice.w2),
            ("the share's w1", hostShare.w1, w1), ("the share's w2", hostShare.w2, w2),
            ("w1 two experts a chunk", fromHost.w1, c1), ("w2 two experts a chunk", fromHost.w2, c2),
        ]
        var bytes = 0
        for (name, a, b) in pairs {
            let (x, y) = (try a.download(), try b.download())
            bytes += x.count
            if x != y {
                let at = x.count == y.count ? x.indices.first { x[$0] != y[$0] } : nil
                return ("\(name) differs from the host-built layer's" + (at.map { " from byte \($0)" } ?? " in size"),
                        "\(bytes) bytes compared")
            }
        }
        withExtendedLifetime(kept) {}  // the caller's tensors, read through their addresses only
        return (nil, "w1, w2, both two experts a chunk, and a 2-expert share one at a time: \(bytes) bytes, all equal")
    }
}
