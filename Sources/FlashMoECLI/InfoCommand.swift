import ArgumentParser
import FlashMoE

/// `flashmoe info`: which backends work on this machine, and if CUDA does not, exactly why.
struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Show the usable backends: CPU threads, the CUDA driver and GPUs, NVRTC, kernel sources, cache.")

    func run() throws {
        let environment = ProcessEnvironment.current()
        print(InfoReport.render(GPUAvailability.probe(), environment: environment), terminator: "")
    }
}

/// The text of `flashmoe info`.
enum InfoReport {
    static func render(_ gpu: GPUAvailability, environment: [String: String]) -> String {
        var out = "CPU backend: usable, \(cpuWorkerCount) worker threads\n"
        out += "CUDA backend: " + (gpu.unusableReason.map { "not usable: \($0)" } ?? "usable") + "\n"
        out += driverSection(gpu)
        out += nvrtcSection(gpu.nvrtc)
        let sources = KernelSources.current(environment: environment)
        let files = (try? sources.fileNames()) ?? []
        out += "  kernel sources: \(sources) (\(files.count) files: \(files.joined(separator: ", ")))\n"
        if let dir = CubinCache.defaultDirectory(environment: environment) {
            out += "  cubin cache: \(dir) (\(CubinCache(directory: dir).entryCount()) entries)\n"
        } else {
            out += "  cubin cache: off (set FLASHMOE_CACHE_DIR or HOME)\n"
        }
        return out
    }

    private static func driverSection(_ gpu: GPUAvailability) -> String {
        switch gpu.driver {
        case .failure(let error):
            return indent("driver: \(error)", by: 2)
        case .success(let loaded):
            var out = "  driver: CUDA \(loaded.version), \(loaded.driver.libraryPath) (entry points via "
                + "\(loaded.driver.resolution))\n"
            switch gpu.devices {
            case .failure(let error): out += indent("GPUs: \(error)", by: 2)
            case .success(let list) where list.isEmpty: out += "  GPUs: none visible\n"
            case .success(let list):
                for properties in list { out += "  " + describe(properties, driver: loaded.driver) + "\n" }
            }
            return out
        }
    }

    static func describe(_ p: CUDADeviceProperties, driver: CUDADriver) -> String {
        let free = (try? CUDADevice(ordinal: p.ordinal, driver: driver).memoryInfo().free)
            .map { " (\(formatByteCount($0)) free)" } ?? ""
        return "GPU \(p.ordinal): \(p.name), compute \(p.computeCapability) → \(p.architecture), "
            + "\(p.multiprocessorCount) SMs, \(formatByteCount(p.totalMemoryBytes))\(free), "
            + "L2 \(formatByteCount(p.l2CacheBytes)), shared memory \(formatByteCount(p.sharedMemoryPerBlockOptIn))"
            + "/block opt-in, \(formatByteCount(p.sharedMemoryPerMultiprocessor))/SM, "
            + "cooperative launch: \(p.cooperativeLaunch ? "yes" : "no")"
    }

    private static func nvrtcSection(_ nvrtc: Result<NVRTC, CUDAError>) -> String {
        switch nvrtc {
        case .failure(let error):
            return indent("NVRTC: \(error)", by: 2)
        case .success(let n):
            var out = "  NVRTC \(n.version.major).\(n.version.minor): \(n.path)\n"
            out += "    targets: \(n.supportedArchitectures.map { "sm_\($0)" }.joined(separator: " "))\n"
            out += "    builtins: \(n.builtins)\n"
            if !n.earlierAttempts.isEmpty {
                out += "    tried before it:\n"
                out += n.earlierAttempts.map { "      \($0)\n" }.joined()
            }
            return out
        }
    }

    private static func indent(_ text: String, by spaces: Int) -> String {
        let pad = String(repeating: " ", count: spaces)
        return text.split(separator: "\n", omittingEmptySubsequences: false).map { pad + $0 }.joined(separator: "\n")
            + "\n"
    }
}
