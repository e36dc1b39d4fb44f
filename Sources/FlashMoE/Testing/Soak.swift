/// One layer of a soak and how to run it forward (a single-rank backend, or ranks joined into one output).
public struct SoakLayer: Sendable {
    /// A short label ("bf16 plain", "ranks R=2").
    public let name: String
    /// The layer's config and weights (for the oracle check).
    public let layer: MoELayer
    /// One forward over all tokens.
    public let forward: @Sendable (HostTensor) throws -> MoEOutput

    /// A layer run by `forward`, which takes all tokens [S, H] and returns the whole output.
    public init(name: String, layer: MoELayer, forward: @escaping @Sendable (HostTensor) throws -> MoEOutput) {
        self.name = name
        self.layer = layer
        self.forward = forward
    }

    /// A layer run by a single-rank backend.
    public init(name: String, backend: any MoEBackend) {
        self.init(name: name, layer: backend.layer, forward: { try backend.forward($0) })
    }

    /// A layer run by the ranks of `operator`: the tokens split evenly over the ranks, the outputs joined in rank
    /// order (as one rank's output would be).
    public init(name: String, ranks op: DistributedMoE) {
        let ranks = op.placement.ranks, hidden = op.layer.config.hiddenSize
        self.init(name: name, layer: op.layer, forward: { x in
            let s = x.shape[0]
            let parts = try (0..<ranks).map { r in try x.slice(r * s / ranks..<(r + 1) * s / ranks) }
            return try Verifier.concatenate(try op.forward(parts), hidden: hidden)
        })
    }
}

/// What a soak found.
public struct SoakReport: Sendable {
    /// Calls made.
    public var calls = 0
    /// Distinct (layer, token count) shapes.
    public var shapes = 0
    /// Calls whose bits differed from the first call of their shape.
    public var mismatches = 0
    /// The first problem: an error, a failed oracle check, a bit mismatch or memory that moved.
    public var failure: String?
    /// Free device memory after the warm-up, bytes (nil: not probed).
    public var freeAfterWarmUp: Int?
    /// The lowest free device memory seen after the warm-up, bytes (nil: not probed).
    public var freeLowest: Int?
    /// The highest free device memory seen after the warm-up, bytes (nil: not probed).
    public var freeHighest: Int?
    /// Wall time of all calls, seconds.
    public var seconds = 0.0
    /// Whether the time limit ended the soak before all calls were made.
    public var stoppedEarly = false

    /// Largest change of free memory after the warm-up (0 when not probed).
    public var memoryDrift: Int {
        guard let lo = freeLowest, let hi = freeHighest, let w = freeAfterWarmUp else { return 0 }
        return max(w - lo, hi - w)
    }

    /// Whether the soak found nothing (no `failure`).
    public var passed: Bool { failure == nil }
}

/// Many forwards of a few layers at cycling token counts in one process: the first call of each shape is checked
/// against the Float64 oracle (`Verifier.compare`, with a second call for the bits), every later call must give
/// the same bits as that first one, and the device's free memory must stay flat after the warm-up (one pass over
/// every shape, by which time every arena has reached its largest size).
public struct Soak: Sendable {
    /// The layers, alternating call by call.
    public let layers: [SoakLayer]
    /// The token counts, in the order they cycle (each with every layer).
    public let tokenCounts: [Int]
    /// The seed of the inputs (call n's input: seed + n) and of the oracle checks.
    public let seed: UInt64
    /// How far free device memory may move after the warm-up, in bytes.
    public var memoryTolerance = 2 << 20
    /// Probe free memory every this many calls.
    public var probeInterval = 1000

    /// A soak of `layers` at `tokenCounts`, inputs from `seed`.
    public init(layers: [SoakLayer], tokenCounts: [Int], seed: UInt64) {
        self.layers = layers
        self.tokenCounts = tokenCounts
        self.seed = seed
    }

    /// The shape of call `n`: the layers alternate every call, the token count moves on after each round of layers.
    public func shape(ofCall n: Int) -> (layer: Int, tokens: Int) {
        let i = n % (layers.count * tokenCounts.count)
        return (i % layers.count, i / layers.count)
    }

    /// Makes `calls` calls, or as many as `maxSeconds` allows (`SoakReport.stoppedEarly`). `freeMemory` reads the
    /// device's free bytes (nil: memory is not checked); `progress` is called every 10,000 calls.
    public func run(
        calls: Int, maxSeconds: Double? = nil, freeMemory: (() throws -> Int)?,
        progress: (Int, SoakReport) -> Void = { _, _ in }
    ) -> SoakReport {
        var report = SoakReport()
        let shapeCount = layers.count * tokenCounts.count
        report.shapes = min(shapeCount, calls)
        var inputs: [[HostTensor?]] = layers.map { _ in [HostTensor?](repeating: nil, count: tokenCounts.count) }
        var firstBits = [[UInt64?]](repeating: [UInt64?](repeating: nil, count: tokenCounts.count), count: layers.count)
        let clock = ContinuousClock()
        let start = clock.now
        func probe() throws {
            guard let freeMemory else { return }
            let free = try freeMemory()
            report.freeLowest = min(report.freeLowest ?? free, free)
            report.freeHighest = max(report.freeHighest ?? free, free)
            if report.failure == nil, report.memoryDrift > memoryTolerance {
                report.failure = "free device memory moved by \(formatByteCount(report.memoryDrift)) after the warm-up "
                    + "(\(formatByteCount(report.freeAfterWarmUp ?? 0)) then, \(formatByteCount(free)) at call "
                    + "\(report.calls))"
            }
        }
        do {
            for n in 0..<calls {
                if let maxSeconds, n % 100 == 0, (clock.now - start).milliseconds > maxSeconds * 1000 {
                    report.stoppedEarly = true
                    break
                }
                let (l, t) = shape(ofCall: n)
                let s = tokenCounts[t], h = layers[l].layer.config.hiddenSize
                // Stored as the layer's storage type once, so no call spends its time converting it.
                let x = try inputs[l][t]
                    ?? Self.input(tokens: s, hidden: h, seed: seed &+ UInt64(n))
                    .converted(to: layers[l].layer.config.precision.storage)
                inputs[l][t] = x
                let out = try layers[l].forward(x)
                report.calls += 1
                let bits = Self.bits(of: out)
                if let first = firstBits[l][t] {
                    if bits != first {
                        report.mismatches += 1
                        if report.failure == nil {
                            report.failure = "call \(n) (\(layers[l].name), S=\(s)) gave other bits than the first call of "
                                + "its shape"
                        }
                    }
                } else {
                    firstBits[l][t] = bits
                    if let problem = try check(layers[l], x, first: out) {
                        report.failure = report.failure ?? "\(layers[l].name), S=\(s): \(problem)"
                    }
                }
                if n + 1 == shapeCount {
                    try probe()
                    report.freeAfterWarmUp = report.freeLowest
                    (report.freeLowest, report.freeHighest) = (report.freeAfterWarmUp, report.freeAfterWarmUp)
                } else if n + 1 > shapeCount && (n + 1) % probeInterval == 0 {
                    try probe()
                }
                if (n + 1) % 10_000 == 0 { progress(n + 1, report) }
            }
            if report.calls > shapeCount { try probe() }
        } catch {
            report.failure = "call \(report.calls): \(error)"
        }
        report.seconds = (clock.now - start).milliseconds / 1000
        return report
    }

    /// The first call of a shape against the oracle with `flashmoe verify`'s checks (a second call for the bits).
    private func check(_ l: SoakLayer, _ x: HostTensor, first: MoEOutput) throws -> String? {
        let c = VerificationCase(name: l.name, config: l.layer.config, tokens: x.shape[0], seed: seed)
        let second = try l.forward(x)
        let reference = try CPUBackend(layer: l.layer, mode: .oracle).forward(x)
        return Verifier.compare(c, first, second, reference, layer: l.layer, input: x, gpuMilliseconds: 0).failure
    }

    /// A random input [S, H] (uniform in ±1.7, as the verifier's).
    static func input(tokens: Int, hidden: Int, seed: UInt64) throws -> HostTensor {
        try HostTensor(
            shape: [tokens, hidden],
            float32: SeededRandom(seed: seed).uniformArray(count: tokens * hidden, stream: 7, scale: 1.7))
    }

    /// A 64-bit FNV-1a digest of the output's bits and the routing (ids, weights, slots).
    static func bits(of o: MoEOutput) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        func mix(_ v: UInt32) {
            hash = (hash ^ UInt64(v)) &* 0x0000_0100_0000_01B3
        }
        for v in o.output.floats() { mix(v.bitPattern) }
        for v in o.routing.expertIDs { mix(UInt32(bitPattern: v)) }
        for v in o.routing.weights { mix(v.bitPattern) }
        for v in o.routing.slots { mix(UInt32(bitPattern: v)) }
        return hash
    }

    /// The soak's layers, small so that calls are cheap: a bf16 plain softmax layer, an fp32 gated sigmoid
    /// group-limited layer with a shared expert, an fp16 plain layer with biases and capacity 1.0 (drops), and a
    /// tf32 gated layer with a sigmoid-gated shared expert.
    public static func standardLayers(seed: UInt64) throws -> [MoELayer] {
        let configs = [
            MoEConfig(hiddenSize: 256, intermediateSize: 256, experts: 16, topK: 2, precision: .bf16),
            MoEConfig(
                hiddenSize: 128, intermediateSize: 64, experts: 32, topK: 4, ffn: .gated, activation: .silu,
                router: .deepSeek(groups: 4, groupsKept: 2, scalingFactor: 2.5),
                sharedExpert: SharedExpertConfig(intermediateSize: 64), precision: .fp32),
            MoEConfig(
                hiddenSize: 64, intermediateSize: 128, experts: 8, topK: 2, bias: true, activation: .gelu,
                capacity: .factor(1.0), precision: .fp16),
            MoEConfig(
                hiddenSize: 96, intermediateSize: 40, experts: 12, topK: 3, ffn: .gated, activation: .silu,
                router: .softmax(renormalize: false), sharedExpert: SharedExpertConfig(intermediateSize: 48, gated: true),
                precision: .tf32),
        ]
        return try configs.enumerated().map { i, c in
            try MoELayer(config: c, weights: try MoEWeights.random(config: c, seed: seed &+ UInt64(i)))
        }
    }

    /// The token counts the standard soak cycles through: empty, one, tile edges, a few hundred.
    public static let standardTokenCounts = [0, 1, 37, 127, 128, 129, 300, 512]
}
