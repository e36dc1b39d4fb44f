#if canImport(Glibc)
    import Glibc
#endif
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

    @Test func fuzzFP8DrawsFP8LayersAndReplaysThem() throws {
        let index = try #require((0..<200).first {
            let c = FuzzCase(seed: 6, index: $0, fp8: true)
            return c.isQuick && c.config.precision == .fp8 && c.tokens > 0
        })
        let c = FuzzCase(seed: 6, index: index, fp8: true)
        let run = try flashmoe(
            FuzzCommand.self, ["--seed", "6", "--case", "\(index)", "--fp8", "--backend", "cpu", "--verbose"],
            context: .noGPU())
        #expect(run.lines.last == "fuzz: 1 passed, 0 failed")
        #expect(run.text.contains("case \(index) seed 6: \(c.summary): passed") && c.summary.contains("fp8"))
        // Without --fp8 the same index is another (non-fp8) layer.
        #expect(FuzzCase(seed: 6, index: index).config.precision != .fp8)
    }

    @Test func fuzzRejectsBadOptions() {
        expectCommandFailure(mentioning: ["--case"]) {
            _ = try flashmoe(FuzzCommand.self, ["--case", "-1", "--backend", "cpu"], context: .noGPU())
        }
        expectCommandFailure(mentioning: ["--max-seconds"]) {
            _ = try flashmoe(FuzzCommand.self, ["--max-seconds", "0", "--backend", "cpu"], context: .noGPU())
        }
        if !FusedSpecialization.supportsFP8 {
            expectCommandFailure(mentioning: ["--fp8", "FLASHMOE_EXPERIMENTAL_FP8=1"]) {
                _ = try flashmoe(FuzzCommand.self, ["--fp8", "--cases", "1", "--backend", "cuda"], context: .noGPU())
            }
        }
    }

    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason))
    func compileOnlyBuildsACasesKernelsWithoutAGPU() throws {
        let index = try #require((0..<50).first { FuzzCase(seed: 3, index: $0).shape.ranks ?? 0 > 1 })
        let run = try flashmoe(
            FuzzCommand.self, ["--seed", "3", "--case", "\(index)", "--compile-only", "sm_80"], context: .noGPU())
        #expect(run.result == FuzzCommand.Summary() && run.lines.isEmpty)
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

/// How a fuzz run continues in a new process after a kernel fault lost the CUDA context.
@Suite struct FuzzContinuationTests {
    /// The `flashmoe` binary built next to this test bundle, if there is one.
    static let binary: String? = {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        var dir = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        while let slash = dir.lastIndex(of: "/"), slash != dir.startIndex {
            dir = String(dir[..<slash])
            if access(dir + "/flashmoe", X_OK) == 0 { return dir + "/flashmoe" }
        }
        return nil
    }()

    @Test func theCountLineIsParsed() {
        #expect(FuzzContinuation.parseCounts("fuzz: 1990 passed, 3 failed")! == (1990, 3))
        #expect(FuzzContinuation.parseCounts("fuzz: 12 cases in 3.0 s (4.0 cases/s)") == nil)
        #expect(FuzzContinuation.parseCounts("case 3 seed 1: fuzz: 1 passed, 2 failed") == nil)
    }

    @Test func theContinuationStartsAfterTheFaultWithTheTimeLeft() throws {
        let command = try #require(
            try FlashMoECommand.parseAsRoot(["fuzz", "--cases", "2000", "--seed", "9", "--backend", "cuda", "--quick",
                                             "--max-seconds", "230"]) as? FuzzCommand)
        #expect(command.continuation(after: 417, seconds: 100) == [
            "fuzz", "--cases", "2000", "--seed", "9", "--backend", "cuda", "--device", "0", "--first-case", "418",
            "--max-seconds", "100.0", "--quick",
        ])
    }

    @Test(.enabled(if: binary != nil, "needs the flashmoe binary built next to the tests"))
    func aContinuingProcessPassesItsLinesAndCounts() throws {
        var lines: [String] = []
        let counts = FuzzContinuation.run(
            executable: try #require(Self.binary),
            arguments: ["fuzz", "--cases", "40", "--first-case", "30", "--seed", "5", "--backend", "cpu", "--quick"]
        ) { lines.append($0) }
        let quick = (30..<40).filter { FuzzCase(seed: 5, index: $0).isQuick }.count
        #expect(counts.map { [$0.passed, $0.failed] } == [quick, 0])
        #expect(lines.first?.hasPrefix("fuzz: \(quick) cases of seed 5 on the cpu backend") == true)
        #expect(!lines.contains { $0.hasSuffix("passed, 0 failed") })
    }
}
