import Testing
@testable import FlashMoE

/// fp8's tolerances in `flashmoe verify` (docs/fp8.md, "Tolerances"): the chooser's values per backend, and the
/// one-binade case that holds every backend to 1e-3 so a misplaced scale cannot pass.
@Suite struct FP8VerifyToleranceTests {
    static let sharp = Verifier.standardCases().first { $0.values == .fp8OneBinade }!

    @Test func theChooserGivesTheDocumentedValues() {
        #expect(Precision.fp8.tolerance(for: .cpu) == 5e-3)
        #expect(Precision.fp8.tolerance(for: .tensorCores) == 5e-2)
        for p in Precision.allCases where p != .fp8 {
            for a in ExpertArithmetic.allCases { #expect(p.tolerance(for: a) == p.tolerance, "\(p) \(a)") }
        }
        #expect(ExpertArithmetic(backendName: "cuda") == .tensorCores)
        for name in ["cpu", "oracle", "perturbed"] { #expect(ExpertArithmetic(backendName: name) == .cpu) }
        // A case's own tolerance replaces the precision's on every backend.
        #expect(Self.sharp.tolerance(for: .tensorCores) == 1e-3 && Self.sharp.tolerance(for: .cpu) == 1e-3)
        let plain = Verifier.standardCases().first { $0.name == "fp8 S=1" }!
        #expect(plain.tolerance(for: .tensorCores) == 5e-2 && plain.tolerance(for: .cpu) == 5e-3)
    }

    @Test func theSharpCaseIsInTheFP8Filter() {
        #expect(Self.sharp.name.contains("fp8"))
        #expect(Self.sharp.config.precision == .fp8 && Self.sharp.tolerance == Verifier.oneBinadeTolerance)
        #expect(Self.sharp.config.hiddenSize == 384 && Self.sharp.config.intermediateSize == 192)
    }

    /// Every code of w1, w3, w2 and of x's quantized groups lies in 256…448, and no two blocks or groups share a
    /// scale.
    @Test func everyCodeIsInOneBinadeAndEveryScaleIsItsOwn() throws {
        let (layer, x) = try Verifier.makeProblem(Self.sharp)
        for t in [layer.weights.w1, layer.weights.w3!, layer.weights.w2] {
            let b = try #require(t.fp8Blocks)
            #expect(b.codes.allSatisfy { (0x78...0x7E).contains($0.bitPattern & 0x7F) })
            #expect(Set(b.scales).count == b.scales.count)
        }
        let h = Self.sharp.config.hiddenSize
        let xs = x.floats()
        var scales: [Float] = []
        for t in 0..<Self.sharp.tokens {
            for g in stride(from: 0, to: h, by: 128) {
                let group = xs[(t * h + g)..<(t * h + min(h, g + 128))]
                let scale = FP8Scaling.scale(amax: group.map(\.magnitude).max()!)
                scales.append(scale)
                #expect(group.allSatisfy { (256...448).contains(FP8Scaling.encode($0, scale: scale).float.magnitude) })
            }
        }
        #expect(Set(scales).count == scales.count)
    }

    /// The decode cases reach the GPU's GEMV path (gemv.cuh: experts with at most 8 rows) whatever the routing,
    /// since no expert can have more rows than there are tokens; on the CPU they pass like any fp8 case.
    @Test func theDecodeGEMVCasesHaveAtMostEightRowsAnExpertAndPass() throws {
        let decode = Verifier.standardCases().filter { $0.name.contains("decode GEMV") }
        #expect(decode.count == 3)
        #expect(decode.contains { $0.values == .fp8OneBinade })
        for c in decode {
            #expect(c.config.precision == .fp8 && c.tokens <= 8, "\(c.name)")
            let r = try Verifier.run(c) { try CPUBackend(layer: $0, mode: .fast) }
            #expect(r.passed, "\(c.name): \(r.failure ?? "")")
        }
    }

    /// The small-experts case reaches the GPU's prefill tiles for experts of at most 8 rows: its launch routes at
    /// least the kernel's FMOE_GEMV_LAUNCH_ROWS rows (read from gemv.cuh, so a new threshold cannot leave the case
    /// behind) and some expert gets 1 … 8 of them. (Its check against the oracle is the GPU's: `flashmoe verify`;
    /// on the CPU the oracle of 2,400 rows takes a minute.)
    @Test func theSmallExpertsCaseReachesThePrefillTiles() throws {
        let c = try #require(Verifier.standardCases().first { $0.name.contains("small experts as tiles") })
        let source = try KernelSources.embedded.text(of: "gemv.cuh")
        let line = try #require(source.split(separator: "\n").first { $0.hasPrefix("#define FMOE_GEMV_LAUNCH_ROWS ") })
        let threshold = try #require(Int(line.split(separator: " ").last!))
        #expect(c.tokens * c.config.topK >= threshold)
        let (layer, x) = try Verifier.makeProblem(c)
        // The oracle's routing (the GPU's is verified equal to it).
        let router = layer.weights.router.converted(to: c.config.precision.storage)
        let logits = try Router.logits(input: x.converted(to: c.config.precision.storage), router: router)
        let routing = try Router.route(
            logits: logits, selectionBias: layer.weights.selectionBias?.floats(), config: c.config, tokens: c.tokens)
        var rows = [Int](repeating: 0, count: c.config.experts)
        for e in routing.expertIDs { rows[Int(e)] += 1 }
        #expect(rows.contains { (1...8).contains($0) }, "no expert with 1 … 8 rows: \(rows.sorted())")
        #expect(rows.contains { $0 > 8 })
    }

    @Test func theFastBackendPassesTheSharpCase() throws {
        let r = try Verifier.run(Self.sharp) { try CPUBackend(layer: $0, mode: .fast) }
        print("fp8 one binade: fast CPU vs fp8 oracle \(r.relativeError) (tolerance \(r.tolerance))")
        #expect(r.passed, "\(r.failure ?? "")")
        #expect(r.tolerance == 1e-3)
        // FP32 sums over the whole K move an h element across a BF16 rounding boundary now and then, and so
        // its E4M3 code: 3e-5 at this seed, far below the tolerance.
        #expect(r.relativeError < 1e-4)
    }

    /// A backend whose weights have two blocks' scales swapped (w2 of expert 0, or gate against up in w1/w3),
    /// the smallest misplacement there is (one block of 48 per matrix stack): it must fail the sharp case by far
    /// (measured: 4.4e-2 and 2.1e-2).
    @Test(arguments: ["w2 blocks", "w1 and w3"])
    func aSwappedScaleFails(_ which: String) throws {
        let (layer, x) = try Verifier.makeProblem(Self.sharp)
        var w = layer.weights
        func swapped(_ a: HostTensor, _ i: Int, _ j: Int, into b: HostTensor? = nil) throws -> (HostTensor, HostTensor?) {
            let ba = try #require(a.fp8Blocks)
            var sa = ba.scales
            if let b {
                var sb = try #require(b.fp8Blocks).scales
                swap(&sa[i], &sb[j])
                return (try HostTensor(shape: a.shape, fp8: FP8Blocks(shape: a.shape, codes: ba.codes, scales: sa)),
                        try HostTensor(shape: b.shape, fp8: FP8Blocks(shape: b.shape, codes: b.fp8Blocks!.codes, scales: sb)))
            }
            sa.swapAt(i, j)
            return (try HostTensor(shape: a.shape, fp8: FP8Blocks(shape: a.shape, codes: ba.codes, scales: sa)), nil)
        }
        if which == "w2 blocks" {
            // Expert 0's w2 [384, 192] has 3 × 2 blocks: swap block (0, 0) with (2, 1).
            w.w2 = try swapped(w.w2, 0, 5).0
        } else {
            let (w1, w3) = try swapped(w.w1, 1, 1, into: w.w3!)
            (w.w1, w.w3) = (w1, w3)
        }
        let wrong = try MoELayer(config: layer.config, weights: w)
        let r = try Verifier.run(Self.sharp, layer: layer, input: x) { _ in try CPUBackend(layer: wrong, mode: .fast) }
        print("fp8 one binade, \(which) scales swapped: \(r.relativeError)")
        #expect(!r.passed)
        #expect(r.relativeError > 0.01, "a misplaced scale errs by percents, 10× the tolerance at least")
    }
}
