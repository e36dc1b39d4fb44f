import Testing

@testable import FlashMoE
@testable import FlashMoECLI

@Suite struct CLITests {
    @Test func infoSaysWhatIsUsableAndWhyNot() {
        let text = InfoReport.render(TestEnvironment.gpu, environment: ["HOME": "/h", "FLASHMOE_KERNEL_DIR": ""])
        #expect(text.hasPrefix("CPU backend: usable, \(cpuWorkerCount) worker threads\n"))
        #expect(text.contains("CUDA backend: "))
        #expect(text.contains("kernel sources: embedded in the binary") && text.contains("selftest.cu"))
        #expect(text.contains("cubin cache: /h/.cache/flashmoe"))
        if let reason = TestEnvironment.gpu.unusableReason {
            #expect(text.contains("not usable: \(reason)"))
        }
        if TestEnvironment.nvrtc == nil {
            #expect(text.contains("NVRTC not found") && text.contains("/usr/local/cuda/lib64/libnvrtc.so.13"))
        } else {
            #expect(text.contains("NVRTC \(TestEnvironment.nvrtc!.version.major)."))
        }
    }

    @Test func theCommandsAreRegistered() throws {
        #expect(try FlashMoECommand.parseAsRoot(["info"]) is InfoCommand)
        let compile = try #require(try FlashMoECommand.parseAsRoot(["compile", "--preset", "qwen3-30b-a3b"]) as? CompileCommand)
        #expect(compile.arch == "sm_80,sm_90a" && compile.preset == ["qwen3-30b-a3b"])
        #expect(!compile.storageRows && !compile.trace)
        let extra = try #require(try FlashMoECommand.parseAsRoot(["compile", "--storage-rows", "--trace"]) as? CompileCommand)
        #expect(extra.storageRows && extra.trace)
        #expect(try FlashMoECommand.parseAsRoot(["selftest", "--compiler-only"]) is SelfTestCommand)
    }
}
