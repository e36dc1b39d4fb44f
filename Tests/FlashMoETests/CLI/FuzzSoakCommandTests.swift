import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// `flashmoe fuzz` and `flashmoe soak` in-process on the CPU backend: the lines the lead's GPU runs are read by.
@Suite struct FuzzSoakCommandTests {
    @Test func fuzzEndsWithTheCountLine() throws {
        let run = try flashmoe(FuzzCommand.self, ["--cases", "12", "--seed", "5", "--backend", "cpu"], context: .noGPU())
        #expect(run.result == FuzzCommand.Summary(passed: 12, failed: 0, notRun: 0))
        #expect(run.lines.last == "fuzz: 12 passed, 0 failed")
        #expect(run.lines.first?.hasPrefix("fuzz: 12 cases of seed 5 on the cpu backend") == true)
    }

    @Test func fuzzReplaysOneCase() throws {
        let run = try flashmoe(FuzzCommand.self, ["--seed", "5", "--case", "7", "--backend", "cpu", "--verbose"],
                               context: .noGPU())
        #expect(run.lines.last == "fuzz: 1 passed, 0 failed")
        #expect(run.text.contains("case 7 seed 5: \(FuzzCase(seed: 5, index: 7).summary): passed"))
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
