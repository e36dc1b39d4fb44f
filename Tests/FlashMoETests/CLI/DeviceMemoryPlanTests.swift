import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// `run` and `bench` check the GPU's free memory for the layer and token count before they make any weights:
/// `--backend cuda` refuses with the typed error, `auto` falls back to the CPU and says why.
@Suite struct DeviceMemoryPlanTests {
    static let refusal = DeviceMemoryError(
        deviceOrdinal: 0, deviceName: "Fake GPU", estimate: FusedMemoryEstimate(
            weightBytes: 60 << 30, workspaceBytes: 8 << 30, controlBytes: 0, tokens: 131_072),
        freeBytes: 40 << 30, totalBytes: 80 << 30, tokensThatFit: nil, suggestions: ["use --precision bf16"])

    /// A fake GPU whose memory check refuses, recording the (tokens, device) it was asked about.
    static func fullGPU() -> MachineContext {
        var context = MachineContext.fakeGPU(make: { _, _ in
            Issue.record("the CUDA backend must not be built when the layer does not fit")
            throw CUDAError.noDevice(detail: "unreachable")
        })
        context.checkDeviceMemory = { config, tokens, device in
            if tokens == 300 && device == 0 && config.experts == 4 { throw Self.refusal }
        }
        return context
    }

    static let tiny = ["--hidden", "32", "--intermediate", "16", "--experts", "4", "--tokens", "300"]

    @Test func cudaRefusesWithTheTypedError() {
        let error = expectCommandFailure(mentioning: ["GPU 0 (Fake GPU)", "40 GiB free", "use --precision bf16"]) {
            try flashmoeRun(Self.tiny + ["--backend", "cuda"], context: Self.fullGPU())
        }
        #expect(error is DeviceMemoryError)
    }

    @Test func autoFallsBackToTheCPU() throws {
        let run = try flashmoeRun(Self.tiny, context: Self.fullGPU())
        #expect(run.text.contains("backend: cpu (auto: the layer does not fit in GPU 0's memory)"))
    }

    @Test func aLayerThatFitsRunsOnTheGPU() throws {
        var context = MachineContext.fakeGPU()
        context.checkDeviceMemory = { _, _, _ in }
        let run = try flashmoeBench(Self.tiny + ["--iterations", "2"], context: context)
        #expect(run.text.contains("backend: cuda"))
    }
}
