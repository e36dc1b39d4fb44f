import Testing

@testable import FlashMoE

@Suite struct RankLaunchPlanTests {
    @Test func ranksSplitIntoContiguousBlocksOverLaunches() throws {
        let plan = try RankLaunchPlan(ranks: 7, devices: [0, 1, 2])
        #expect(plan.ranks(of: 0) == 0..<3 && plan.ranks(of: 1) == 3..<5 && plan.ranks(of: 2) == 5..<7)
        #expect((0..<7).map(plan.launch(of:)) == [0, 0, 0, 1, 1, 2, 2])
        #expect(!plan.sharesDevice(0) && plan.ranks(onDevice: 1) == 2)
    }

    @Test func aRepeatedGPUSharesItsSMsBetweenItsLaunches() throws {
        let plan = try RankLaunchPlan(ranks: 8, devices: [0, 0, 1, 0])
        #expect(plan.sharesDevice(0) && plan.sharesDevice(3) && !plan.sharesDevice(2))
        #expect(plan.ranks(onDevice: 0) == 6 && plan.ranks(onDevice: 1) == 2 && plan.ranks(onDevice: 5) == 0)
    }

    @Test func oneLaunchRunsEveryRank() throws {
        let plan = try RankLaunchPlan(ranks: 4, devices: [3])
        #expect(plan.ranks(of: 0) == 0..<4 && (0..<4).allSatisfy { plan.launch(of: $0) == 0 })
    }

    @Test func badPlansAreTypedErrors() {
        #expect(throws: MoEError.self) { try RankLaunchPlan(ranks: 2, devices: []) }
        #expect(throws: MoEError.self) { try RankLaunchPlan(ranks: 2, devices: [0, 1, 2]) }
        #expect(throws: MoEError.self) { try RankLaunchPlan(ranks: 2, devices: [0, -1]) }
    }
}

@Suite struct RankCaseTests {
    @Test func presetsAsRanksSplitTheirTokensUnevenly() {
        let cases = Verifier.presetRankCases(ranks: 4)
        #expect(cases.count == 5)
        for c in cases {
            #expect(c.ranks == 4 && c.config.precision == .bf16)
            #expect(c.tokensPerRank == c.tokensPerRank.sorted() && Set(c.tokensPerRank).count > 1)
        }
        #expect(cases[0].tokensPerRank.reduce(0, +) == 200 && cases[0].tokensPerRank == [20, 40, 60, 80])
    }

    @Test func presetsWithFewerExpertsThanRanksAreLeftOut() {
        // Mixtral has 8 experts: as 16 ranks it cannot be placed.
        let names = Verifier.presetRankCases(ranks: 16).map(\.name)
        #expect(!names.contains { $0.hasPrefix("mixtral") } && names.contains("paper-e64 R=16"))
    }

    @Test func everyRankCaseSplitsOverItsLaunches() throws {
        for c in Verifier.rankCases() {
            let plan = try RankLaunchPlan(ranks: c.ranks, devices: [Int](repeating: 0, count: c.launches))
            #expect(plan.launches == c.launches)
        }
    }
}
