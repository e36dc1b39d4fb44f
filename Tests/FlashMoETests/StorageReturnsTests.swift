import Testing

@testable import FlashMoE

/// Storage returns (issue 13, item 5): the kernel build they select, the return buffer they halve, and the configs
/// they refuse. Their numbers (error against FP32 returns, bytes) come from `flashmoe verify` and `bench` on a GPU.
@Suite struct StorageReturnsTests {
    static let bf16 = MoEConfig(hiddenSize: 256, intermediateSize: 128, experts: 8, topK: 2, precision: .bf16)

    @Test func theyAreABuildOptionOfRanks() throws {
        let spec = try FusedSpecialization(config: Self.bf16, ranks: 4, returnStorage: true)
        #expect(spec.defines["FMOE_RET_STORAGE"] == "1")
        #expect(spec.returnElementBytes == 2)
        let plain = try FusedSpecialization(config: Self.bf16, ranks: 4)
        #expect(plain.defines["FMOE_RET_STORAGE"] == nil, "off by default: the kernel's default build is unchanged")
        #expect(plain.returnElementBytes == 4)
        #expect(spec.kernelSpec != plain.kernelSpec, "a separate cubin (and cache entry)")
    }

    @Test func theyHalveTheReturnBuffer() throws {
        func retBytes(_ storage: Bool) throws -> Int {
            let spec = try FusedSpecialization(config: Self.bf16, ranks: 4, returnStorage: storage)
            let ws = FusedWorkspace(spec: spec, tokens: 1000, rowCapacity: 4000, partRows: 4000, ranks: 4, localExperts: 2)
            return ws.offset(.tileDispatched) - ws.offset(.ret)
        }
        #expect(try retBytes(false) == 1000 * 2 * 256 * 4)
        #expect(try retBytes(true) == 1000 * 2 * 256 * 2)
    }

    @Test func oneRankAndFP32LayersRefuseThem() {
        var fp32 = Self.bf16
        fp32.precision = .fp32
        #expect(throws: MoEError.self) { _ = try FusedSpecialization(config: fp32, ranks: 4, returnStorage: true) }
        #expect(throws: MoEError.self) { _ = try FusedSpecialization(config: Self.bf16, ranks: 1, returnStorage: true) }
    }

    @Test func compileBuildsThemForSixteenBitLayers() {
        var fp32 = Self.bf16
        fp32.precision = .fp32
        let specs = KernelCatalog.expertParallel(for: [Self.bf16, fp32])
        #expect(specs.count == 3)
        #expect(specs.filter { $0.defines["FMOE_RET_STORAGE"] == "1" }.count == 1)
        #expect(specs.allSatisfy { $0.defines["FMOE_RANKS"] == "4" })
    }
}
