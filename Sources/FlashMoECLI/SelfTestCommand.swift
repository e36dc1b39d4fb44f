import ArgumentParser
import FlashMoE

/// `flashmoe selftest`: checks the CUDA layer end to end. The NVRTC checks (a broken kernel gives its log; the
/// cubin cache misses, hits and survives corruption) run anywhere NVRTC is; the GPU checks need a GPU. It fails
/// when any check fails, and when there is no usable GPU unless `--compiler-only` is given.
struct SelfTestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "selftest",
        abstract: "Check NVRTC, the cubin cache, and the GPU: copies, launches, cooperative launch.")

    @Option(help: "The GPU to test.")
    var device = 0

    @Flag(help: "Run only the NVRTC and cache checks (for machines without a GPU).")
    var compilerOnly = false

    func run() throws {
        let environment = ProcessEnvironment.current()
        let sources = KernelSources.current(environment: environment)
        let nvrtc = try NVRTC.shared.get()
        let gpu = compilerOnly ? nil : GPUAvailability.probe()
        let arch: GPUArchitecture
        if let gpu, case .success(let list) = gpu.devices, list.indices.contains(device) {
            arch = list[device].architecture
        } else {
            arch = GPUArchitecture(major: 9, minor: 0)
        }
        print("NVRTC \(nvrtc.version.major).\(nvrtc.version.minor) (\(nvrtc.path)), kernels \(sources), target \(arch)")
        var steps = CUDASelfTest.compilerChecks(backend: nvrtc, arch: arch, sources: sources)
        steps.forEach { print($0) }
        if let gpu {
            guard let driver = try? gpu.driver.get().driver, gpu.isUsable else {
                print("FAIL GPU checks: \(gpu.unusableReason ?? "no GPU") (use --compiler-only on a machine without one)")
                throw ExitCode.failure
            }
            let opened = try CUDADevice(ordinal: device, driver: driver)
            print("GPU \(device): \(InfoReport.describe(opened.properties, driver: driver))")
            let compiler = KernelCompiler(backend: nvrtc, environment: environment)
            let deviceSteps = CUDASelfTest.deviceChecks(device: opened, compiler: compiler, sources: sources)
            deviceSteps.forEach { print($0) }
            steps += deviceSteps
        }
        let failed = steps.filter { !$0.passed }.count
        print(failed == 0 ? "selftest passed (\(steps.count) checks)" : "selftest FAILED: \(failed) of \(steps.count) checks")
        if failed > 0 { throw ExitCode.failure }
    }
}
