import Testing

@testable import FlashMoE

/// The fuzz case generator and the CPU fuzz: the fast FP32 path against the Float64 oracle on a few hundred random
/// layers, the generator's coverage, replay, and that a planted bug fails (so the fuzzer can fail).
@Suite struct FuzzTests {
    /// Quick cases per seed of the CPU fuzz (three seeds run side by side: 300 cases in all).
    static let casesPerSeed = 100

    /// The first `count` quick cases of `seed` (`FuzzCase.isQuick`).
    static func quickCases(seed: UInt64, count: Int) -> [FuzzCase] {
        Array((0..<20 * count).lazy.map { FuzzCase(seed: seed, index: $0) }.filter(\.isQuick).prefix(count))
    }

    @Test(arguments: [11, 12, 13] as [UInt64])
    func theFastCPUPathMatchesTheOracle(seed: UInt64) throws {
        var failures: [String] = []
        let cases = Self.quickCases(seed: seed, count: Self.casesPerSeed)
        #expect(cases.count == Self.casesPerSeed)
        for c in cases {
            let i = c.index
            let outcome = try c.run(makeOperator: {
                try CPUBackend(layer: $0, mode: .fast, storageRows: c.shape.storageRows)
            })
            if let f = outcome.failure { failures.append("case \(i) seed \(seed): \(c.summary): \(f)") }
        }
        #expect(failures.isEmpty, "\(failures.joined(separator: "\n"))")
    }

    /// The CPU fuzz's fp8 layers (`--fp8`): the fast path's codes and scales against the fp8 oracle.
    @Test func theFastCPUPathMatchesTheOracleOnFP8Layers() throws {
        let cases = Array((0..<4000).lazy.map { FuzzCase(seed: 14, index: $0, fp8: true) }
            .filter { $0.isQuick && $0.config.precision == .fp8 }.prefix(40))
        #expect(cases.count == 40)
        var failures: [String] = []
        for c in cases {
            let outcome = try c.run(makeOperator: {
                try CPUBackend(layer: $0, mode: .fast, storageRows: c.shape.storageRows)
            })
            if let f = outcome.failure { failures.append("case \(c.index) seed 14 --fp8: \(c.summary): \(f)") }
        }
        #expect(failures.isEmpty, "\(failures.joined(separator: "\n"))")
    }

    /// `--fp8` turns half of the shapes, with ranks and without, into fp8 ones the GPU can run (H and I multiples of
    /// 16) and leaves every other case of the seed as it was.
    @Test func fp8ShapesComeOnlyWhenAskedAndLeaveTheOthers() throws {
        let withFP8 = (0..<3000).map { FuzzCase(seed: 1, index: $0, fp8: true) }
        let fp8 = withFP8.filter { $0.config.precision == .fp8 }
        #expect(fp8.count > 300)
        #expect(fp8.allSatisfy { $0.config.hiddenSize % 16 == 0 && $0.config.intermediateSize % 16 == 0 })
        #expect(fp8.contains { $0.shape.ranks != nil } && fp8.contains { $0.shape.ranks == nil })
        #expect(fp8.contains { $0.shape.ranks != nil && $0.shape.storageRows })
        #expect(Set(fp8.map(\.shape.size)) == Set(FuzzShape.Size.allCases))
        #expect(fp8.contains { $0.config.ffn == .gated } && fp8.contains { $0.config.ffn == .plain })
        #expect(fp8.contains { $0.config.sharedExpert != nil })
        for (a, b) in zip(withFP8, Self.generated) where a.config.precision != .fp8 { #expect(a == b) }
        #expect(Self.generated.allSatisfy { $0.config.precision != .fp8 })
    }

    /// The first 3,000 cases of a seed, generated only (no weights).
    static let generated = (0..<3000).map { FuzzCase(seed: 1, index: $0) }

    /// About a third of the 16-bit shapes keep their expert rows in the storage type (one GPU and ranks), and no
    /// 32-bit shape does; the CPU fuzz above runs them with `CPUBackend(storageRows:)`.
    @Test func storageRowsComeOnlyWithSixteenBitShapes() {
        let rows = Self.generated.filter(\.shape.storageRows)
        #expect(rows.allSatisfy { $0.config.precision.storage.byteSize == 2 })
        #expect(Set(rows.map(\.config.precision)) == [.bf16, .fp16])
        #expect(rows.contains { $0.shape.ranks != nil } && rows.contains { $0.shape.ranks == nil })
        #expect(rows.allSatisfy { $0.rankCase.map(\.storageReturns) ?? true })
        let sixteen = Self.generated.filter { $0.config.precision.storage.byteSize == 2 }
        #expect(rows.count * 5 > sixteen.count && rows.count * 2 < sixteen.count)
        #expect(rows.allSatisfy { $0.summary.contains("storage rows") })
    }

    @Test func theGeneratorCoversEveryRouterFFNPrecisionAndEdge() {
        let all = Self.generated
        let configs = all.map(\.config)
        #expect(Set(configs.map(\.precision)) == Set(Precision.allCases.filter { $0 != .fp8 }))  // fp8: with --fp8 only
        #expect(Set(configs.map(\.activation)) == Set(Activation.allCases))
        #expect(configs.contains { $0.ffn == .gated })
        #expect(configs.contains { $0.ffn == .plain && $0.bias })
        #expect(configs.contains { $0.ffn == .plain && !$0.bias })
        #expect(configs.contains { $0.router.scoring == .softmax && $0.router.renormalize })
        #expect(configs.contains { $0.router.scoring == .softmax && !$0.router.renormalize })
        #expect(configs.contains { $0.router.scoring == .sigmoid && $0.router.groups > 1 && $0.router.selectionBias })
        #expect(configs.contains { $0.router.scoring == .sigmoid && $0.router.groups == 1 && !$0.router.selectionBias })
        #expect(configs.contains { $0.router.groups > 1 && $0.router.groupsKept < $0.router.groups })
        #expect(configs.contains { $0.router.scalingFactor != 1 })
        #expect(configs.contains { $0.sharedExpert?.gated == true })
        #expect(configs.contains { $0.sharedExpert != nil && $0.sharedExpert?.gated == false })
        #expect(configs.contains { $0.capacity == .dropless })
        #expect(configs.contains { if case .factor(let f) = $0.capacity { f < 1 } else { false } })
        #expect(configs.contains { if case .factor(let f) = $0.capacity { f >= 1 } else { false } })
        // Sizes: E at both ends, k up to 16, real H and I.
        #expect(configs.contains { $0.experts == 1 })
        #expect(configs.contains { $0.experts > 256 })
        #expect(configs.contains { $0.topK == 16 })
        #expect(configs.contains { $0.topK == $0.experts && $0.experts > 1 })
        #expect(configs.contains { $0.hiddenSize >= 4096 })
        #expect(configs.contains { $0.intermediateSize >= 2048 })
        #expect(configs.allSatisfy { $0.hiddenSize % 8 == 0 && $0.intermediateSize % 8 == 0 })
        #expect(configs.allSatisfy { (try? FusedSpecialization(config: $0)) != nil })
        // Token counts at the edges, and large ones with small layers.
        let tokens = Set(all.map(\.tokens))
        for edge in [0, 1, 127, 128, 129, 255, 257] { #expect(tokens.contains(edge), "S = \(edge)") }
        #expect(all.contains { $0.tokens >= 16_896 })
        #expect(all.contains { $0.tokens == 65_536 })
        // Ties, and ranks with and without empty ranks, in one or two launches.
        #expect(all.contains { $0.forcedExpert != nil })
        #expect(all.contains { $0.ties == .duplicatedRows })
        #expect(all.contains { $0.shape.ranks == 1 })
        #expect(all.contains { ($0.shape.ranks ?? 0) == 8 })
        #expect(all.contains { $0.shape.ranks ?? 0 > 1 && $0.tokensPerRank.contains(0) && $0.tokens > 0 })
        #expect(all.contains { $0.shape.ranks ?? 0 > 1 && !$0.tokensPerRank.contains(0) })
        #expect(all.contains { $0.launches == 2 })
        #expect(Set(FuzzShape.Size.allCases) == Set(all.map(\.shape.size)))
    }

    @Test func everyCaseStaysWithinItsBudget() {
        for c in Self.generated {
            let budget = c.large ? FuzzBudget.largeFlops : FuzzBudget.flops
            // One token always runs, whatever its cost.
            #expect(c.tokens <= 1 || Double(c.tokens) * c.shape.flopsPerToken <= budget, "\(c.summary)")
            #expect(c.tokens <= FuzzBudget.maxTokens)
            let cfg = c.config
            let matrices = cfg.ffn == .gated ? 3 : 2
            let limit = c.shape.size == .wide ? FuzzBudget.wideWeightElements : FuzzBudget.weightElements
            #expect(cfg.experts * cfg.hiddenSize * cfg.intermediateSize * matrices <= limit, "\(c.summary)")
            #expect(c.tokensPerRank.count == (c.shape.ranks ?? 1) && c.tokensPerRank.allSatisfy { $0 >= 0 })
        }
    }

    @Test func aCaseIsAPureFunctionOfSeedAndIndex() throws {
        let a = FuzzCase(seed: 7, index: 123), b = FuzzCase(seed: 7, index: 123)
        #expect(a == b)
        let (la, xa) = try a.makeProblem(), (lb, xb) = try b.makeProblem()
        #expect(la.weights == lb.weights && xa == xb)
        #expect(FuzzCase(seed: 7, index: 124) != a && FuzzCase(seed: 8, index: 123) != a)
        // A shape is shared by the cases that draw it, and fixed by (seed, shape index).
        let pool = Set(Self.generated.map(\.shapeIndex))
        #expect(pool.count <= FuzzShape.poolSize)
        let same = Self.generated.filter { $0.shapeIndex == Self.generated[0].shapeIndex }
        #expect(same.count > 1 && same.allSatisfy { $0.shape == Self.generated[0].shape })
    }

    @Test func duplicatedRowsMakeExactTies() throws {
        let c = try #require(Self.generated.first { $0.ties == .duplicatedRows && $0.config.experts >= 2 && $0.tokens > 0 })
        let (layer, _) = try c.makeProblem()
        let h = c.config.hiddenSize
        let router = layer.weights.router.floats()
        #expect(router[0..<h] == router[h..<2 * h])
    }

    /// A backend with a planted bug must fail the fuzz: here the output is 5 % off, which every precision's
    /// tolerance (at most 1e-2) catches on any case with a non-zero output.
    @Test func aPlantedBugIsCaught() throws {
        var failed = 0, nonEmpty = 0
        for c in Self.quickCases(seed: 21, count: 40) {
            let outcome = try c.run(makeOperator: Tampered.scaled)
            if c.tokens > 0 { nonEmpty += 1 }
            if !outcome.passed { failed += 1 }
        }
        #expect(nonEmpty > 20)
        #expect(failed >= nonEmpty - 2, "\(failed) of \(nonEmpty) cases with tokens failed")
    }

    /// A backend that drops every token's last expert must fail on routing or output.
    @Test func aDroppedExpertIsCaught() throws {
        let cases = Self.quickCases(seed: 22, count: 60).filter { $0.config.topK > 1 && $0.tokens > 8 }
        #expect(cases.count > 5)
        for c in cases.prefix(8) {
            let outcome = try c.run(makeOperator: Tampered.lastRankDropped)
            #expect(!outcome.passed, "\(c.summary)")
        }
    }
}
