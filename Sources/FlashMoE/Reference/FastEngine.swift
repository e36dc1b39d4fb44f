import Dispatch

/// The default CPU forward pass: FP32 arithmetic, weights packed once for a SIMD GEMM micro-kernel, all cores.
///
/// Per call: router logits by GEMM → routing (FP32, `Router`'s rules) → rows gathered per expert in slot order →
/// GEMM0 with the bias/activation/rounding epilogue → GEMM1 with the bias epilogue → combine in rank order, plus
/// the shared expert. GEMM work is split into (expert, column-panel range) tasks of similar cost that the
/// threads take dynamically; every output element is computed by exactly one task in a fixed order, so results
/// do not depend on the thread count.
///
/// fp8 (docs/fp8.md): the experts' FP8 matrices are packed as FP32 values (code × block scale), the gathered rows
/// and the activated h are replaced by their quantized values (same codes and scales as the oracle, per token and
/// 128-channel group), and the GEMMs run in FP32 over the whole K: the same products as the oracle's, summed in
/// FP32 rather than per K block in Float64.
struct FastEngine: Sendable {
    let config: MoEConfig
    let kernel: GemmKernel
    /// 16-bit layers: each routed expert's output row is rounded to the storage type before the combine, as the GPU
    /// kernel stores it with `FusedOptions.storageReturns` (a no-op for fp32 and tf32).
    let storageRows: Bool
    let router: PackedMatrices
    let w1: PackedMatrices
    let w3: PackedMatrices?
    let w2: PackedMatrices
    let b1: [Float]?
    let b2: [Float]?
    let selectionBias: [Float]?
    let shared: SharedPacked?

    /// The shared expert's packed matrices and its output gate (rounded to the storage type).
    struct SharedPacked: Sendable {
        let w1: PackedMatrices
        let w3: PackedMatrices?
        let w2: PackedMatrices
        let gate: [Float]?
        let inner: Int
    }

    init(layer: MoELayer, kernel: GemmKernel, storageRows: Bool = false) {
        self.storageRows = storageRows
        let c = layer.config, w = layer.weights.prepared(for: layer.config.precision)
        let (e, h, i) = (c.experts, c.hiddenSize, c.intermediateSize)
        let st = c.precision.storage
        // FP8 experts are packed as their FP32 values (code × scale), not rounded again.
        let est = c.precision == .fp8 ? ElementType.float32 : st
        config = c
        self.kernel = kernel
        router = PackedMatrices(w.router, count: 1, rows: e, cols: h, storage: st, kernel: kernel)
        w1 = PackedMatrices(w.w1, count: e, rows: i, cols: h, storage: est, kernel: kernel)
        w3 = w.w3.map { PackedMatrices($0, count: e, rows: i, cols: h, storage: est, kernel: kernel) }
        w2 = PackedMatrices(w.w2, count: e, rows: h, cols: i, storage: est, kernel: kernel)
        b1 = w.b1?.floats()
        b2 = w.b2?.floats()
        selectionBias = w.selectionBias?.floats()
        if let sc = c.sharedExpert, let sw = w.shared {
            let si = sc.intermediateSize
            shared = SharedPacked(
                w1: PackedMatrices(sw.w1, count: 1, rows: si, cols: h, storage: st, kernel: kernel),
                w3: sw.w3.map { PackedMatrices($0, count: 1, rows: si, cols: h, storage: st, kernel: kernel) },
                w2: PackedMatrices(sw.w2, count: 1, rows: h, cols: si, storage: st, kernel: kernel),
                gate: sc.gated ? sw.gate?.converted(to: st).floats() : nil, inner: si)
        } else {
            shared = nil
        }
    }

    /// One FFN over a block of rows: a routed expert's gathered rows, or the shared expert over all tokens.
    private struct Job {
        let a: UnsafePointer<Float>  // [rows, H]
        let rows: Int
        let hidden: UnsafeMutablePointer<Float>  // [rows, ldh]: gate (and up) pre-activations, then a
        let ldh: Int
        let out: UnsafeMutablePointer<Float>  // [rows, H]
        let w1: PackedMatrices
        let w3: PackedMatrices?
        let w2: PackedMatrices
        let index: Int
        let b1: UnsafePointer<Float>?  // [inner] of this expert
        let b2: UnsafePointer<Float>?  // [H] of this expert
        let inner: Int
        /// fp8 routed experts: quantize a (per row, 128-channel groups) between the GEMMs.
        var fp8 = false
    }

    func forward(_ input: HostTensor) throws(MoEError) -> MoEOutput {
        let (s, h, e) = (input.shape[0], config.hiddenSize, config.experts)
        let x = input.converted(to: config.precision.storage).floats()
        var logits = [Float](repeating: 0, count: s * e)
        x.withUnsafeBufferPointer { xb in
            logits.withUnsafeMutableBufferPointer { lb in
                // Each chunk writes the logits of its own tokens.
                nonisolated(unsafe) let (xp, lp) = (xb.baseAddress!, lb.baseAddress!)
                parallelChunks(count: s, minimumChunk: max(1, 1 << 16 / (e * h))) { [router] tokens in
                    router.multiply(
                        0, m: tokens.count, a: xp + tokens.lowerBound * h, lda: h, panels: 0..<router.panels,
                        c: lp + tokens.lowerBound * e, ldc: e)
                }
            }
        }
        let (routing, combine) = try Router.routeDetailed(
            logits: logits, selectionBias: selectionBias, config: config, tokens: s)

        // Expert e's rows start at offset[e]; a kept pair's row is offset[e] + slot.
        var offset = [Int](repeating: 0, count: e + 1)
        for (ex, n) in routing.expertRows.enumerated() { offset[ex + 1] = offset[ex] + n }
        let routedRows = offset[e]
        let ldh = config.ffn == .gated ? 2 * config.intermediateSize : config.intermediateSize
        let sharedInner = shared?.inner ?? 0
        let sharedLdh = config.ffn == .gated ? 2 * sharedInner : sharedInner

        let gathered = UnsafeMutablePointer<Float>.allocate(capacity: max(1, routedRows * h))
        let hidden = UnsafeMutablePointer<Float>.allocate(capacity: max(1, routedRows * ldh))
        let out = UnsafeMutablePointer<Float>.allocate(capacity: max(1, routedRows * h))
        let sharedHidden = UnsafeMutablePointer<Float>.allocate(capacity: shared == nil ? 1 : s * sharedLdh)
        let sharedOut = UnsafeMutablePointer<Float>.allocate(capacity: shared == nil ? 1 : s * h)
        defer {
            for p in [gathered, hidden, out, sharedHidden, sharedOut] { p.deallocate() }
        }
        var y = [Float](repeating: 0, count: s * h)
        x.withUnsafeBufferPointer { xb in
            let xp = xb.baseAddress!
            gather(routing, offset: offset, x: xp, into: gathered)
            if config.precision == .fp8 { Self.quantizeRows(gathered, rows: routedRows, width: h, stride: h) }
            var jobs: [Job] = []
            b1.withOptionalPointer { b1p in
                b2.withOptionalPointer { b2p in
                    for ex in 0..<e where routing.expertRows[ex] > 0 {
                        let row = offset[ex]
                        jobs.append(
                            Job(
                                a: gathered + row * h, rows: routing.expertRows[ex], hidden: hidden + row * ldh,
                                ldh: ldh, out: out + row * h, w1: w1, w3: w3, w2: w2, index: ex,
                                b1: b1p.map { $0 + ex * config.intermediateSize }, b2: b2p.map { $0 + ex * h },
                                inner: config.intermediateSize, fp8: config.precision == .fp8))
                    }
                    if let sp = shared {
                        jobs.append(
                            Job(
                                a: xp, rows: s, hidden: sharedHidden, ldh: sharedLdh, out: sharedOut, w1: sp.w1,
                                w3: sp.w3, w2: sp.w2, index: 0, b1: nil, b2: nil, inner: sp.inner))
                    }
                    run(jobs)
                }
            }
            if storageRows { Self.roundRows(out, count: routedRows * h, to: config.precision.storage) }
            y.withUnsafeMutableBufferPointer { yb in
                combineRows(
                    routing, weights: combine, offset: offset, expertOut: out, sharedOut: sharedOut, x: xp,
                    y: yb.baseAddress!)
            }
        }
        let output = try HostTensor(shape: [s, h], float32: y)
        return MoEOutput(output: output, routing: routing)
    }

    /// Rounds `count` values at `p` to `storage` (nothing to do for float32).
    private static func roundRows(_ p: UnsafeMutablePointer<Float>, count: Int, to storage: ElementType) {
        guard storage != .float32, count > 0 else { return }
        nonisolated(unsafe) let p = p
        parallelChunks(count: count, minimumChunk: 1 << 16) { range in
            for i in range { p[i] = storage.round(p[i]) }
        }
    }

    /// Copies each kept pair's token row to its expert's block, at row offset[e] + slot.
    private func gather(
        _ routing: Routing, offset: [Int], x: UnsafePointer<Float>, into dst: UnsafeMutablePointer<Float>
    ) {
        let (h, k) = (config.hiddenSize, config.topK)
        nonisolated(unsafe) let (xp, dp) = (x, dst)
        parallelChunks(count: routing.tokens * k, minimumChunk: max(1, 1 << 15 / h)) { pairs in
            for p in pairs where routing.slots[p] >= 0 {
                let row = offset[Int(routing.expertIDs[p])] + Int(routing.slots[p])
                (dp + row * h).update(from: xp + (p / k) * h, count: h)
            }
        }
    }

    /// Runs GEMM0 (+ epilogue) of every job, then GEMM1 (+ bias) of every job.
    private func run(_ jobs: [Job]) {
        let h = config.hiddenSize
        nonisolated(unsafe) let jobs = jobs
        // GEMM0 tasks cover column panels of the intermediate features; GEMM1 tasks panels of H.
        guard !jobs.isEmpty else { return }
        let first = tasks(jobs, panels: { $0.w1.panels }, depth: { _ in h })
        DispatchQueue.concurrentPerform(iterations: first.count) { t in
            let (j, panels) = first[t]
            firstLayer(jobs[j], panels: panels)
        }
        for job in jobs where job.fp8 {
            Self.quantizeRows(job.hidden, rows: job.rows, width: job.inner, stride: job.ldh)
        }
        let second = tasks(jobs, panels: { $0.w2.panels }, depth: { $0.inner })
        DispatchQueue.concurrentPerform(iterations: second.count) { t in
            let (j, panels) = second[t]
            secondLayer(jobs[j], panels: panels)
        }
    }

    /// Replaces each row's first `width` values by their FP8 values (`FP8Scaling.fakeQuantizeRow`), in parallel.
    private static func quantizeRows(_ base: UnsafeMutablePointer<Float>, rows: Int, width: Int, stride: Int) {
        nonisolated(unsafe) let p = base
        parallelChunks(count: rows, minimumChunk: max(1, 1 << 14 / max(1, width))) { chunk in
            for r in chunk { FP8Scaling.fakeQuantizeRow(p + r * stride, count: width) }
        }
    }

    /// Splits each job's panels into tasks of roughly equal work (rows × panels × reduction depth).
    private func tasks(_ jobs: [Job], panels: (Job) -> Int, depth: (Job) -> Int) -> [(Int, Range<Int>)] {
        let total = jobs.reduce(0) { $0 + $1.rows * panels($1) * depth($1) }
        // About 32 tasks per thread keeps every thread busy to the end while per-task overhead stays negligible.
        let target = max(1, total / (32 * cpuWorkerCount))
        var list: [(Int, Range<Int>)] = []
        for (j, job) in jobs.enumerated() {
            let n = panels(job)
            let per = max(1, min(n, target / max(1, job.rows * depth(job))))
            for p in stride(from: 0, to: n, by: per) { list.append((j, p..<min(n, p + per))) }
        }
        return list
    }

    /// GEMM0 on a panel range, then the epilogue on those columns: plain a = act(h + b1), gated a = act(g)·u;
    /// a rounded to the storage type, written over the gate columns.
    private func firstLayer(_ job: Job, panels: Range<Int>) {
        let h = config.hiddenSize
        job.w1.multiply(job.index, m: job.rows, a: job.a, lda: h, panels: panels, c: job.hidden, ldc: job.ldh)
        if let w3 = job.w3 {
            w3.multiply(
                job.index, m: job.rows, a: job.a, lda: h, panels: panels, c: job.hidden + job.inner, ldc: job.ldh)
        }
        let width = kernel.panelWidth
        let columns = panels.lowerBound * width..<min(job.inner, panels.upperBound * width)
        let storage = config.precision.storage
        let round = storage != .float32
        let act = config.activation
        for r in 0..<job.rows {
            let row = job.hidden + r * job.ldh
            for c in columns {
                var v: Float
                if job.w3 != nil {
                    v = act.apply(row[c]) * row[job.inner + c]
                } else {
                    v = act.apply(row[c] + (job.b1?[c] ?? 0))
                }
                if round { v = storage.round(v) }
                row[c] = v
            }
        }
    }

    /// GEMM1 on a panel range of H, plus b2.
    private func secondLayer(_ job: Job, panels: Range<Int>) {
        let h = config.hiddenSize
        job.w2.multiply(job.index, m: job.rows, a: job.hidden, lda: job.ldh, panels: panels, c: job.out, ldc: h)
        guard let b2 = job.b2 else { return }
        let width = kernel.panelWidth
        let columns = panels.lowerBound * width..<min(h, panels.upperBound * width)
        for r in 0..<job.rows {
            let row = job.out + r * h
            for c in columns { row[c] += b2[c] }
        }
    }

    /// y[t] = Σ_j w[t, j]·o_j in rank order (kept pairs only), then + the shared expert (gated or not).
    private func combineRows(
        _ routing: Routing, weights: [Float], offset: [Int], expertOut: UnsafeMutablePointer<Float>,
        sharedOut: UnsafeMutablePointer<Float>, x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>
    ) {
        let (h, k) = (config.hiddenSize, config.topK)
        let gate = shared?.gate
        let hasShared = shared != nil
        nonisolated(unsafe) let (op, sp, xp, yp) = (expertOut, sharedOut, x, y)
        parallelChunks(count: routing.tokens, minimumChunk: max(1, 1 << 14 / h)) { tokens in
            for t in tokens {
                let yt = yp + t * h
                for j in 0..<k where routing.slots[t * k + j] >= 0 {
                    let p = t * k + j
                    let o = op + (offset[Int(routing.expertIDs[p])] + Int(routing.slots[p])) * h
                    let w = weights[p]
                    for c in 0..<h { yt[c] += w * o[c] }
                }
                guard hasShared else { continue }
                let o = sp + t * h
                if let gate {
                    var z: Float = 0
                    for c in 0..<h { z += xp[t * h + c] * gate[c] }
                    let g = 1 / (1 + Float.exponential(-z))
                    for c in 0..<h { yt[c] += g * o[c] }
                } else {
                    for c in 0..<h { yt[c] += o[c] }
                }
            }
        }
    }
}

extension Optional where Wrapped == [Float] {
    /// Calls `body` with a pointer to the array's elements, or nil when there is no array.
    fileprivate func withOptionalPointer<R>(_ body: (UnsafePointer<Float>?) -> R) -> R {
        guard let array = self else { return body(nil) }
        return array.withUnsafeBufferPointer { body($0.baseAddress) }
    }
}
