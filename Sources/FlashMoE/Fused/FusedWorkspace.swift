/// Where every per-call buffer of the fused kernel lives inside one device allocation (the arena).
///
/// Sized for a maximum token count; an operator keeps one arena per rank and regrows it only when a call has more
/// tokens than any before. Each region starts on a 256-byte boundary (16-byte vector access and coalescing).
/// The arena is zeroed when allocated: the counters the kernel expects at zero (per-tile gate counters) start
/// there, and epoch-tagged flags (the ring, the combine list, the count and row flags) are never cleared afterwards.
struct FusedWorkspace: Sendable {
    /// The regions. The first ones are `Params`' pointers in order; the rank exchange buffers follow.
    enum Region: Int, CaseIterable {
        case x, y, ids, weights, slotRow, logits, logitsPart, rankInTile, sharedGate, tileDone, counts, base
        case expertLoad, rowStart, rbStart, task0Start, rowToken, target, pending, done0, done1, ring, combineList
        case hbuf, hs, ybuf, ys
        // Ranks only (one byte otherwise).
        case recv, rowOrigin, rowFlags, allCounts, countFlags, ret, tileDispatched, rowsSent
        // Precision fp8 only (one byte otherwise): the activations' E4M3 codes and scales (phase_fp8.cuh), and the
        // row blocks' GEMM0 counts per 128-channel group of h (phase_experts.cuh, count_h_groups).
        case xq, xqScale, hq, hqScale, hqDone
    }

    /// The gate splits K at most this many ways (`GATE_KSPLIT_MAX` in moe_params.cuh).
    static let gateSplitMax = 16

    /// The largest token count the arena holds.
    let maxTokens: Int
    /// Rows of routed experts this rank computes: S·k alone; with ranks, what its experts can receive.
    let rowCapacity: Int
    /// Row blocks the per-block arrays hold.
    let rowBlocks: Int
    /// Rows of partial logits the region holds, all K slices together (`partialLogitsRows`).
    let partRows: Int
    /// Byte offset of each region.
    let offsets: [Int]
    /// Total bytes.
    let byteCount: Int

    /// - Parameters:
    ///   - tokens: this rank's (or the only) token count S.
    ///   - rowCapacity: the routed rows this rank's experts may hold (S·k on one GPU; with ranks, all ranks' tokens ×
    ///     min(k, local experts)).
    ///   - partRows: rows of the gate's partial logits, all K slices together (`partialLogitsRows`).
    ///   - ranks: rank count R (1 on one GPU).
    init(spec: FusedSpecialization, tokens s: Int, rowCapacity rows: Int, partRows: Int, ranks: Int = 1,
         localExperts: Int? = nil)
    {
        let c = spec.config
        let (h, i, e, k) = (c.hiddenSize, c.intermediateSize, c.experts, c.topK)
        let t = c.precision.storage.byteSize
        let shared = c.sharedExpert?.intermediateSize ?? 0
        let tiles = (s + 127) / 128
        let local = localExperts ?? e
        // Row blocks: Σ_e ceil(rows_e / 128) ≤ rows/128 + local experts, plus the shared expert's, plus slack.
        let rowBlocks = rows / 128 + local + tiles + 2
        let eLocalMax = (e + ranks - 1) / ranks
        let multi = ranks > 1
        let fp8 = c.precision == .fp8
        func bytes(_ r: Region) -> Int {
            switch r {
            case .x: s * h * t
            case .y: s * h * 4
            case .ids, .weights, .slotRow, .rankInTile: s * k * 4
            case .logits: s * spec.routerRows * 4
            case .logitsPart: partRows * spec.routerRows * 4
            case .sharedGate, .target, .pending: s * 4
            case .tileDone: tiles * 4
            case .counts, .base: tiles * e * 4
            case .expertLoad: e * 4
            case .rowStart, .rbStart, .task0Start: (e + 2) * 4
            case .rowToken: multi ? 0 : rows * 4
            case .done0, .done1: rowBlocks * 4
            case .ring: rowBlocks * 8
            case .combineList: s * 8
            case .hbuf: rows * i * t
            case .hs: s * shared * t
            case .ybuf: multi ? 0 : rows * h * spec.returnElementBytes
            case .ys: shared > 0 ? s * h * 4 : 0
            case .recv: multi ? rows * h * t : 0
            case .rowOrigin: multi ? rows * 4 : 0
            case .rowFlags: multi ? ranks * eLocalMax * 8 : 0
            case .allCounts: multi ? ranks * e * 4 : 0
            case .countFlags: multi ? ranks * 8 : 0
            case .ret: multi ? s * k * h * spec.returnElementBytes : 0
            case .tileDispatched: multi ? tiles * 8 : 0
            case .rowsSent: multi ? e * 4 : 0
            case .xq, .xqScale, .hq, .hqScale: fp8 ? Self.fp8Bytes(r, config: c, tokens: s, rows: rows) : 0
            case .hqDone: fp8 ? rowBlocks * ((i + 127) / 128) * 4 : 0
            }
        }
        var offsets: [Int] = []
        var cursor = 0
        for r in Region.allCases {
            offsets.append(cursor)
            cursor += (max(bytes(r), 1) + 255) / 256 * 256
        }
        self.maxTokens = s
        self.rowCapacity = rows
        self.rowBlocks = rowBlocks
        self.partRows = partRows
        self.offsets = offsets
        self.byteCount = cursor
    }

    /// Bytes of an fp8 activation region (`xq`, `xqScale`, `hq`, `hqScale`; 0 for any other) for `tokens` tokens and
    /// `rows` routed rows: one E4M3 code a value, one FP32 scale per row and 128-channel group.
    static func fp8Bytes(_ r: Region, config c: MoEConfig, tokens s: Int, rows: Int) -> Int {
        let (h, i) = (c.hiddenSize, c.intermediateSize)
        switch r {
        case .xq: return s * h
        case .xqScale: return s * ((h + 127) / 128) * 4
        case .hq: return rows * i
        case .hqScale: return rows * ((i + 127) / 128) * 4
        default: return 0
        }
    }

    /// Rows of partial logits (all K slices) that every split the host can choose needs: the kernel writes
    /// split · S rows. A split chosen automatically (`FusedKernel.gateSplit`) over `splitBlocks` blocks is at most
    /// `gateSplitMax` and at most splitBlocks / token tiles, so split · S ≤ min(gateSplitMax · S, 128 · splitBlocks);
    /// `splitBlocks` must be the blocks the split is computed over — for ranks, all ranks' blocks, not one rank's
    /// (issue 12, defect 1). A split fixed by the caller (`FusedOptions.gateSplit`) may apply to any S: the region
    /// then holds `gateSplitMax` rows per token.
    static func partialLogitsRows(tokens s: Int, splitBlocks: Int, fixedSplit: Bool) -> Int {
        fixedSplit ? gateSplitMax * s : min(gateSplitMax * s, 128 * max(splitBlocks, 1))
    }

    /// Whether the partial logits hold a gate split `split` over `tokens` tokens (the kernel runs an oversized
    /// split unsplit instead of writing past the region; the host checks first).
    func holdsGateSplit(_ split: Int, tokens: Int) -> Bool {
        split <= 1 || min(split, Self.gateSplitMax) * tokens <= partRows
    }

    /// Byte offset of a region.
    func offset(_ r: Region) -> Int { offsets[r.rawValue] }

    /// Zeroes every region after the input `x` (the first region, which the next launch may read): the counters,
    /// flags and results start over as in a new arena. For the epoch wrap.
    func clearState(of arena: DeviceBuffer<UInt8>) throws {
        let keep = offset(.y)
        try arena.fill(byte: 0, at: keep, count: byteCount - keep)
    }

    /// The 46 pointers of `Params`, for an arena at `base`. x, y, the routing ids and weights may live elsewhere
    /// (the caller's memory of a device forward); nil places them in the arena.
    func pointers(base: UInt64, x: UInt64, weights w: FusedDeviceWeights, control: UInt64, errorRecord: UInt64,
                  peers: UInt64, y: UInt64? = nil, ids: UInt64? = nil, routingWeights: UInt64? = nil,
                  errorMirror: UInt64 = 0) -> [UInt64]
    {
        func at(_ r: Region) -> UInt64 { base + UInt64(offset(r)) }
        return [
            x, w.router.address, w.selectionBias?.address ?? 0, w.w1.address, w.w2.address, w.b1?.address ?? 0,
            w.b2?.address ?? 0, w.sharedW1?.address ?? 0, w.sharedW2?.address ?? 0,
            y ?? at(.y), ids ?? at(.ids), routingWeights ?? at(.weights), at(.slotRow), at(.logits), at(.logitsPart),
            at(.rankInTile),
            at(.sharedGate), at(.tileDone), at(.counts), at(.base), at(.expertLoad), at(.rowStart), at(.rbStart),
            at(.task0Start), at(.rowToken), at(.target), at(.pending), at(.done0), at(.done1), at(.ring),
            at(.combineList), at(.hbuf), at(.hs), at(.ybuf), at(.ys), control, errorRecord, peers,
            at(.tileDispatched), at(.rowsSent), errorMirror, at(.xq), at(.xqScale), at(.hq), at(.hqScale),
            at(.hqDone),
        ]
    }
}
