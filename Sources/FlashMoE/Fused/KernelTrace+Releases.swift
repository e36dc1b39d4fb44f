extension KernelTrace {
    /// The releases that follow one kind of GEMM tile, over all blocks: a block's release (counting its tile done,
    /// publishing a completed row block; fp8: also quantizing h, `trace.cuh`'s `FMOE_EV_RELEASE`) belongs to the
    /// block's last GEMM tile that ended before the release began.
    public struct ReleaseShare: Sendable, Equatable {
        /// The kind of the tiles the releases follow (`.gemm0` or `.gemm1`).
        public var after: Kind
        /// Releases.
        public var count: Int
        /// Mean release, microseconds.
        public var meanMicros: Double
        /// All these releases, microseconds, summed over the blocks.
        public var totalMicros: Double
        /// All tiles of kind `after`, microseconds of block time.
        public var tileMicros: Double

        /// The releases' time as a fraction of their tiles' time (0 without tiles).
        public var fractionOfTiles: Double { tileMicros > 0 ? totalMicros / tileMicros : 0 }
    }

    /// The releases after GEMM0 tiles, then after GEMM1 tiles (kinds without releases are left out): how much
    /// block time counting and publishing adds to the tiles (Benchmarks/RESULTS.md, round 27: at qwen3-30b-a3b
    /// S = 4096 fp8 the releases after GEMM0 tiles took 38 % of those tiles' time). A release with no GEMM tile
    /// before it in its block is left out.
    public func releaseShares() -> [ReleaseShare] {
        var releases: [Kind: [Double]] = [:]
        var tileMicros: [Kind: Double] = [:]
        for timeline in blockTimelines([.gemm0, .gemm1, .release]) {
            var lastTile: Kind?
            for e in timeline {
                let micros = Double(e.end - e.begin) / 1000
                if e.kind != .release {
                    lastTile = e.kind
                    tileMicros[e.kind, default: 0] += micros
                } else if let tile = lastTile {
                    releases[tile, default: []].append(micros)
                }
            }
        }
        return [Kind.gemm0, .gemm1].compactMap { kind in
            guard let r = releases[kind], !r.isEmpty else { return nil }
            let total = r.reduce(0, +)
            return ReleaseShare(after: kind, count: r.count, meanMicros: total / Double(r.count), totalMicros: total,
                                tileMicros: tileMicros[kind] ?? 0)
        }
    }
}
