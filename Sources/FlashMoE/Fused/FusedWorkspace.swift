/// Where every per-call buffer of the fused kernel lives inside one device allocation (the arena).
///
/// Sized for a maximum token count; `FusedMoE` keeps one arena per layer and regrows it only when a call has more
/// tokens than any before. Each region starts on a 256-byte boundary (16-byte vector access and coalescing).
/// The arena is zeroed when allocated: the counters the kernel expects at zero (per-tile gate counters) start
/// there, and epoch-tagged flags (the ring) are never cleared afterwards.
struct FusedWorkspace: Sendable {
    /// The regions, in the order the kernel's `Params` lists them.
    enum Region: Int, CaseIterable {
        case x, y, ids, weights, slotRow, logits, logitsPart, rankInTile, sharedGate, tileDone, counts, base, expertLoad
        case rowStart, rbStart, task0Start, rowToken, target, pending, done0, done1, ring, combineList, hbuf, hs, ybuf
        case ys
    }

    /// The largest token count the arena holds.
    let maxTokens: Int
    /// Byte offset of each region.
    let offsets: [Int]
    /// Byte size of each region.
    let sizes: [Int]
    /// Total bytes.
    let byteCount: Int

    /// The gate splits K at most this many ways (`GATE_KSPLIT_MAX` in moe.cu).
    static let gateSplitMax = 4

    init(spec: FusedSpecialization, maxTokens s: Int, gridBlocks: Int) {
        let c = spec.config
        let (h, i, e, k) = (c.hiddenSize, c.intermediateSize, c.experts, c.topK)
        let t = c.precision.storage.byteSize
        let shared = c.sharedExpert?.intermediateSize ?? 0
        let tiles = (s + 127) / 128
        let rows = s * k  // routed rows, dropless upper bound
        // Row blocks: Σ_e ceil(rows_e / 128) ≤ rows/128 + E, plus the shared expert's, plus slack.
        let rowBlocks = rows / 128 + e + tiles + 2
        func bytes(_ r: Region) -> Int {
            switch r {
            case .x: s * h * t
            case .y: s * h * 4
            case .ids, .weights, .slotRow, .rankInTile: s * k * 4
            case .logits: s * spec.routerRows * 4
            // The gate splits K only while token tiles are fewer than blocks: S ≤ 128 · blocks then.
            case .logitsPart: Self.gateSplitMax * min(s, 128 * gridBlocks) * spec.routerRows * 4
            case .sharedGate, .target, .pending: s * 4
            case .tileDone: tiles * 4
            case .counts, .base: tiles * e * 4
            case .expertLoad: e * 4
            case .rowStart, .rbStart, .task0Start: (e + 2) * 4
            case .rowToken: rows * 4
            case .done0, .done1: rowBlocks * 4
            case .ring: rowBlocks * 8
            case .combineList: s * 8
            case .hbuf: rows * i * t
            case .hs: s * shared * t
            case .ybuf: rows * h * 4
            case .ys: shared > 0 ? s * h * 4 : 0
            }
        }
        var offsets: [Int] = [], sizes: [Int] = []
        var cursor = 0
        for r in Region.allCases {
            offsets.append(cursor)
            let n = max(bytes(r), 1)
            sizes.append(n)
            cursor += (n + 255) / 256 * 256
        }
        self.maxTokens = s
        self.offsets = offsets
        self.sizes = sizes
        self.byteCount = cursor
    }

    /// Byte offset of a region.
    func offset(_ r: Region) -> Int { offsets[r.rawValue] }
}
