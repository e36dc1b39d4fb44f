import Testing
@testable import FlashMoE

/// The fused kernel's host-side contract, without a GPU: specialisation limits, expert placement, traffic
/// accounting, and (with NVRTC) that every variant compiles for sm_80 and sm_90a with no register spills.
@Suite struct FusedKernelTests {
    @Test func gpuLimitsAreTypedErrors() {
        var c = MoEConfig(hiddenSize: 100, intermediateSize: 64, experts: 8, topK: 2)
        #expect(throws: MoEError.self) { try FusedSpecialization(config: c) }
        c.hiddenSize = 64
        c.experts = 600
        #expect(throws: MoEError.self) { try FusedSpecialization(config: c) }
        c.experts = 8
        #expect(throws: MoEError.self) { try FusedSpecialization(config: c, ranks: 9) }
        #expect(throws: Never.self) { try FusedSpecialization(config: c, ranks: 8) }
    }

    @Test func definesCarryTheShapeAndRanks() throws {
        let spec = try FusedSpecialization(config: Preset.deepSeekV3.config, ranks: 4)
        let d = spec.defines
        #expect(d["FMOE_H"] == "7168" && d["FMOE_E"] == "256" && d["FMOE_K"] == "8")
        #expect(d["FMOE_SCORING"] == "1" && d["FMOE_GROUPS"] == "8" && d["FMOE_GROUPS_KEPT"] == "4")
        #expect(d["FMOE_SHARED_I"] == "2048" && d["FMOE_RANKS"] == "4" && d["FMOE_SCALE"] == "(2.5f)")
        #expect(try FusedSpecialization(config: Preset.paperE64.config).defines["FMOE_RANKS"] == nil)
    }

    @Test(arguments: [(30, 4), (64, 8), (8, 3), (5, 5), (7, 1)])
    func placementCoversEveryExpertOnce(experts: Int, ranks: Int) throws {
        let p = try ExpertPlacement(experts: experts, ranks: ranks)
        var seen = 0
        for r in 0..<ranks {
            let mine = p.experts(of: r)
            #expect(mine.lowerBound == seen)
            #expect(mine.count == experts / ranks || mine.count == experts / ranks + 1)
            for e in mine { #expect(p.owner(of: e) == r) }
            seen = mine.upperBound
        }
        #expect(seen == experts)
    }

    @Test func placementRejectsMoreRanksThanExperts() {
        #expect(throws: MoEError.self) { try ExpertPlacement(experts: 4, ranks: 5) }
        #expect(throws: MoEError.self) { try ExpertPlacement(experts: 4, ranks: 0) }
    }

    @Test func paramsLayoutMatchesTheKernelStructs() {
        // 40 pointers + 6 ints + 2 u64 (moe.cu Params), 10 pointers (Peer); the kernel reports both at load time.
        #expect(FusedParams.byteCount == 360)
        #expect(FusedParams.peerByteCount == 80)
        let bytes = FusedParams.encode(
            pointers: [UInt64](repeating: 7, count: 40),
            FusedParams.Scalars(tokens: 5, capacity: 9, rank: 2, gateSplit: 3, rowBlocks: 4, epoch: 11,
                                budgetNanoseconds: 13))
        #expect(bytes.count == FusedParams.byteCount)
        #expect(bytes[40 * 8] == 5 && bytes[40 * 8 + 8] == 2 && bytes[40 * 8 + 24] == 11)
    }

    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason),
          arguments: ["sm_80", "sm_90a"], [1, 4])
    func everyVariantCompilesWithoutSpills(arch: String, ranks: Int) throws {
        let compiler = KernelCompiler(backend: TestEnvironment.nvrtc!, cache: nil)
        let configs = [
            MoEConfig(hiddenSize: 64, intermediateSize: 96, experts: 8, topK: 2, bias: true, activation: .gelu,
                      precision: .fp32),
            MoEConfig(hiddenSize: 128, intermediateSize: 40, experts: 16, topK: 4, ffn: .gated, activation: .silu,
                      router: .deepSeek(groups: 4, groupsKept: 2, scalingFactor: 2.5),
                      sharedExpert: SharedExpertConfig(intermediateSize: 56, gated: true), precision: .bf16),
        ]
        for c in configs {
            let target = try GPUArchitecture(parsing: arch)
            let spec = try FusedSpecialization(config: c, arch: target, ranks: ranks)
            let k = try compiler.compile(spec.kernelSpec, arch: target, sources: .embedded)
            for name in [FusedSpecialization.kernelName, FusedSpecialization.ranksKernelName] {
                let usage = try #require(k.resources.first { $0.name == name })
                #expect(usage.spillStoreBytes == 0 && usage.spillLoadBytes == 0, "\(name) spills on \(arch)")
            }
        }
    }
}
