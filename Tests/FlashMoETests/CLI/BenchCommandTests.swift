import Foundation
import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// `flashmoe bench` in-process: the CPU on tiny shapes, and a fake GPU backend for the GPU-only parts.
@Suite struct BenchCommandTests {
    static let tiny = ["--hidden", "32", "--intermediate", "16", "--experts", "4", "--tokens", "8"]

    /// The objects of a `--json` file.
    func readJSON(_ path: String) throws -> [[String: Any]] {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        return try #require(try JSONSerialization.jsonObject(with: data) as? [[String: Any]])
    }

    /// The spread line: nearest-rank percentiles of the sorted runs, medians of the two halves in run order.
    @Test func spreadLineSummarisesTheRunsInOrder() {
        let text = BenchCommand.spreadText([5, 1, 2, 3, 4, 10, 6, 7, 8, 9])
        #expect(text == "spread: p10 1.000 ms, p90 9.000 ms; median of the first 5 runs 3.000 ms, of the last 5 8.000 ms")
        #expect(BenchCommand.spreadText([2]) == "spread: 1 run")
    }

    @Test func cpuBenchWritesTheJSONCompareReads() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/bench.json"
            let run = try flashmoeBench(Self.tiny + ["--backend", "cpu", "--iterations", "3", "--json", path])
            let entries = try readJSON(path)
            #expect(entries.count == 1)
            let e = try #require(entries.first)
            let keys: Set<String> = [
                "backend", "preset", "tokens", "precision", "median_ms", "min_ms", "tflops", "gflops", "floor_ms",
                "workspace_bytes", "date", "device", "method", "config", "samples_ms",
            ]
            #expect(Set(e.keys) == keys)
            // Every timed run in run order: the record's median and minimum are theirs.
            let samples = try #require(e["samples_ms"] as? [Double])
            #expect(samples == run.result.samplesMilliseconds && samples.count == 3)
            #expect(samples.min() == e["min_ms"] as? Double && samples.sorted()[1] == e["median_ms"] as? Double)
            #expect(e["backend"] as? String == "cpu" && e["preset"] as? String == "custom (from paper-e32)")
            #expect(e["tokens"] as? Int == 8 && e["precision"] as? String == "fp32")
            let median = try #require(e["median_ms"] as? Double)
            let minimum = try #require(e["min_ms"] as? Double)
            #expect(median > 0 && minimum > 0 && minimum <= median)
            var config = Preset.paperE32.config
            (config.hiddenSize, config.intermediateSize, config.experts) = (32, 16, 4)
            let gflops = try #require(e["gflops"] as? Double)
            let tflops = try #require(e["tflops"] as? Double)
            #expect(abs(gflops - config.flops(tokens: 8) / (median * 1e-3) / 1e9) <= 1e-9 * gflops)
            #expect(abs(tflops * 1000 - gflops) <= 1e-9 * gflops)
            #expect(e["floor_ms"] is NSNull && e["workspace_bytes"] is NSNull)
            #expect(e["device"] as? String == "Test CPU, \(cpuWorkerCount) threads")
            #expect(e["method"] as? String == "wall clock")
            let date = try #require(e["date"] as? String)
            #expect(date.count == 20 && date.hasSuffix("Z") && date.hasPrefix("20"))
            #expect(run.result.medianMilliseconds == median)
            #expect(run.text.contains("runs: 1 warm-up, 3 timed (wall clock), 8 tokens"))
            #expect(run.text.contains("GFLOP/s") && !run.text.contains("floor"))
        }
    }

    @Test func gpuBenchReportsTheFloorWorkspaceAndGPUName() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/bench.json"
            let run = try flashmoeBench(
                [
                    "--preset", "qwen3-30b-a3b", "--hidden", "64", "--intermediate", "32", "--experts", "16", "--top-k",
                    "2",
                    "--tokens", "4", "--precision", "bf16", "--json", path,
                ],
                context: .fakeGPU())
            let e = try #require(try readJSON(path).first)
            #expect(e["backend"] as? String == "cuda" && e["device"] as? String == "Fake GPU")
            #expect(e["method"] as? String == "fake events, 5 warm-up")  // the GPU defaults: 5 warm-up, 20 timed
            #expect(e["median_ms"] as? Double == 2 && e["workspace_bytes"] as? Int == 4096)
            // The floor counts the experts this input touched, as a CPU forward pass of the same layer routes it.
            let layer = try MoELayer(config: Self.qwenTiny, weights: MoEWeights.random(config: Self.qwenTiny, seed: 0))
            let routing = try CPUBackend(layer: layer).forward(randomInput(tokens: 4, hidden: 64, seed: 0)).routing
            let touched = routing.expertRows.filter { $0 > 0 }.count
            let floor = try #require(e["floor_ms"] as? Double)
            let expected = Roofline.floorMilliseconds(config: Self.qwenTiny, tokens: 4, expertsTouched: touched)
            #expect(abs(floor - expected) <= 1e-12 * expected)
            #expect(run.text.contains("floor: ") && run.text.contains("\(touched) of 16 experts touched"))
            #expect(run.text.contains("workspace: 4 KiB"))
            #expect(run.result.config == LayerReport.describe(Self.qwenTiny))
        }
    }

    static let qwenTiny: MoEConfig = {
        var c = Preset.qwen3_30bA3b.config
        (c.hiddenSize, c.intermediateSize, c.experts, c.topK, c.precision) = (64, 32, 16, 2, .bf16)
        return c
    }()

    @Test func badCountsAreRejected() {
        let warm = expectCommandFailure(mentioning: ["--warmup must be 0 or more"]) {
            try flashmoeBench(Self.tiny + ["--warmup=-1"])
        }
        #expect((warm as? CLIError)?.kind == .invalidValue)
        expectCommandFailure(mentioning: ["--iterations must be 1 or more"]) {
            try flashmoeBench(Self.tiny + ["--iterations", "0"])
        }
        expectCommandFailure(mentioning: ["--tokens must be 1 or more"]) {
            try flashmoeBench(["--hidden", "32", "--tokens", "0"])
        }
        expectCommandFailure(mentioning: ["unknown preset"]) { try flashmoeBench(["--preset", "paper"]) }
        let json = expectCommandFailure(mentioning: ["cannot write /nonexistent-dir/b.json"]) {
            try flashmoeBench(Self.tiny + ["--iterations", "1", "--json", "/nonexistent-dir/b.json"])
        }
        #expect((json as? CLIError)?.kind == .cannotWrite)
    }

    @Test func defaultsArePaperE32FP32OnAuto() throws {
        let command = try #require(try FlashMoECommand.parseAsRoot(["bench"]) as? BenchCommand)
        #expect(command.preset == "paper-e32" && command.common.precision == .fp32 && command.common.backend == .auto)
        #expect(command.warmup == nil && command.iterations == nil && command.tokens == nil)
        #expect(BenchCommand.Defaults.cudaIterations >= 20 && BenchCommand.Defaults.cudaWarmup >= 3)
        #expect(BenchCommand.Defaults.cpuIterations >= 3)
    }

    @Test func rankDevicesAreOrdinalLists() throws {
        #expect(try RankDevices.parse("0,0, 1") == [0, 0, 1])
        #expect(throws: CLIError.self) { try RankDevices.parse("0,x") }
        #expect(throws: CLIError.self) { try RankDevices.parse(",") }
        #expect(throws: CLIError.self) { try RankDevices.parse("-1") }
    }
}
