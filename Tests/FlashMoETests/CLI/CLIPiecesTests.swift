import Foundation
import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// The pieces behind `run` and `bench`: overrides, host facts, memory estimate, roofline, formatting, JSON.
@Suite struct CLIPiecesTests {
    @Test func runAndBenchAreRegistered() throws {
        #expect(try FlashMoECommand.parseAsRoot(["run"]) is RunCommand)
        #expect(try FlashMoECommand.parseAsRoot(["bench"]) is BenchCommand)
    }

    func overrides(_ arguments: [String]) throws -> ShapeOverrides { try ShapeOverrides.parse(arguments) }

    @Test func overridesChangeOnlyWhatIsGiven() throws {
        let none = try overrides([])
        #expect(none.given.isEmpty && none.apply(to: Preset.deepSeekV3.config) == Preset.deepSeekV3.config)
        let c = try overrides(["--hidden", "64", "--bias", "--scaling", "1.5"]).apply(to: Preset.paperE64.config)
        #expect(c.hiddenSize == 64 && c.bias && c.router.scalingFactor == 1.5 && c.experts == 64)
        #expect(try overrides(["--no-bias", "--top-k", "3"]).given == ["--top-k", "--bias/--no-bias"])
    }

    @Test func routerOverridesKeepTheConfigValid() throws {
        let deepseek = Preset.deepSeekV3.config
        let soft = try overrides(["--router", "softmax"]).apply(to: deepseek)
        #expect(soft.router.scoring == .softmax && soft.router.groups == 1 && !soft.router.selectionBias)
        #expect(soft.router.renormalize && soft.router.scalingFactor == 2.5)
        try soft.validate()
        let norenorm = try overrides(["--router", "softmax-norenorm"]).apply(to: Preset.mixtral8x7b.config)
        #expect(!norenorm.router.renormalize)
        let sigmoid = try overrides(["--router", "sigmoid"]).apply(to: Preset.paperE32.config)
        #expect(sigmoid.router == .deepSeek(groups: 1, groupsKept: 1, scalingFactor: 1))
        let grouped = try overrides(["--router", "sigmoid", "--groups", "4"]).apply(to: Preset.paperE32.config)
        #expect(grouped.router.groups == 4 && grouped.router.groupsKept == 1)
        try grouped.validate()
        // Fewer groups than the preset keeps: the kept count follows unless given.
        let two = try overrides(["--groups", "2"]).apply(to: deepseek)
        #expect(two.router.groups == 2 && two.router.groupsKept == 2)
        let kept = try overrides(["--groups", "16", "--groups-kept", "3"]).apply(to: deepseek)
        #expect(kept.router.groups == 16 && kept.router.groupsKept == 3)
        #expect(try overrides(["--router", "sigmoid"]).apply(to: deepseek) == deepseek)
        let noShared = try overrides(["--shared-intermediate", "0"]).apply(to: deepseek)
        #expect(noShared.sharedExpert == nil)
        #expect(
            try overrides(["--shared-intermediate", "64"]).apply(to: deepseek).sharedExpert?.intermediateSize == 64)
    }

    @Test func hostFactsParse() {
        let meminfo = "MemTotal:       32852856 kB\nMemFree:         1234 kB\nMemAvailable:   24240816 kB\n"
        #expect(HostMachine.parseMemAvailable(meminfo) == 24_240_816 * 1024)
        #expect(HostMachine.parseMemAvailable("MemTotal: 5 kB\n") == nil)
        #expect(
            HostMachine.parseCPUModel("processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core\nflags\t: fpu\n")
                == "AMD EPYC 9654 96-Core")
        #expect(HostMachine.parseCPUModel("processor : 0\nBogoMIPS : 50\nModel : Raspberry Pi 5\n") == "Raspberry Pi 5")
        #expect(HostMachine.parseCPUModel("processor : 0\n") == nil)
        #expect(HostMachine.utcTimestamp(0) == "1970-01-01T00:00:00Z")
        #expect(HostMachine.utcTimestamp(1_795_000_000) == "2026-11-18T11:06:40Z")
        if let available = HostMachine.availableMemoryBytes() { #expect(available > 0) }
    }

    @Test func memoryEstimateCountsWeightsCopiesAndActivations() {
        let paper = Preset.paperE32.config  // fp32, plain: 32·2048 router + 2·32·2048·2048 expert elements
        let elements = 32 * 2048 + 2 * 32 * 2048 * 2048
        let cpu = MemoryEstimate(config: paper, tokens: 256, backend: .cpu, randomWeights: true)
        #expect(cpu.weights == elements * 4 && cpu.backendCopy == elements * 4 && cpu.scratch == 0)
        #expect(cpu.activations == 2 * 256 * 2048 * 4 + 256 * 32 * 4 + 256 * 2 * (2 * 2048 + 2048) * 4)
        var bf16 = paper
        bf16.precision = .bf16
        let gpu = MemoryEstimate(config: bf16, tokens: 256, backend: .cuda, randomWeights: true)
        #expect(gpu.weights == elements * 2 && gpu.backendCopy == 0 && gpu.scratch == 32 * 2048 * 2048 * 4)
        #expect(gpu.activations == 2 * 256 * 2048 * 4)
        #expect(MemoryEstimate(config: bf16, tokens: 256, backend: .cuda, randomWeights: false).scratch == 0)
        do {
            try cpu.check(available: cpu.total - 1, subject: "this layer")
            Issue.record("expected a refusal")
        } catch {
            #expect(error.kind == .insufficientMemory)
            #expect(error.message.contains("--precision bf16") && error.message.contains("a machine with a GPU"))
        }
        #expect(throws: Never.self) { try cpu.check(available: cpu.total, subject: "x") }
        #expect(throws: Never.self) { try cpu.check(available: nil, subject: "x") }
        do {
            try gpu.check(available: 1, subject: "this layer")
        } catch {
            #expect(!error.message.contains("--precision bf16") && !error.message.contains("GPU"))
        }
    }

    /// The floors docs/performance.md lists, from the same method and rates.
    @Test func rooflineMatchesTheDesignTable() {
        var e64 = Preset.paperE64.config
        e64.precision = .tf32
        #expect(abs(Roofline.floorMilliseconds(config: e64, tokens: 8192, expertsTouched: 64) - 0.66) < 0.01)
        e64.precision = .bf16
        #expect(abs(Roofline.floorMilliseconds(config: e64, tokens: 8192, expertsTouched: 64) - 0.36) < 0.01)
        var deepseek = Preset.deepSeekV3.config
        deepseek.precision = .bf16
        let decode = Roofline.floorMilliseconds(config: deepseek, tokens: 64, expertsTouched: 222)
        #expect(abs(decode - 4.66) < 0.02)  // weight bytes dominate: 19.5 GB / 4.2 TB/s
        let bytes = Roofline.bytes(config: deepseek, tokens: 64, expertsTouched: 222)
        #expect(
            bytes
                == Double(
                    222 * 3 * 7168 * 2048 * 2 + 256 * 7168 * 2 + 256 * 4 + 3 * 7168 * 2048 * 2 + 64 * 7168 * (2 + 4)))
    }

    @Test func cpuBackendBenchmarksWithTheWallClock() throws {
        let config = MoEConfig(hiddenSize: 16, intermediateSize: 8, experts: 4, topK: 2)
        let backend = try CPUBackend(
            layer: MoELayer(config: config, weights: MoEWeights.random(config: config, seed: 1)))
        let x = randomInput(tokens: 4, hidden: 16, seed: 1)
        let result = try backend.benchmark(input: x, warmup: 0, iterations: 4)
        #expect(result.samples.count == 4 && result.samples.allSatisfy { $0 > 0 })
        #expect(result.method == "wall clock" && result.workspaceBytes == nil)
        #expect(throws: MoEError.self) { try backend.benchmark(input: x, warmup: -1, iterations: 1) }
        #expect(throws: MoEError.self) { try backend.benchmark(input: x, warmup: 0, iterations: 0) }
        #expect(throws: MoEError.self) {
            try backend.benchmark(input: randomInput(tokens: 4, hidden: 8, seed: 1), warmup: 0, iterations: 1)
        }
    }

    @Test func benchmarkRecordJSONParsesBack() throws {
        let record = BenchmarkRecord(
            backend: "cpu", preset: "p\"q", tokens: 3, precision: "fp32", medianMilliseconds: 0.5,
            minimumMilliseconds: 0.25, flops: 1e9, floorMilliseconds: nil, workspaceBytes: 12, date: "d",
            device: "CPU\\x", method: "wall clock", config: "c")
        let text = BenchmarkRecord.json([record, record])
        let parsed = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]])
        #expect(parsed.count == 2)
        #expect(parsed[0]["preset"] as? String == "p\"q" && parsed[0]["device"] as? String == "CPU\\x")
        #expect(parsed[0]["gflops"] as? Double == 2000 && parsed[0]["tflops"] as? Double == 2)
        #expect(parsed[0]["floor_ms"] is NSNull && parsed[0]["workspace_bytes"] as? Int == 12)
        var zero = record
        zero.medianMilliseconds = 0
        #expect(zero.gflops == nil && BenchmarkRecord.json([zero]).contains("\"gflops\":null"))
        #expect(parsed[0]["ranks"] == nil && parsed[0]["rank_devices"] == nil)
        var ranks = record
        ranks.ranks = 8
        ranks.rankDevices = [0, 1]
        let both = try #require(
            try JSONSerialization.jsonObject(with: Data(BenchmarkRecord.json([record, ranks]).utf8)) as? [[String: Any]])
        #expect(both[1]["ranks"] as? Int == 8 && both[1]["rank_devices"] as? [Int] == [0, 1])
    }

    @Test func reportFormatting() {
        #expect(formatNumber(12.3456) == "12.35" && formatNumber(0.0012345) == "0.001235")
        #expect(formatNumber(1234.5) == "1235" && formatNumber(-2.5e-7) == "-2.500e-7")
        #expect(formatNumber(3.2e9) == "3.200e9" && formatNumber(0) == "0")
        #expect(OutputNorms([3, -4]).l2 == 5 && OutputNorms([3, -4]).meanAbsolute == 3.5)
        #expect(OutputNorms([]).meanAbsolute == 0)
        #expect(
            LayerReport.describe(Preset.deepSeekV3.config)
                == "H=7168 I=2048 E=256 k=8, gated FFN, silu, sigmoid, 8 groups (4 kept), selection bias, renormalised, "
                + "scaling 2.5, shared expert I=2048, dropless, fp32")
        let routing = Routing(
            tokens: 2, topK: 2, expertIDs: [0, 1, 1, -1], weights: [0.5, 0.5, 1, 0], slots: [0, 0, -1, -1],
            expertLoad: [1, 2, 0])
        let load = LoadSummary(routing)
        #expect(
            load.text == "expert load: min 0 / mean 1.0 / max 2 tokens over 3 experts (2 used); "
                + "dropped 1 of 4 (token, expert) pairs; 1 unrouted (NaN logits), 0 tokens with no expert")
        let none = Routing(
            tokens: 2, topK: 2, expertIDs: [-1, -1, 1, -1], weights: [0, 0, 1, 0], slots: [-1, -1, 0, -1],
            expertLoad: [0, 1, 0])
        #expect(LoadSummary(none).text.hasSuffix("; 3 unrouted (NaN logits), 1 token with no expert"))
    }
}
