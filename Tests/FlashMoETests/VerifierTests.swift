import Testing
@testable import FlashMoE

/// The verifier's own logic, with the fast CPU backend standing in for the GPU: it must pass a correct backend
/// and catch a wrong one (so `flashmoe verify` cannot pass by construction).
@Suite struct VerifierTests {
    /// The small edge cases of the standard suite (the presets are too large for a unit test).
    static let smallCases = Verifier.standardCases(seed: 3).filter {
        $0.config.hiddenSize <= 256 && $0.config.experts <= 64 && $0.config.precision != .tf32
    }

    @Test func theSuiteCoversTheEdgeCases() {
        let all = Verifier.standardCases()
        #expect(all.contains { $0.tokens == 0 })
        #expect(all.contains { $0.tokens == 1 })
        #expect(all.contains { $0.tokens == 129 })
        #expect(all.contains { $0.forcedExpert != nil })
        #expect(all.contains { $0.config.topK == $0.config.experts })
        #expect(all.contains { if case .factor = $0.config.capacity { true } else { false } })
        #expect(Set(all.map(\.config.precision)) == Set(Precision.allCases))
        #expect(Set(all.map(\.config.activation)) == Set(Activation.allCases))
        for p in Preset.all { #expect(all.contains { $0.name == p.name }) }
    }

    @Test(arguments: smallCases)
    func aCorrectBackendPasses(_ c: VerificationCase) throws {
        let r = try Verifier.run(c) { try CPUBackend(layer: $0, mode: .fast) }
        #expect(r.passed, "\(c.name): \(r.failure ?? "")")
    }

    @Test func aWrongOutputFails() throws {
        let c = Self.smallCases.first { $0.tokens > 10 }!
        let r = try Verifier.run(c) { try Tampered.scaled($0, by: 1.01) }
        #expect(!r.passed)
    }

    @Test func anUnwrittenOutputFails() throws {
        let c = Self.smallCases.first { $0.tokens > 10 }!
        let r = try Verifier.run(c) { try Tampered.scaled($0, by: .nan) }
        #expect(!r.passed)
        #expect(r.relativeError.isNaN)
    }

    @Test func aDifferentRoutingFails() throws {
        let c = Self.smallCases.first { $0.tokens > 10 && $0.config.topK > 1 }!
        let r = try Verifier.run(c) {
            try Tampered.fast($0) { out in  // the same experts in the wrong order: every token's ranks reversed
                let k = out.routing.topK
                for t in 0..<out.routing.tokens { out.routing.expertIDs[t * k..<(t + 1) * k].reverse() }
            }
        }
        #expect(!r.passed)
        #expect(r.routingMismatches > 0)
    }

    /// Fuzz case 348 of seed 20261211 (E = 256, k = 16, capacity factor 0.75, S = 13824): FP32 routing differs
    /// from the Float64 oracle's on near-ties, and each tie moves later tokens' drops; the GPU and the fast CPU
    /// backend both failed it until such tokens were excused (`Verifier.dropsMovedByTies`).
    @Test func aNearTieThatMovesLaterDropsPasses() throws {
        let c = FuzzCase(seed: 20261211, index: 348)
        let (layer, x) = try c.makeProblem()
        let r = try Verifier.run(c.verificationCase, layer: layer, input: x) { try CPUBackend(layer: $0, mode: .fast) }
        #expect(r.routingMismatches > 0 && r.routingMismatches == r.nearTies, "the case must still hold a near-tie")
        #expect(r.passed, "\(r.failure ?? "")")
    }

    /// The same case with one kept pair reported dropped: the slots no longer follow the backend's own choices,
    /// so no drop is excused and the moved tokens' error fails the case.
    @Test func aDropTheChoicesDoNotExplainFails() throws {
        let c = FuzzCase(seed: 20261211, index: 348)
        let (layer, x) = try c.makeProblem()
        let r = try Verifier.run(c.verificationCase, layer: layer, input: x) {
            try Tampered.fast($0) { out in  // the first kept pair reported dropped, the output unchanged
                if let p = out.routing.slots.firstIndex(where: { $0 >= 0 }) { out.routing.slots[p] = -1 }
            }
        }
        #expect(!r.passed)
    }
}

/// `Verifier.firstBitDifference`: what a failed bitwise comparison of two outputs prints.
@Suite struct BitDifferenceTests {
    static func output(y: [Float], slots: [Int32]) throws -> MoEOutput {
        MoEOutput(
            output: try HostTensor(shape: [2, 2], float32: y),
            routing: Routing(tokens: 2, topK: 2, expertIDs: [0, 1, 1, 0], weights: [0.5, 0.5, 0.5, 0.5], slots: slots,
                             expertLoad: [2, 2]))
    }

    @Test func equalOutputsHaveNoDifference() throws {
        let a = try Self.output(y: [1, 2, 3, 4], slots: [0, 0, 1, 1])
        #expect(Verifier.firstBitDifference(a, a) == nil)
    }

    @Test func namesTheFieldTheTokenAndBothValues() throws {
        let a = try Self.output(y: [1, 2, 3, 4], slots: [0, 0, 1, 1])
        let b = try Self.output(y: [1, 2, 3, 4], slots: [0, 0, 180, 1])
        #expect(Verifier.firstBitDifference(a, b) == "slots: 1 of 4 differ, first at token 1 (element 2): 1 vs 180")
        // Bits, not values: +0 and -0 differ.
        let c = try Self.output(y: [1, 0, 3, 4], slots: [0, 0, 1, 1])
        let d = try Self.output(y: [1, -0.0, 3, 4], slots: [0, 0, 1, 1])
        #expect(Verifier.firstBitDifference(c, d) == "y: 1 of 4 differ, first at token 0 (element 1): 0.0 vs -0.0")
    }
}
