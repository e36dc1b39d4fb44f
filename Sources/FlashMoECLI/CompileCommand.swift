import ArgumentParser
import FlashMoE

/// `flashmoe compile`: builds every kernel specialization the presets use with NVRTC alone (no GPU needed), and
/// reports size, registers, spills, time and cache use per kernel. Any failure exits non-zero with NVRTC's log.
struct CompileCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compile",
        abstract: "Compile the kernels the presets use, with NVRTC only (no GPU needed).")

    @Option(help: "Comma-separated targets, e.g. sm_80,sm_90a.")
    var arch = "sm_80,sm_90a"

    @Option(help: "A preset whose kernels to compile (repeatable; default: every preset).")
    var preset: [String] = []

    @Option(help: "Comma-separated precisions to compile each preset in (fp8: sm_90a, with FLASHMOE_EXPERIMENTAL_FP8=1).")
    var precision = "fp32,tf32,bf16,fp16"

    @Flag(help: "Keep line information for profilers (-lineinfo).")
    var lineinfo = false

    @Flag(help: "Compile without reading or writing the cubin cache.")
    var noCache = false

    func run() throws {
        let environment = ProcessEnvironment.current()
        let archs = try GPUArchitecture.parseList(arch)
        let presets = try preset.isEmpty ? Preset.all : preset.map { name throws(MoEError) in try Preset.named(name) }
        let precisions = try precision.split(separator: ",").map { name throws(MoEError) -> Precision in
            let trimmed = String(name.filter { !$0.isWhitespace })
            guard let p = Precision(rawValue: trimmed) else {
                throw MoEError(.invalidConfig, "unknown precision '\(trimmed)': choose from fp32, tf32, bf16, fp16, fp8")
            }
            return p
        }
        let configs = presets.flatMap { p in
            precisions.map { precision in
                var c = p.config
                c.precision = precision
                return c
            }
        }
        let nvrtc = try NVRTC.shared.get()
        let compiler =
            noCache
            ? KernelCompiler(backend: nvrtc, cache: nil) : KernelCompiler(backend: nvrtc, environment: environment)
        print("NVRTC \(nvrtc.version.major).\(nvrtc.version.minor) (\(nvrtc.path)); cache: "
            + (compiler.cache?.directory ?? compiler.cacheDisabledReason))
        let ok = CompileReport.run(
            specs: KernelCatalog.specializations(for: configs), archs: archs, compiler: compiler,
            sources: KernelSources.current(environment: environment), lineInfo: lineinfo) { print($0) }
        if !ok { throw ExitCode.failure }
    }
}

/// Compiles specs × archs and prints one line per cubin and one per kernel; returns false if anything failed.
enum CompileReport {
    static func run(
        specs: [KernelSpec], archs: [GPUArchitecture], compiler: KernelCompiler, sources: KernelSources,
        lineInfo: Bool, print: (String) -> Void
    ) -> Bool {
        var ok = true
        for spec in specs {
            for arch in archs {
                do throws(CUDAError) {
                    let kernel = try compiler.compile(spec, arch: arch, sources: sources, lineInfo: lineInfo)
                    print("\(spec) \(arch): \(formatByteCount(kernel.cubin.count)) cubin, "
                        + "\(formatDecimal(kernel.time.milliseconds, 1)) ms, cache \(kernel.cache)"
                        + (kernel.cacheWriteFailure.map { " (not stored: \($0))" } ?? ""))
                    for usage in kernel.resources {
                        print("  \(usage.name): \(usage.registers) registers, spills \(usage.spillStoreBytes) B "
                            + "stored / \(usage.spillLoadBytes) B loaded, stack \(usage.stackFrameBytes) B, "
                            + "shared \(usage.sharedBytes) B" + (usage.spills ? "  <-- SPILLS" : ""))
                    }
                    let missing = spec.kernels.filter { name in !kernel.resources.contains { $0.name == name } }
                    if kernel.resources.isEmpty {
                        // No ptxas statistics at all: the kernels cannot be checked from the log (seen once with the
                        // toolkit's NVRTC on a GPU host); show the log instead of failing on an unknown format.
                        print("  note: no ptxas statistics in NVRTC's log (\(kernel.log.utf8.count) bytes):\n"
                            + kernel.log.split(whereSeparator: \.isNewline).prefix(12).map { "    \($0)" }
                            .joined(separator: "\n"))
                    } else if !missing.isEmpty {
                        ok = false
                        print("  FAIL: \(spec.file) defines no kernel named \(missing.joined(separator: ", ")) "
                            + "(compiled: \(kernel.resources.map(\.name).joined(separator: ", ")))")
                    }
                } catch {
                    ok = false
                    print("\(spec) \(arch): FAIL\n\(error)")
                }
            }
        }
        return ok
    }
}
