import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// `flashmoe fuzz` and `flashmoe soak` in-process on the CPU backend: the lines the lead's GPU runs are read by.
@Suite struct FuzzSoakCommandTests {
    @Test func fuzzEndsWithTheCountLine() throws {
        let quick = (0..<30).filter { FuzzCase(seed: 5, index: $0).isQuick }.count
        let run = try flashmoe(FuzzCommand.self, ["--cases", "30", "--seed", "5", "--backend", "cpu", "--quick"],
                               context: .noGPU())
        #expect(quick > 10)
        #expect(run.result == FuzzCommand.Summary(passed: quick, failed: 0, notRun: 0))
        #expect(run.lines.last == "fuzz: \(quick) passed, 0 failed")
        #expect(run.lines.first == "fuzz: \(quick) cases of seed 5 on the cpu backend (fast FP32; shapes with ranks run "
            + "as one rank) (--quick: \(30 - quick) larger cases left out)")
    }

    @Test func fuzzReplaysOneCase() throws {
        let index = try #require((0..<100).first { FuzzCase(seed: 5, index: $0).isQuick && $0 > 5 })
        let run = try flashmoe(FuzzCommand.self, ["--seed", "5", "--case", "\(index)", "--backend", "cpu", "--verbose"],
                               context: .noGPU())
        #expect(run.lines.last == "fuzz: 1 passed, 0 failed")
        #expect(run.text.contains("case \(index) seed 5: \(FuzzCase(seed: 5, index: index).summary): passed"))
    }

    @Test func fuzzAutoRunsOnTheCPUWithoutAGPUAndStopsAtTheTimeLimit() throws {
        let run = try flashmoe(FuzzCommand.self, ["--cases", "50", "--max-seconds", "1e-9"], context: .noGPU())
        #expect(run.text.contains("CUDA not usable"))
        #expect(run.text.contains("0 of 50 cases ran"))
        #expect(run.result.notRun == 50 && run.lines.last == "fuzz: 0 passed, 0 failed")
    }

    @Test func fuzzRejectsBadOptions() {
        expectCommandFailure(mentioning: ["--case"]) {
            _ = try flashmoe(FuzzCommand.self, ["--case", "-1", "--backend", "cpu"], context: .noGPU())
        }
        expectCommandFailure(mentioning: ["--max-seconds"]) {
            _ = try flashmoe(FuzzCommand.self, ["--max-seconds", "0", "--backend", "cpu"], context: .noGPU())
        }
    }

    @Test func aLostContextIsTold() {
        let lost = CUDAError.driver(call: "cuCtxSynchronize", code: 700, name: "CUDA_ERROR_ILLEGAL_ADDRESS", text: "",
                                    hint: nil)
        #expect(FuzzTarget.contextLost(lost))
        #expect(!FuzzTarget.contextLost(CUDAError.invalidArgument("x")))
    }

    @Test func soakEndsWithItsSummary() throws {
        let run = try flashmoe(SoakCommand.self, ["--calls", "40", "--backend", "cpu"], context: .noGPU())
        let last = try #require(run.lines.last)
        #expect(last.hasPrefix("soak: 40 calls, 32 shapes on 4 layers"))
        #expect(last.hasSuffix("same bits per shape: passed"))
        #expect(run.result.passed)
    }
}
