import Testing

@testable import FlashMoE

/// Issue 12's kernel defects, where the host side shows them without a GPU.
@Suite struct KernelDefectTests {
    static let spec = try! FusedSpecialization(config: MoEConfig(hiddenSize: 64, intermediateSize: 64, experts: 64, topK: 2))

    /// Defect 1: the gate's split is chosen over all ranks' tokens and blocks, so each rank's partial logits must
    /// hold split · S_r rows however the tokens are spread. Sized for one rank's blocks (the old rule), a rank with
    /// 2100 of 4096 tokens over 8 × 16 blocks (split 4) overflowed its region.
    @Test(arguments: [1, 16, 100, 512, 1000, 2048, 4096, 8000])
    func everyRankHoldsTheGlobalGateSplit(total: Int) {
        let (ranks, perRank) = (8, 16)
        let split = FusedKernel.gateSplit(tokens: total, blocks: ranks * perRank, gateTiles: 1, routerRows: 64)
        for s in Set([0, 1, total / ranks, 2100, total / 2, total - 1, total]) where s <= total {
            let ws = RankParts.rankWorkspace(
                spec: Self.spec, tokens: max(s, 1), totalTokens: total, localExperts: 8, blocksPerRank: perRank,
                ranks: ranks, fixedSplit: false)
            #expect(ws.holdsGateSplit(split, tokens: s), "split \(split), rank tokens \(s) of \(total)")
        }
    }

    @Test func theOneRankSplitFitsTooAndAFixedSplitHoldsEveryToken() {
        for s in [1, 16, 127, 1024, 4096, 70_000] {
            for routerRows in [8, 64, 257, 512] {
                let split = FusedKernel.gateSplit(tokens: s, blocks: 132, gateTiles: 1, routerRows: routerRows)
                let auto = FusedWorkspace(
                    spec: Self.spec, tokens: s, rowCapacity: s * 2,
                    partRows: FusedWorkspace.partialLogitsRows(tokens: s, splitBlocks: 132, fixedSplit: false))
                #expect(auto.holdsGateSplit(split, tokens: s))
            }
            // A caller's fixed split applies at any S: the region holds gateSplitMax rows a token.
            let fixed = FusedWorkspace(
                spec: Self.spec, tokens: s, rowCapacity: s * 2,
                partRows: FusedWorkspace.partialLogitsRows(tokens: s, splitBlocks: 132, fixedSplit: true))
            #expect(fixed.holdsGateSplit(FusedWorkspace.gateSplitMax, tokens: s))
        }
        // The check itself refuses what does not fit.
        let small = FusedWorkspace(spec: Self.spec, tokens: 4096, rowCapacity: 8192, partRows: 8192)
        #expect(!small.holdsGateSplit(4, tokens: 4096) && small.holdsGateSplit(2, tokens: 4096))
    }

    /// The gate's split: up to 16 slices for one small token tile (decode), at most 4 once a tile's partials would
    /// take the routing block more than 16 batches of loads, and never more tasks than blocks.
    @Test func decodeGetsAWideGateSplitAndFullTilesKeepFour() {
        #expect(FusedKernel.gateSplit(tokens: 1, blocks: 132, gateTiles: 1, routerRows: 128) == 16)
        #expect(FusedKernel.gateSplit(tokens: 16, blocks: 132, gateTiles: 1, routerRows: 128) == 16)
        #expect(FusedKernel.gateSplit(tokens: 64, blocks: 132, gateTiles: 1, routerRows: 128) == 4)
        #expect(FusedKernel.gateSplit(tokens: 1, blocks: 132, gateTiles: 2, routerRows: 512) == 16)
        #expect(FusedKernel.gateSplit(tokens: 64, blocks: 132, gateTiles: 1, routerRows: 256) == 4)
        #expect(FusedKernel.gateSplit(tokens: 4096, blocks: 132, gateTiles: 1, routerRows: 128) == 4)
        #expect(FusedKernel.gateSplit(tokens: 8192, blocks: 132, gateTiles: 1, routerRows: 64) == 2)
        #expect(FusedKernel.gateSplit(tokens: 1, blocks: 8, gateTiles: 1, routerRows: 64) == 8)
        #expect(FusedKernel.gateSplit(tokens: 1 << 20, blocks: 132, gateTiles: 1, routerRows: 64) == 1)
    }

    /// A kernel with the decode gate (`gate_gemv.cuh`, reported through `fmoe_gate_gemv_tokens`) is asked for it
    /// (split 0) for 1 … 8 tokens over all ranks and gets the K split above that; one without it never gets 0.
    /// Split 0 needs no partial-logit rows, so every workspace holds it.
    @Test func decodeLaunchesAskForTheGateGemvWhenTheKernelHasIt() throws {
        let device = try CUDADevice(ordinal: 0, driver: FakeDriver(kernels: [FusedSpecialization.kernelName]))
        let plain = try FusedKernel.loaded(on: device, entry: FusedSpecialization.kernelName)
        #expect((1...8).allSatisfy { plain.gateSplit(tokens: $0, blocks: 132) != 0 })  // no decode gate reported
        let kernel = try FusedKernel.loaded(on: device, entry: FusedSpecialization.kernelName, gateGemvTokens: 8)
        for s in 1...8 { #expect(kernel.gateSplit(tokens: s, blocks: 132) == 0, "\(s) tokens") }
        #expect(kernel.gateSplit(tokens: 0, blocks: 132) != 0)
        for s in [9, 64, 4096] {
            #expect(
                kernel.gateSplit(tokens: s, blocks: 132)
                    == FusedKernel.gateSplit(tokens: s, blocks: 132, gateTiles: 1, routerRows: 8))
        }
        let ws = FusedWorkspace(spec: Self.spec, tokens: 8, rowCapacity: 16, partRows: 0)
        #expect(ws.holdsGateSplit(0, tokens: 8))
    }

    /// Defect 5: a received row's origin packs the source rank above its pair index; the pair field is no longer a
    /// fixed 24 bits but what the rank count leaves, and a rank past it is a typed error naming the rank.
    @Test func pairLimitGrowsWithFewerRanksAndIsATypedError() throws {
        #expect(DistributedMoE.pairLimit(ranks: 1) == 1 << 31)
        #expect(DistributedMoE.pairLimit(ranks: 2) == 1 << 30)
        #expect(DistributedMoE.pairLimit(ranks: 8) == 1 << 28)
        #expect(DistributedMoE.pairLimit(ranks: 9) == 1 << 27)
        #expect(DistributedMoE.pairLimit(ranks: 64) == 1 << 25)
        // 2^24 pairs on a rank: refused by the old 24-bit packing, fine now.
        try DistributedMoE.checkPairs(tokens: [1 << 21, 5], topK: 8, ranks: 2)
        #expect {
            try DistributedMoE.checkPairs(tokens: [3, 1 << 27], topK: 8, ranks: 2)
        } throws: { error in
            (error as? MoEError)?.kind == .unsupported && "\(error)".contains("rank 1")
        }
        #expect(throws: MoEError.self) { try DistributedMoE.checkPairs(tokens: [Int.max], topK: 16, ranks: 4) }
    }
}
