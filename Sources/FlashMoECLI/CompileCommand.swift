import ArgumentParser
import FlashMoE

/// `flashmoe compile`: builds every kernel specialization the presets use with NVRTC alone (no GPU needed), and
/// reports size, registers, spills, time and cache use per kernel. Any failure exits non-zero with NVRTC's log.
struct CompileCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compile",
        abstract: "Compile the kernels the presets use, with NVRTC only (no GPU needed).")

    @Option(help: "Comma-separated targets, e.g. sm_80,sm_90a or sm_86,sm_89,sm_120 (99 KiB of shared memory per block).")
    var arch = "sm_80,sm_90a"

    @Option(help: "A preset whose kernels to compile (repeatable; default: every preset).")
    var preset: [String] = []

    @Option(help: "Comma-separated precisions to compile each preset in (fp8: sm_90a and sm_89, with FLASHMOE_EXPERIMENTAL_FP8=1).")
    var precision = "fp32,tf32,bf16,fp16"

    @Flag(help: "Keep line information for profilers (-lineinfo).")
    var lineinfo = false

    @Flag(help: "Compile without reading or writing the cubin cache.")
    var noCache = false

    @Flag(help: "Also compile each preset as 4 expert-parallel ranks (bf16/fp16 also with storage returns).")
    var ranks = false

    @Flag(help: "Also compile each preset's one-GPU builds with the routed experts' rows in the storage type (FLASHMOE_STORAGE_ROWS=1; bf16, fp16, fp8).")
    var storageRows = false

    @Flag(help: "Also compile each preset's tracing builds (flashmoe bench --trace).")
    var trace = false

    @Option(help: "ipc: the NVRTC cubins every operator loads. nvshmem: the ranks kernel with the NVSHMEM transport, compiled to LTO-IR and linked with NVSHMEM's device library by nvJitLink (docs/multinode.md).")
    var transport: RankTransport = .ipc

    @Option(help: "With --transport nvshmem: the rank count the ranks kernel is built for.")
    var nvshmemRanks = 2

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
        if transport == .nvshmem { return try runNVSHMEM(configs: configs, archs: archs, environment: environment) }
        let nvrtc = try NVRTC.shared.get()
        let compiler =
            noCache
            ? KernelCompiler(backend: nvrtc, cache: nil) : KernelCompiler(backend: nvrtc, environment: environment)
        print("NVRTC \(nvrtc.version.major).\(nvrtc.version.minor) (\(nvrtc.path)); cache: "
            + (compiler.cache?.directory ?? compiler.cacheDisabledReason))
        var ok = true
        for arch in archs {
            // Stages follow each target's shared memory per block, so each target has its own specialisations; a
            // configuration that fits none of them is a failure here, not a silent omission.
            for c in configs {
                do throws(MoEError) {
                    _ = try FusedSpecialization(config: c, arch: arch)
                } catch {
                    ok = false
                    print("\(LayerReport.describe(c)) \(arch): FAIL: \(error)")
                }
            }
            ok = CompileReport.run(
                specs: KernelCatalog.specializations(for: configs, arch: arch)
                    + (ranks ? KernelCatalog.expertParallel(for: configs, arch: arch) : [])
                    + (storageRows ? KernelCatalog.storageRows(for: configs, arch: arch) : [])
                    + (trace ? KernelCatalog.traced(for: configs, arch: arch) : []),
                archs: [arch], compiler: compiler,
                sources: KernelSources.current(environment: environment), lineInfo: lineinfo) { print($0) } && ok
        }
        if !ok { throw ExitCode.failure }
    }
}

extension CompileCommand {
    /// `--transport nvshmem`: every preset × precision's ranks kernel for `--nvshmem-ranks` ranks, built and linked.
    func runNVSHMEM(configs: [MoEConfig], archs: [GPUArchitecture], environment: [String: String]) throws {
        guard nvshmemRanks >= 2 else { throw CLIError(.invalidValue, "--nvshmem-ranks must be at least 2 (got \(nvshmemRanks))") }
        var builder = try NVSHMEMKernelBuilder.fromEnvironment(environment)
        if noCache {
            builder = NVSHMEMKernelBuilder(compiler: builder.compiler, linker: builder.linker, kit: builder.kit, cache: nil)
        }
        print("NVSHMEM transport: \(builder.compiler.identity), \(builder.linker.api.identity); \(builder.kit)")
        var specs: [KernelSpec] = []
        for config in configs {
            guard let spec = try? FusedSpecialization(config: config, ranks: nvshmemRanks, tmaEngine: false).kernelSpec, !specs.contains(spec) else {
                continue
            }
            specs.append(spec)
        }
        let sources = KernelSources.current(environment: environment)
        let ok = CompileReport.run(specs: specs, archs: archs, print: { print($0) }) { spec, arch in
            try builder.build(spec, arch: arch, sources: sources)
        }
        if !ok { throw ExitCode.failure }
    }
}

/// Compiles specs × archs and prints one line per cubin and one per kernel; returns false if anything failed.
enum CompileReport {
    static func run(
        specs: [KernelSpec], archs: [GPUArchitecture], compiler: KernelCompiler, sources: KernelSources,
        lineInfo: Bool, print: (String) -> Void
    ) -> Bool {
        run(specs: specs, archs: archs, print: print) { spec, arch in
            try compiler.compile(spec, arch: arch, sources: sources, lineInfo: lineInfo)
        }
    }

    /// The same over any `build` (NVRTC's cubins, or the NVSHMEM link).
    static func run(
        specs: [KernelSpec], archs: [GPUArchitecture], print: (String) -> Void,
        build: (KernelSpec, GPUArchitecture) throws -> CompiledKernel
    ) -> Bool {
        var ok = true
        for spec in specs {
            for arch in archs {
                do {
                    let kernel = try build(spec, arch)
                    print("\(spec) \(arch): \(formatByteCount(kernel.cubin.count)) cubin, "
                        + "\(formatDecimal(kernel.time.milliseconds, 1)) ms, cache \(kernel.cache)"
                        + (kernel.cacheWriteFailure.map { " (not stored: \($0))" } ?? ""))
                    let dynamic = spec.defines["FMOE_DYNAMIC_SMEM"].flatMap { Int($0) }
                    let limit = try? ArchitectureLimits.of(arch).sharedMemoryPerBlockOptIn
                    for usage in kernel.resources {
                        var shared = "shared \(usage.sharedBytes) B"
                        var overLimit = false
                        if let dynamic, let limit {
                            // What a launch needs per block against what the architecture allows.
                            shared += " + \(dynamic) B dynamic (stages \(spec.defines["FMOE_STAGES"] ?? "?")) of \(limit) B"
                            overLimit = usage.sharedBytes + dynamic > limit
                        }
                        if overLimit { ok = false }
                        print("  \(usage.name): \(usage.registers) registers, spills \(usage.spillStoreBytes) B "
                            + "stored / \(usage.spillLoadBytes) B loaded, stack \(usage.stackFrameBytes) B, "
                            + shared + (usage.spills ? "  <-- SPILLS" : "")
                            + (overLimit ? "  FAIL: more shared memory than \(arch) allows" : ""))
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
