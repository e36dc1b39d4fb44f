import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// `flashmoe bench --trace`: its argument checks, before anything is timed (the trace itself needs a GPU; the JSON
/// writer is tested on a synthetic buffer in KernelTraceTests).
@Suite struct BenchTraceTests {
    @Test func traceNeedsTheGPUAndAPositiveEventCount() {
        let tiny = ["--hidden", "32", "--intermediate", "16", "--experts", "4", "--tokens", "8", "--iterations", "1"]
        let cpu = expectCommandFailure(mentioning: ["--trace needs the CUDA backend"]) {
            try flashmoeBench(tiny + ["--backend", "cpu", "--trace", "/tmp/never-written.json"])
        }
        #expect((cpu as? CLIError)?.kind == .invalidValue)
        expectCommandFailure(mentioning: ["--trace-events must be 1 or more"]) {
            try flashmoeBench(tiny + ["--precision", "bf16", "--trace", "/tmp/never.json", "--trace-events", "0"],
                              context: .fakeGPU())
        }
    }
}
