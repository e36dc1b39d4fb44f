import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// Machines for driving `run` and `bench` in-process: no GPU unless one is faked, memory as given.
extension MachineContext {
    /// A machine without a usable GPU.
    static func noGPU(memory: Int? = nil) -> MachineContext {
        MachineContext(
            gpu: { GPUStatus(unusableReason: "no GPU in this test", deviceNames: []) },
            makeCUDA: { _, _ in throw CUDAError.noDevice(detail: "the test machine has no GPU") },
            availableMemory: { memory }, cpuModel: { "Test CPU" })
    }

    /// A machine with one usable fake GPU whose CUDA backend is `make` (a `FakeGPUBackend` by default).
    static func fakeGPU(
        make: @escaping @Sendable (MoELayer, Int) throws -> any BenchmarkableBackend = { layer, _ in
            try FakeGPUBackend(layer: layer)
        }
    ) -> MachineContext {
        MachineContext(
            gpu: { GPUStatus(unusableReason: nil, deviceNames: ["Fake GPU"]) }, makeCUDA: make,
            availableMemory: { nil }, cpuModel: { "Test CPU" })
    }
}

/// Stands in for the fused operator: the CPU's results under the name "cuda", and a benchmark that reports
/// its arguments (each sample is 2 ms; the method names the warm-up and iteration counts) and a workspace.
struct FakeGPUBackend: BenchmarkableBackend {
    let cpu: CPUBackend
    init(layer: MoELayer) throws { cpu = try CPUBackend(layer: layer) }
    var name: String { "cuda" }
    var layer: MoELayer { cpu.layer }
    func forward(_ input: HostTensor) throws -> MoEOutput { try cpu.forward(input) }
    func benchmark(input: HostTensor, warmup: Int, iterations: Int) throws -> BenchmarkResult {
        BenchmarkResult(
            samples: [Double](repeating: 2, count: iterations), method: "fake events, \(warmup) warm-up",
            workspaceBytes: 4096)
    }
}

/// What a command printed and returned.
struct CommandRun<Result> {
    var lines: [String]
    var result: Result
    var text: String { lines.joined(separator: "\n") }
}

/// Parses `["run"] + arguments` (or another subcommand of type `C`) and runs it on `context`.
func flashmoe<C: ReportingCommand>(_ type: C.Type, _ arguments: [String], context: MachineContext) throws
    -> CommandRun<C.Result>
{
    let name = C.configuration.commandName ?? ""
    let command = try #require(try FlashMoECommand.parseAsRoot([name] + arguments) as? C)
    var lines: [String] = []
    let result = try command.execute(context: context) { lines.append($0) }
    return CommandRun(lines: lines, result: result)
}

/// `flashmoe run ARGUMENTS` on `context`.
@discardableResult
func flashmoeRun(_ arguments: [String], context: MachineContext = .noGPU()) throws -> CommandRun<MoEOutput> {
    try flashmoe(RunCommand.self, arguments, context: context)
}

/// `flashmoe bench ARGUMENTS` on `context`.
@discardableResult
func flashmoeBench(_ arguments: [String], context: MachineContext = .noGPU()) throws -> CommandRun<BenchmarkRecord> {
    try flashmoe(BenchCommand.self, arguments, context: context)
}

/// Runs `body`, expects it to throw, and checks what the user would see: a non-zero exit status and a message
/// containing every string of `mentions`. Returns the error for further checks.
@discardableResult
func expectCommandFailure(
    mentioning mentions: [String], sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void
) -> (any Error)? {
    do {
        try body()
        Issue.record("expected the command to fail", sourceLocation: sourceLocation)
        return nil
    } catch {
        let message = FlashMoECommand.message(for: error)
        #expect(FlashMoECommand.exitCode(for: error) != .success, sourceLocation: sourceLocation)
        for m in mentions {
            #expect(message.contains(m), "message: \(message)", sourceLocation: sourceLocation)
        }
        return error
    }
}
