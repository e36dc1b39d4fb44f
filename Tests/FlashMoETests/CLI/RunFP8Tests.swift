import Testing
@testable import FlashMoE

/// `flashmoe run --precision fp8` end to end on the CPU: on the FP8 checkpoint fixture (codes kept) and on a preset
/// (quantized at load), against the oracle's output for the same layer.
@Suite struct RunFP8Tests {
    @Test func anFP8CheckpointRunsAsItIsStored() throws {
        try withTemporaryDirectory { dir in
            let layer = try FP8CheckpointTests.writeDeepSeek(dir)
            let x = try Fixture.input(tokens: 12, hidden: 256, seed: 3, as: .bfloat16)
            let input = dir + "/x.safetensors"
            try Safetensors.write(["x": SafetensorsTensor(x)], to: input)
            let run = try flashmoeRun([
                "--checkpoint", dir, "--layer", "0", "--input", input, "--precision", "fp8", "--backend", "oracle",
            ])
            #expect(run.text.contains("fp8"), "\(run.text)")
            let expected = try CPUBackend(layer: layer, mode: .oracle).forward(x).output.floats()
            #expect(run.result.output.floats().map(\.bitPattern) == expected.map(\.bitPattern))
        }
    }

    @Test func aPresetIsQuantizedOnce() throws {
        let arguments = ["--preset", "qwen3-30b-a3b", "--experts", "8", "--hidden", "256", "--intermediate", "128",
                         "--tokens", "20", "--seed", "5"]
        let fast = try flashmoeRun(arguments + ["--precision", "fp8", "--backend", "cpu"]).result.output.floats()
        let oracle = try flashmoeRun(arguments + ["--precision", "fp8", "--backend", "oracle"]).result.output.floats()
        let bf16 = try flashmoeRun(arguments + ["--precision", "bf16", "--backend", "oracle"]).result.output.floats()
        #expect(relativeError(fast, oracle) <= Precision.fp8.tolerance)
        let e = relativeError(oracle, bf16)
        #expect(e > 1e-3 && e < 0.08, "fp8 against bf16: \(e)")
    }
}
