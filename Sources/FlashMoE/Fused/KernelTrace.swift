/// The per-block timeline of one launch of a tracing build of the fused kernel (`FMOE_TRACE`, `trace.cuh`): each
/// block's phases and tasks with their `%globaltimer` begin and end, decoded from the device buffer, and written as
/// Chrome-trace JSON that Perfetto (ui.perfetto.dev) and chrome://tracing open.
public struct KernelTrace: Sendable, Equatable {
    /// What an event is; the raw values are `trace.cuh`'s `FMOE_EV_*`.
    public enum Kind: Int, Sendable, CaseIterable {
        case gatePhase = 1, gate, route, scan, place, barrier, expertPhase, gemm0, gemm1, taskWait, combine, routeToken,
            release

        /// The event's name in the timeline.
        public var name: String {
            switch self {
            case .gatePhase: "gate phase"
            case .gate: "gate"
            case .route: "route"
            case .scan: "scan"
            case .place: "place"
            case .barrier: "grid barrier"
            case .expertPhase: "expert phase"
            case .gemm0: "GEMM0"
            case .gemm1: "GEMM1"
            case .taskWait: "wait for GEMM1 rows"
            case .combine: "combine"
            case .routeToken: "route token"
            case .release: "release"
            }
        }

        /// Whether the event spans a whole phase (the tasks nest inside it).
        public var isPhase: Bool { self == .gatePhase || self == .expertPhase }

        /// The names of the event's indices `a` and `b` (nil: unused).
        var argumentNames: (String?, String?) {
            switch self {
            case .gate: ("token_tile", "k_slice")
            case .route: ("token_tile", "chunk")
            case .scan: ("token_tiles", nil)
            case .gemm0, .gemm1, .release: ("row_block", "column_tile")
            case .combine, .routeToken: ("token", nil)
            default: (nil, nil)
            }
        }
    }

    /// One recorded interval.
    public struct Event: Sendable, Equatable {
        /// The block (CTA index in the grid) that recorded it.
        public var block: Int
        /// The warp that recorded it, or nil for block-level events (recorded by thread 0).
        public var warp: Int?
        /// What the interval was.
        public var kind: Kind
        /// The expert (GEMM tasks: the task-space expert, the shared expert last), or the gate's expert tile.
        public var expert: Int?
        /// The event's first index (its meaning per kind: `Kind.argumentNames`, e.g. the token tile or row block).
        public var a: Int
        /// The event's second index (e.g. the gate's K slice or a GEMM's column tile).
        public var b: Int
        /// Start, `%globaltimer` nanoseconds.
        public var begin: UInt64
        /// End, `%globaltimer` nanoseconds.
        public var end: UInt64

        /// An event with the given fields (`KernelTrace(words:blocks:capacity:)` decodes them from the device buffer).
        public init(block: Int, warp: Int?, kind: Kind, expert: Int?, a: Int, b: Int, begin: UInt64, end: UInt64) {
            self.block = block
            self.warp = warp
            self.kind = kind
            self.expert = expert
            self.a = a
            self.b = b
            self.begin = begin
            self.end = end
        }

        /// The label of the event in the timeline: kind, expert and indices.
        public var label: String {
            switch kind {
            case .gemm0, .gemm1: "\(kind.name) e\(expert ?? -1) rb\(a) n\(b)"
            case .gate: "gate tile \(a) et\(expert ?? 0) ks\(b)"
            case .route: "route tile \(a)"
            case .combine: "combine t\(a)"
            default: kind.name
            }
        }
    }

    /// The decoded events, block by block in recording order.
    public var events: [Event]
    /// Blocks of the launch.
    public var blocks: Int
    /// Events each block could store.
    public var capacity: Int
    /// Per block, the events it recorded past `capacity` (counted, not stored).
    public var overflow: [Int]

    /// Words per block in the device buffer: 4 header words, then 4 per event.
    public static func wordsPerBlock(capacity: Int) -> Int { 4 + 4 * capacity }

    /// Decodes the device buffer of `blocks` blocks of `capacity` events (see `trace.cuh` for the layout).
    public init(words: [UInt64], blocks: Int, capacity: Int) throws(MoEError) {
        let stride = Self.wordsPerBlock(capacity: capacity)
        guard blocks >= 0, capacity >= 0, words.count >= blocks * stride else {
            throw MoEError(.invalidConfig, "a trace buffer of \(words.count) words cannot hold \(blocks) blocks of \(capacity) events")
        }
        self.blocks = blocks
        self.capacity = capacity
        events = []
        overflow = []
        for block in 0..<blocks {
            let base = block * stride
            let recorded = Int(clamping: words[base])
            overflow.append(max(0, recorded - capacity))
            for i in 0..<min(recorded, capacity) {
                let w = base + 4 + 4 * i
                let meta = words[w + 2], indices = words[w + 3]
                guard let kind = Kind(rawValue: Int(meta >> 56)) else {
                    throw MoEError(.invalidConfig, "block \(block) event \(i) has unknown kind \(meta >> 56): kernel and host disagree")
                }
                let warp = Int((meta >> 48) & 0xff), expert = Int((meta >> 32) & 0xffff)
                events.append(
                    Event(
                        block: block, warp: warp == 0xff ? nil : warp, kind: kind, expert: expert == 0xffff ? nil : expert,
                        a: Int(Int32(truncatingIfNeeded: indices >> 32)), b: Int(Int32(truncatingIfNeeded: indices)),
                        begin: words[w], end: max(words[w], words[w + 1])))
            }
        }
    }

    /// Events dropped because a block's buffer was full.
    public var droppedEvents: Int { overflow.reduce(0, +) }

    /// The earliest begin of any event (the timeline's zero).
    public var origin: UInt64 { events.map(\.begin).min() ?? 0 }

    /// The Chrome-trace JSON ("JSON Object Format"): one process per block (named "block N"), its block-level events on
    /// thread 0 and each warp's combines on thread warp + 1; times in microseconds from the first event.
    public func chromeJSON(metadata: [(String, String)] = []) -> String {
        let zero = origin
        func micros(_ ns: UInt64) -> JSONValue { .double(Double(ns - zero) / 1000) }
        var out: [JSONValue] = []
        var named = Set<[Int]>()
        for e in events {
            let tid = (e.warp ?? -1) + 1
            if named.insert([e.block]).inserted {
                out.append(
                    .object([
                        ("name", .string("process_name")), ("ph", .string("M")), ("pid", .int(e.block)),
                        ("args", .object([("name", .string("block \(e.block)"))])),
                    ]))
                out.append(
                    .object([
                        ("name", .string("process_sort_index")), ("ph", .string("M")), ("pid", .int(e.block)),
                        ("args", .object([("sort_index", .int(e.block))])),
                    ]))
            }
            if named.insert([e.block, tid]).inserted {
                out.append(
                    .object([
                        ("name", .string("thread_name")), ("ph", .string("M")), ("pid", .int(e.block)), ("tid", .int(tid)),
                        ("args", .object([("name", .string(e.warp.map { "warp \($0)" } ?? "block"))])),
                    ]))
            }
            var args: [(String, JSONValue)] = []
            if let expert = e.expert { args.append((e.kind == .gate ? "expert_tile" : "expert", .int(expert))) }
            let (an, bn) = e.kind.argumentNames
            if let an { args.append((an, .int(e.a))) }
            if let bn { args.append((bn, .int(e.b))) }
            args.append(("ns", .int(Int(e.end - e.begin))))
            out.append(
                .object([
                    ("name", .string(e.label)), ("cat", .string(e.kind.name)), ("ph", .string("X")),
                    ("ts", micros(e.begin)), ("dur", .double(Double(e.end - e.begin) / 1000)), ("pid", .int(e.block)),
                    ("tid", .int(tid)), ("args", .object(args)),
                ]))
        }
        var other: [(String, JSONValue)] = metadata.map { ($0.0, .string($0.1)) }
        other += [
            ("blocks", .int(blocks)), ("events_per_block", .int(capacity)), ("events", .int(events.count)),
            ("dropped_events", .int(droppedEvents)),
        ]
        return JSONValue.object([
            ("traceEvents", .array(out)), ("displayTimeUnit", .string("ns")), ("otherData", .object(other)),
        ]).serialized + "\n"
    }

    /// A block's idle time between two consecutive GEMM tiles of one kind pair: from the end of one tile to the
    /// begin of the next (the tile's count, the next ticket, for GEMM1 the ring wait; Benchmarks/RESULTS.md, round
    /// 18, has what each costs).
    public struct TileGaps: Sendable, Equatable {
        /// The tile before the gap (`.gemm0` or `.gemm1`).
        public var from: Kind
        /// The tile after it.
        public var to: Kind
        /// Gaps of this pair over all blocks.
        public var count: Int
        /// Median gap, microseconds.
        public var medianMicros: Double
        /// Mean gap, microseconds.
        public var meanMicros: Double
        /// All gaps of this pair, microseconds, summed over the blocks.
        public var totalMicros: Double
    }

    /// Each block's block-level events of `kinds` (warps' events left out), in the order they began; events that
    /// begin together keep the order of `kinds` (a release begins where its tile ends, so tiles go first).
    func blockTimelines(_ kinds: [Kind]) -> [[Event]] {
        var byBlock: [Int: [Event]] = [:]
        for e in events where e.warp == nil && kinds.contains(e.kind) { byBlock[e.block, default: []].append(e) }
        let rank = { (e: Event) in kinds.firstIndex(of: e.kind) ?? kinds.count }
        return byBlock.keys.sorted().map { block in byBlock[block]!.sorted { ($0.begin, rank($0)) < ($1.begin, rank($1)) } }
    }

    /// The gaps between consecutive block-level GEMM tiles of each block, per (from, to) pair in the order GEMM0 →
    /// GEMM0, GEMM0 → GEMM1, GEMM1 → GEMM0, GEMM1 → GEMM1; pairs without gaps are left out. Tiles that overlap (a
    /// malformed trace) make no gap.
    public func tileGaps() -> [TileGaps] {
        var gaps: [Kind: [Kind: [Double]]] = [:]
        for ordered in blockTimelines([.gemm0, .gemm1]) {
            for (a, b) in zip(ordered, ordered.dropFirst()) where b.begin >= a.end {
                gaps[a.kind, default: [:]][b.kind, default: []].append(Double(b.begin - a.end) / 1000)
            }
        }
        var out: [TileGaps] = []
        for from in [Kind.gemm0, .gemm1] {
            for to in [Kind.gemm0, .gemm1] {
                guard let g = gaps[from]?[to], !g.isEmpty else { continue }
                let total = g.reduce(0, +)
                out.append(TileGaps(from: from, to: to, count: g.count, medianMicros: median(g),
                                    meanMicros: total / Double(g.count), totalMicros: total))
            }
        }
        return out
    }

    /// Per kind: events, total and mean microseconds, and the span from the first begin to the last end; then the
    /// releases after each kind of GEMM tile against those tiles' time (`releaseShares`), the gaps between GEMM tiles
    /// (`tileGaps`), the launch span and the dropped events. What `flashmoe bench --trace` prints.
    public func summary() -> [String] {
        guard let first = events.map(\.begin).min(), let last = events.map(\.end).max() else {
            return ["no events recorded"]
        }
        var lines = ["timeline: \(events.count) events over \(blocks) blocks, \(formatDecimal(Double(last - first) / 1000, 1)) µs "
            + "from the first begin to the last end" + (droppedEvents > 0 ? "; \(droppedEvents) events dropped (buffer full)" : "")]
        for kind in Kind.allCases {
            let mine = events.filter { $0.kind == kind }
            guard let b = mine.map(\.begin).min(), let e = mine.map(\.end).max() else { continue }
            let total = mine.reduce(0.0) { $0 + Double($1.end - $1.begin) } / 1000
            lines.append("  \(kind.name): \(mine.count) × mean \(formatDecimal(total / Double(mine.count), 1)) µs = "
                + "\(formatDecimal(total, 1)) µs of block time, from \(formatDecimal(Double(b - first) / 1000, 1)) to "
                + "\(formatDecimal(Double(e - first) / 1000, 1)) µs")
        }
        for r in releaseShares() {
            lines.append("  releases after \(r.after.name) tiles: \(r.count) × mean \(formatDecimal(r.meanMicros, 1)) µs = "
                + "\(formatDecimal(r.totalMicros, 1)) µs, \(formatDecimal(100 * r.fractionOfTiles, 1)) % of those tiles' time")
        }
        let gaps = tileGaps()
        if !gaps.isEmpty {
            let tileBlocks = blockTimelines([.gemm0, .gemm1]).count
            let perBlock = gaps.reduce(0.0) { $0 + $1.totalMicros } / Double(max(1, tileBlocks))
            lines.append("  between GEMM tiles (count, ticket, ring wait): \(formatDecimal(perBlock, 1)) µs a block")
            for g in gaps {
                lines.append("    \(g.from.name) → \(g.to.name): \(g.count) × median \(formatDecimal(g.medianMicros, 2)) µs, "
                    + "mean \(formatDecimal(g.meanMicros, 2))")
            }
        }
        return lines
    }
}
