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

@Suite struct DistributedErrorTests {
    let placement: ExpertPlacement

    init() throws { placement = try ExpertPlacement(experts: 4, ranks: 2) }

    func error(phase: FusedKernelError.Phase, index: Int, expected: UInt64, seen: UInt64, code: UInt32 = 1)
        -> DistributedError
    {
        DistributedError(
            kernel: FusedKernelError(phase: phase, index: index, rank: 0, expected: expected, seen: seen, code: code),
            placement: placement)
    }

    @Test func aMissingRowFlagNamesRankSourceExpertAndEpoch() {
        // Rank 0 waited for (source 1, expert 0) in epoch 2 (32 rows); the flag still held epoch 1's 32 rows.
        let e = error(phase: .dispatch, index: 1 * 4 + 0, expected: 2 << 32 | 32, seen: 1 << 32 | 32)
        #expect(e.missingSource?.rank == 1 && e.missingSource?.expert == 0 && e.epoch == 2 && e.waitingRank == 0)
        #expect(e.description.contains("rank 0 gave up waiting for rank 1's rows for expert 0 in epoch 2"))
        #expect(e.description.contains("expected 32 rows; the flag still held epoch 1 with 32 rows"))
    }

    @Test func aMiscountedFlagIsAProtocolError() {
        let e = error(phase: .dispatch, index: 1 * 4 + 3, expected: 5 << 32 | 7, seen: 5 << 32 | 9, code: 4)
        #expect(e.description.contains("rank 1's flag for expert 3 in epoch 5 with 9 rows where 7 were announced"))
    }

    @Test func otherWaitsFallBackToTheKernelRecord() {
        // A shared-expert tile wait (expected = the epoch, no row count) and a peer-done wait name no source.
        let tile = error(phase: .tiles, index: 3, expected: 4, seen: 3)
        #expect(tile.missingSource == nil && tile.description.hasPrefix("rank 0: "))
        let peer = error(phase: .peerDone, index: 1, expected: 6, seen: 5)
        #expect(peer.missingSource == nil && peer.description.contains("a peer rank to finish the previous launch"))
    }
}
