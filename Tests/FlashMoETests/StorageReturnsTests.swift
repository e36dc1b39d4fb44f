import Testing

@testable import FlashMoE

/// Storage returns (issue 13, item 5) and, on one GPU, storage rows: the kernel build they select, the return buffer
/// and routed rows they halve, the configs they refuse, and the CPU backend's same rounding. Their GPU numbers (error
/// against FP32 rows and returns, bits against one rank, bytes) come from `flashmoe verify` and `bench` on a GPU.
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

    @Test func oneGPUStoresItsRoutedRowsInTheStorageType() throws {
        func ybufBytes(_ storage: Bool) throws -> Int {
            let spec = try FusedSpecialization(config: Self.bf16, returnStorage: storage)
            let ws = FusedWorkspace(spec: spec, tokens: 1000, rowCapacity: 2100, partRows: 2100)
            return ws.offset(.ys) - ws.offset(.ybuf)
        }
        let spec = try FusedSpecialization(config: Self.bf16, returnStorage: true)
        #expect(spec.defines["FMOE_RET_STORAGE"] == "1")
        #expect(try ybufBytes(false) == 2100 * 256 * 4)
        #expect(try ybufBytes(true) == 2100 * 256 * 2)
    }

    @Test func thirtyTwoBitLayersRefuseThem() {
        for precision in [Precision.fp32, .tf32] {
            var config = Self.bf16
            config.precision = precision
            #expect(throws: MoEError.self) {
                _ = try FusedSpecialization(config: config, ranks: 4, returnStorage: true)
            }
            #expect(throws: MoEError.self) { _ = try FusedSpecialization(config: config, returnStorage: true) }
        }
    }

    /// The CPU backend rounds each routed expert row to the storage type: y moves by about one bf16 rounding of
    /// the rows (never more than the precision's tolerance), the routing does not move, and fp32 is unchanged.
    @Test func theCPUBackendRoundsTheRoutedRowsToo() throws {
        let config = MoEConfig(hiddenSize: 64, intermediateSize: 48, experts: 8, topK: 3, ffn: .gated, bias: false,
                               activation: .silu, precision: .bf16)
        let c = VerificationCase(name: "cpu rows", config: config, tokens: 37, seed: 91)
        let (layer, x) = try Verifier.makeProblem(c)
        let plain = try CPUBackend(layer: layer, mode: .fast).forward(x)
        let rows = try CPUBackend(layer: layer, mode: .fast, storageRows: true).forward(x)
        let (a, b) = (plain.output.floats(), rows.output.floats())
        #expect(rows.routing.expertIDs == plain.routing.expertIDs)
        #expect(!a.elementsEqual(b) { $0.bitPattern == $1.bitPattern }, "the rows were rounded")
        let e = relativeError(b, a)
        #expect(e > 0 && e < 1.0 / 128, "one bf16 rounding (2^-9 relative) of each row before the weighted sum: \(e)")
        var fp32 = config
        fp32.precision = .fp32
        let layer32 = try MoELayer(config: fp32, weights: try MoEWeights.random(config: fp32, seed: 5))
        let x32 = try HostTensor(shape: [9, 64], values: [Float](repeating: 0.25, count: 9 * 64), as: .float32)
        let y0 = try CPUBackend(layer: layer32, mode: .fast).forward(x32).output.floats()
        let y1 = try CPUBackend(layer: layer32, mode: .fast, storageRows: true).forward(x32).output.floats()
        #expect(y0.elementsEqual(y1) { $0.bitPattern == $1.bitPattern }, "fp32 rows are already the storage type")
        #expect(throws: MoEError.self) { _ = try CPUBackend(layer: layer, mode: .oracle, storageRows: true) }
    }

    @Test func compileBuildsThemForSixteenBitLayers() {
        var fp32 = Self.bf16
        fp32.precision = .fp32
        let specs = KernelCatalog.expertParallel(for: [Self.bf16, fp32])
        #expect(specs.count == 3)
        #expect(specs.filter { $0.defines["FMOE_RET_STORAGE"] == "1" }.count == 1)
        #expect(specs.allSatisfy { $0.defines["FMOE_RANKS"] == "4" })
    }

    /// `flashmoe compile --storage-rows`: the one-GPU builds with storage rows, an fp8 layer's prefill build
    /// included; nothing for fp32.
    @Test func compileBuildsOneGPUStorageRows() throws {
        var fp32 = Self.bf16
        fp32.precision = .fp32
        var fp8 = Self.bf16
        fp8.precision = .fp8
        let sm90a = GPUArchitecture(major: 9, minor: 0)
        let specs = KernelCatalog.storageRows(for: [Self.bf16, fp32], arch: sm90a)
        #expect(specs.count == 1 && specs[0].defines["FMOE_RET_STORAGE"] == "1" && specs[0].defines["FMOE_RANKS"] == nil)
        #expect(specs[0] == (try FusedSpecialization(config: Self.bf16, arch: sm90a, returnStorage: true)).kernelSpec)
        let fp8Specs = KernelCatalog.storageRows(for: [fp8], arch: sm90a, experimentalFP8: true)
        let builds = try FusedSpecialization(config: fp8, arch: sm90a, returnStorage: true, experimentalFP8: true)
            .operatorBuilds()
        #expect(fp8Specs == builds.map(\.kernelSpec) && !fp8Specs.isEmpty)
        #expect(fp8Specs.allSatisfy { $0.defines["FMOE_RET_STORAGE"] == "1" })
        // Both of an fp8 operator's kernels unless the environment refuses or forces the TMA engine.
        if !FusedSpecialization.tmaEngineRefused && !FusedSpecialization.tmaEngineRequested {
            #expect(fp8Specs.count == 2 && fp8Specs[1].defines["FMOE_TMA"] == "1")
        }
        #expect(KernelCatalog.storageRows(for: [fp8], arch: sm90a, experimentalFP8: false).isEmpty)
    }
}
