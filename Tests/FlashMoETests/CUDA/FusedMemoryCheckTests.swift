import CCUDA
import Testing

@testable import FlashMoE

/// The device-memory check the fused operators make before they allocate, against the fake driver (1 GiB free of
/// 80 GiB): a typed error with what fits and what to change, before any allocation; the estimate itself against
/// the workspace layout and the weights' sizes.
@Suite struct FusedMemoryCheckTests {
    /// paper-e64's shape in fp32: 2 GiB of expert weights, more than the fake's 1 GiB free.
    static let tooLarge = Preset.paperE64.config
    /// A small layer whose weights fit easily.
    static let small = MoEConfig(hiddenSize: 256, intermediateSize: 128, experts: 8, topK: 2, precision: .bf16)

    /// fp8's workspace is bf16's plus the activations' E4M3 codes and scales (phase_fp8.cuh): S·H + R·I bytes and a
    /// scale per row and 128-channel group.
    @Test func fp8CountsItsActivationCodes() throws {
        var c = Preset.qwen3_30bA3b.config
        c.precision = .bf16
        let s = 16_384, rows = s * c.topK
        let bf16 = try FusedMemoryEstimate(config: c, tokens: s)
        c.precision = .fp8
        let fp8 = try FusedMemoryEstimate(config: c, tokens: s)
        let codes = s * c.hiddenSize + rows * c.intermediateSize
        let scales = (s * ((c.hiddenSize + 127) / 128) + rows * ((c.intermediateSize + 127) / 128)) * 4
        #expect(fp8.workspaceBytes - bf16.workspaceBytes >= codes + scales)
        #expect(fp8.workspaceBytes - bf16.workspaceBytes < codes + scales + (4 << 20))  // 2 MiB rounding, 256 B regions
    }

    @Test func weightsThatDoNotFitAreRefusedBeforeAnyAllocation() throws {
        let fake = FakeDriver()
        // Any allocation would fail differently: the refusal must come first, from the estimate alone.
        fake.fail("memAlloc", with: CUDA_ERROR_OUT_OF_MEMORY)
        do {
            try FusedMemoryCheck.check(config: Self.tooLarge, tokens: 128, ranks: 1, devices: [0], driver: { fake })
            Issue.record("the check should refuse 2 GiB of weights on 1 GiB free")
        } catch {
            #expect(error.tokensThatFit == nil)
            #expect(error.freeBytes == fake.freeMemory && error.totalBytes == fake.totalMemory)
            #expect(error.estimate.weightBytes >= 2 << 30)
            let text = error.description
            for part in ["GPU 0 (Fake GPU 0)", "1 GiB free", "weights", "bf16", "--ranks", "do not fit", "nothing was allocated"] {
                #expect(text.contains(part), "\(text)")
            }
        }
        #expect(fake.liveAllocations == 0)
    }

    @Test func tooManyTokensNameTheLargestCountThatFits() throws {
        let fake = FakeDriver()
        let tokens = 1 << 20
        var fit = 0
        do {
            try FusedMemoryCheck.check(config: Self.small, tokens: tokens, ranks: 1, devices: [0], driver: { fake })
            Issue.record("a million tokens of workspace should not fit in 1 GiB")
        } catch {
            fit = try #require(error.tokensThatFit)
            #expect(error.description.contains("at most \(fit) tokens per call fit"))
        }
        #expect(fit > 1000 && fit < tokens)
        // The count it names fits, one more does not.
        try FusedMemoryCheck.check(config: Self.small, tokens: fit, ranks: 1, devices: [0], driver: { fake })
        #expect(throws: DeviceMemoryError.self) {
            try FusedMemoryCheck.check(config: Self.small, tokens: fit + 1, ranks: 1, devices: [0], driver: { fake })
        }
    }

    @Test func ranksSpreadTheExpertsOverTheirGPUs() throws {
        // paper-e64 in fp32 over 8 ranks on 2 GPUs: 1 GiB of experts per GPU plus a router each — still too much;
        // over 4 GPUs (512 MiB each) it fits.
        #expect(throws: DeviceMemoryError.self) {
            try FusedMemoryCheck.check(config: Self.tooLarge, tokens: 128, ranks: 8, devices: [0, 1],
                                       driver: { FakeDriver(devices: 2) })
        }
        try FusedMemoryCheck.check(config: Self.tooLarge, tokens: 128, ranks: 8, devices: [0, 1, 2, 3],
                                   driver: { FakeDriver(devices: 4) })
        // All ranks on one GPU hold all the experts again.
        #expect(throws: DeviceMemoryError.self) {
            try FusedMemoryCheck.check(config: Self.tooLarge, tokens: 128, ranks: 8, devices: [0, 0, 0, 0],
                                       driver: { FakeDriver(devices: 4) })
        }
    }

    @Test func anArenaThatWouldNotFitIsRefusedWithTheTokensThatFit() throws {
        let fake = FakeDriver()
        let device = try CUDADevice(driver: fake)
        let spec = try FusedSpecialization(config: Self.small)
        func arena(_ s: Int) -> FusedWorkspace {
            FusedWorkspace(
                spec: spec, tokens: s, rowCapacity: s * Self.small.topK,
                partRows: FusedWorkspace.partialLogitsRows(tokens: s, splitBlocks: 132, fixedSplit: false))
        }
        try FusedMemoryCheck.checkArenas([arena(10_000)], on: [device], tokens: 10_000)
        let tokens = 1 << 20
        do {
            try FusedMemoryCheck.checkArenas([arena(tokens)], on: [device], tokens: tokens)
            Issue.record("a million tokens' arena should not fit in 1 GiB")
        } catch let error as DeviceMemoryError {
            let fit = try #require(error.tokensThatFit)
            #expect(arena(fit).byteCount + FusedMemoryEstimate.headroom <= fake.freeMemory)
            #expect(fit > tokens / 2 / 10 && error.description.contains("about \(fit) tokens per call fit"))
        }
        #expect(fake.liveAllocations == 0)
    }

    @Test func withoutADriverOrForAnUnsupportedLayerNothingIsChecked() throws {
        // The operator's own checks report these (a missing driver, an H the kernel cannot tile).
        try FusedMemoryCheck.check(config: Self.tooLarge, tokens: 128, ranks: 1, devices: [0], driver: { nil })
        var odd = Self.tooLarge
        odd.hiddenSize = 2047
        try FusedMemoryCheck.check(config: odd, tokens: 128, ranks: 1, devices: [0], driver: { FakeDriver() })
    }

    @Test func theEstimateBoundsTheWorkspaceAndTheWeights() throws {
        for config in [Self.small, Preset.qwen3_30bA3b.config, Preset.deepSeekV3.config] {
            let s = 1000
            let estimate = try FusedMemoryEstimate(config: config, tokens: s)
            let spec = try FusedSpecialization(config: config)
            let ws = FusedWorkspace(
                spec: spec, tokens: s, rowCapacity: s * config.topK,
                partRows: FusedWorkspace.partialLogitsRows(tokens: s, splitBlocks: 132, fixedSplit: false))
            #expect(estimate.workspaceBytes >= ws.byteCount)
            #expect(estimate.workspaceBytes <= ws.byteCount + (2 << 20))
            // Weights: at least the layer's tensors in the storage type, at most a few MiB and the padding more.
            let (e, h, i) = (config.experts, config.hiddenSize, config.intermediateSize)
            let matrices = config.ffn == .gated ? 3 : 2
            let shared = config.sharedExpert.map { $0.intermediateSize * h * matrices } ?? 0
            let exact = (e * h + e * i * h * matrices + shared) * config.precision.storage.byteSize
            #expect(estimate.weightBytes >= exact)
            #expect(Double(estimate.weightBytes) <= Double(exact) * 1.2 + Double(16 << 20))
        }
    }

    @Test func fp8WeightsAreCountedAsCodesAndScales() throws {
        // One byte a routed expert's weight plus a scale per block; the router and the shared expert stay bf16. (The
        // estimate once counted fp8 experts at 2 bytes and refused DeepSeek-V3's 10.5 GiB layer on an H100 with 22.6
        // GiB free, asking for 21 GiB.)
        for preset in [Preset.qwen3_30bA3b, Preset.deepSeekV3] {
            var c = preset.config
            c.precision = .fp8
            let (e, h, i) = (c.experts, c.hiddenSize, c.intermediateSize)
            let matrices = c.ffn == .gated ? 3 : 2
            let shared = c.sharedExpert.map { $0.intermediateSize * h * matrices * 2 } ?? 0
            let codes = e * i * h * matrices
            let scales = e * matrices * ((i + 127) / 128) * ((h + 127) / 128) * 4  // at least one per 128 × 128 block
            let exact = e * h * 2 + shared + codes + scales
            let estimate = try FusedMemoryEstimate(config: c, tokens: 0)
            #expect(estimate.weightBytes >= exact, "\(preset.name)")
            #expect(Double(estimate.weightBytes) <= Double(exact) * 1.05 + Double(16 << 20), "\(preset.name)")
            var bf16 = c
            bf16.precision = .bf16
            let half = try FusedMemoryEstimate(config: bf16, tokens: 0).weightBytes
            #expect(Double(estimate.weightBytes) < 0.55 * Double(half), "\(preset.name)")
        }
    }

    /// The shapes the README's `run`/`bench` examples reach (issue 12): qwen3-30b-a3b at S = 131,072 and
    /// deepseek-v3 at S = 16,384 fit on one 141 GB H200 (about 139 GiB usable) by this estimate, in every precision.
    @Test func theLargestDocumentedShapesFitOnAnH200() throws {
        for (preset, tokens) in [(Preset.qwen3_30bA3b, 131_072), (Preset.deepSeekV3, 16_384)] {
            for precision in Precision.allCases {
                var c = preset.config
                c.precision = precision
                let estimate = try FusedMemoryEstimate(config: c, tokens: tokens)
                #expect(estimate.total + FusedMemoryEstimate.headroom < 130 << 30, "\(preset.name) \(precision)")
            }
        }
    }
}
