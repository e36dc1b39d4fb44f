/// Σ over 128-wide K blocks of (Σ_k a[k]·w[k]) · (sa[j]·sw[j]): the FP8 GEMM's promotion, in Float64.
///
/// `a` and `w` hold E4M3 values (4 significant bits, exponents 2⁻⁹…2⁸), so every product has at most 8
/// significant bits between 2⁻¹⁸ and 2¹⁸ and a block's sum of 128 of them is exact in Float64; the only roundings
/// are the scaled additions, at Float64's 2⁻⁵³.
@inline(__always)
func blockScaledDot(
    _ a: UnsafePointer<Double>, _ sa: UnsafePointer<Double>, _ w: UnsafePointer<Double>,
    _ sw: UnsafePointer<Double>, _ n: Int
) -> Double {
    var acc = 0.0
    var start = 0, j = 0
    while start < n {
        let len = min(FP8Scaling.blockSize, n - start)
        acc += dotFloat64(a + start, w + start, len) * (sa[j] * sw[j])
        start += len
        j += 1
    }
    return acc
}

/// Rows quantized per token and 128-channel group (`FP8Scaling.quantizeRow`), decoded exactly into Float64.
struct QuantizedRows {
    /// [rows, width] E4M3 values.
    var values: [Double]
    /// [rows, groups] scales.
    var scales: [Double]
    let groups: Int

    init(_ rows: [Float], count: Int, width: Int) {
        groups = (width + FP8Scaling.blockSize - 1) / FP8Scaling.blockSize
        values = [Double](repeating: 0, count: count * width)
        scales = [Double](repeating: 1, count: count * groups)
        let codes = UnsafeMutablePointer<FP8E4M3>.allocate(capacity: max(1, width))
        let s = UnsafeMutablePointer<Float>.allocate(capacity: max(1, groups))
        defer {
            codes.deallocate()
            s.deallocate()
        }
        rows.withUnsafeBufferPointer { rb in
            for r in 0..<count {
                FP8Scaling.quantizeRow(rb.baseAddress! + r * width, count: width, codes: codes, scales: s)
                for c in 0..<width { values[r * width + c] = codes[c].double }
                for g in 0..<groups { scales[r * groups + g] = Double(s[g]) }
            }
        }
    }
}

extension OracleEngine {
    /// The FP8 FFN of routed expert `m` (docs/fp8.md) on the rows `tokens` of x [S, H]: [tokens.count, H].
    ///
    /// x's rows (BF16 values) are quantized per token and 128-channel group; GEMM0 runs on the E4M3 values with
    /// the block scales applied per K block (`blockScaledDot`); a = act(·) (⊙ up) is rounded to BF16, quantized
    /// the same way, and GEMM1 runs like GEMM0. Weights are `m`'s FP8 blocks (`MoEWeights.prepared(for: .fp8)`).
    func ffnFP8(_ m: FFNMatrices, tokens: [Int], x: [Double]) -> [Double] {
        let (n, h, inner) = (tokens.count, config.hiddenSize, m.inner)
        let activation = config.activation
        var rows = [Float](repeating: 0, count: n * h)
        for (r, t) in tokens.enumerated() {
            for c in 0..<h { rows[r * h + c] = Float(x[t * h + c]) }  // BF16 values: exact
        }
        let qx = QuantizedRows(rows, count: n, width: h)
        var a = [Float](repeating: 0, count: n * inner)
        let (w1, w3, w2) = (FP8Rows(m.w1, matrix: m.index), m.w3.map { FP8Rows($0, matrix: m.index) }, FP8Rows(m.w2, matrix: m.index))
        qx.values.withUnsafeBufferPointer { vb in
            qx.scales.withUnsafeBufferPointer { sb in
                a.withUnsafeMutableBufferPointer { ab in
                    // Each chunk owns a range of intermediate features: disjoint columns of a.
                    nonisolated(unsafe) let (xv, xs, ap) = (vb.baseAddress!, sb.baseAddress!, ab.baseAddress!)
                    parallelChunks(count: inner, minimumChunk: max(1, 32_768 / max(1, n * h))) { features in
                        let g1 = FP8Rows.Scratch(width: h), g3 = FP8Rows.Scratch(width: h)
                        defer {
                            g1.deallocate()
                            g3.deallocate()
                        }
                        for i in features {
                            w1.load(row: i, into: g1)
                            w3?.load(row: i, into: g3)
                            let b1 = Double(m.b1?.float(at: m.index * inner + i) ?? 0)
                            for r in 0..<n {
                                let (xr, sr) = (xv + r * h, xs + r * qx.groups)
                                let g = blockScaledDot(xr, sr, g1.values, g1.scales, h)
                                let v =
                                    w3 != nil
                                    ? activation.apply(g) * blockScaledDot(xr, sr, g3.values, g3.scales, h)
                                    : activation.apply(g + b1)
                                ap[r * inner + i] = BFloat16(v).float
                            }
                        }
                    }
                }
            }
        }
        let qa = QuantizedRows(a, count: n, width: inner)
        var out = [Double](repeating: 0, count: n * h)
        qa.values.withUnsafeBufferPointer { vb in
            qa.scales.withUnsafeBufferPointer { sb in
                out.withUnsafeMutableBufferPointer { ob in
                    // Each chunk owns a range of output features: disjoint columns of out.
                    nonisolated(unsafe) let (av, asc, op) = (vb.baseAddress!, sb.baseAddress!, ob.baseAddress!)
                    parallelChunks(count: h, minimumChunk: max(1, 32_768 / max(1, n * inner))) { features in
                        let w = FP8Rows.Scratch(width: inner)
                        defer { w.deallocate() }
                        for c in features {
                            w2.load(row: c, into: w)
                            let b2 = Double(m.b2?.float(at: m.index * h + c) ?? 0)
                            for r in 0..<n {
                                op[r * h + c] =
                                    blockScaledDot(av + r * inner, asc + r * qa.groups, w.values, w.scales, inner) + b2
                            }
                        }
                    }
                }
            }
        }
        return out
    }
}

/// Rows of one matrix of an FP8 weight stack, decoded into Float64 values and their per-K-block scales.
struct FP8Rows: Sendable {
    let blocks: FP8Blocks
    let matrix: Int

    /// The matrix `matrix` of `tensor`, which must be stored in FP8 (`MoEWeights.prepared(for: .fp8)`).
    init(_ tensor: HostTensor, matrix: Int) {
        // The oracle prepares its weights for fp8, so every routed expert matrix is FP8 here.
        guard let b = tensor.fp8Blocks else { preconditionFailure("FP8 expert weights expected") }
        blocks = b
        self.matrix = matrix
    }

    /// Space for one decoded row: `width` values and ⌈width/128⌉ scales.
    struct Scratch {
        let values: UnsafeMutablePointer<Double>
        let scales: UnsafeMutablePointer<Double>
        init(width: Int) {
            values = .allocate(capacity: max(1, width))
            scales = .allocate(capacity: max(1, (width + FP8Scaling.blockSize - 1) / FP8Scaling.blockSize))
        }
        func deallocate() {
            values.deallocate()
            scales.deallocate()
        }
    }

    /// Decodes row `row` (exact E4M3 values) and the scales of its K blocks.
    func load(row: Int, into s: Scratch) {
        let (cols, bc) = (blocks.cols, blocks.blockCols)
        let base = (matrix * blocks.rows + row) * cols
        for c in 0..<cols { s.values[c] = blocks.codes[base + c].double }
        let scaleRow = (matrix * blocks.blockRows + row / FP8Scaling.blockSize) * bc
        for j in 0..<bc { s.scales[j] = Double(blocks.scales[scaleRow + j]) }
    }
}
