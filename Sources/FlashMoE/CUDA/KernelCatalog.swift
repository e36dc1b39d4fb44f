/// One kernel specialization to compile: a kernel file, the `-D` defines that specialize it, and the kernels
/// (extern "C" names) the resulting cubin must contain.
public struct KernelSpec: Sendable, Hashable, CustomStringConvertible {
    /// The kernel file to compile (the other files are its headers), e.g. "selftest.cu".
    public var file: String
    /// `-D` defines, name → value.
    public var defines: [String: String]
    /// The kernels the cubin must define.
    public var kernels: [String]

    /// The specialization of `file` with `defines`, whose cubin must define `kernels`.
    public init(file: String, defines: [String: String] = [:], kernels: [String]) {
        self.file = file
        self.defines = defines
        self.kernels = kernels
    }

    /// The file, then the defines as `name=value` sorted by name in brackets: `moe.cu [A=1 B=2]`; the file alone
    /// when there are none.
    public var description: String {
        let d = defines.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        return d.isEmpty ? file : "\(file) [\(d)]"
    }
}

/// Every kernel specialization FlashMoE can launch, per layer configuration: what `flashmoe compile` builds
/// ahead of time and what the GPU backend compiles (or finds cached) before its first launch.
public enum KernelCatalog {
    /// The kernels that check the runtime itself (`selftest.cu`).
    public static let selfTest = KernelSpec(
        file: "selftest.cu", kernels: ["fmoe_selftest_axpy", "fmoe_selftest_grid_barrier"])

    /// The GPU's weight quantizer for precision fp8 (`quantize.cu`, `FP8DeviceQuantizer`): BF16 experts given as
    /// device memory become E4M3 codes and block scales there.
    public static let fp8Quantizer = KernelSpec(file: "quantize.cu", kernels: ["fmoe_quantize_e4m3_blocks"])

    /// The specializations `config` needs. The self-test kernel is always first: the canary that shows NVRTC and
    /// the driver work before any MoE kernel is built.
    ///
    /// Then the fused MoE kernel (`moe.cu`) specialised on the config's shapes, precision, FFN, activation and
    /// router, with the pipeline stages that fit `arch`'s shared memory (`ArchitectureLimits`), and, for precision
    /// fp8 on sm_90a, its prefill build on the TMA engine where an operator with the default options builds one
    /// (`FusedSpecialization.operatorBuilds`), then for fp8 the weight quantizer (`fp8Quantizer`). A config the GPU
    /// kernel does not support there (see `FusedSpecialization`; fp8 only with `experimentalFP8`, default the
    /// environment's switch) contributes no MoE kernel.
    public static func specializations(
        for config: MoEConfig, arch: GPUArchitecture = FusedSpecialization.defaultArch,
        experimentalFP8: Bool = FusedSpecialization.supportsFP8
    ) -> [KernelSpec] {
        guard let spec = try? FusedSpecialization(config: config, arch: arch, experimentalFP8: experimentalFP8) else {
            return [selfTest]
        }
        return [selfTest] + spec.operatorBuilds().map(\.kernelSpec) + (config.precision == .fp8 ? [fp8Quantizer] : [])
    }

    /// Expert-parallel builds of `configs` (`FMOE_RANKS` > 1: the dispatch, return and combine paths that
    /// single-GPU builds leave out): each 16-bit config as 4 ranks with FP32 and with storage returns
    /// (`FusedOptions.storageReturns`), each other one as 4 ranks; configs with fewer than 4 experts are left out.
    public static func expertParallel(
        for configs: [MoEConfig], arch: GPUArchitecture = FusedSpecialization.defaultArch
    ) -> [KernelSpec] {
        firstSeen(configs.flatMap { c in
            (c.precision.storage.byteSize == 2 ? [false, true] : [false]).compactMap { storage in
                try? FusedSpecialization(config: c, arch: arch, ranks: 4, returnStorage: storage).kernelSpec
            }
        })
    }

    /// One-GPU builds of `configs` with the routed experts' output rows in the storage type
    /// (`FusedOptions.storageReturns`, `FLASHMOE_STORAGE_ROWS=1`): each config with a 16-bit storage type (bf16,
    /// fp16, and fp8, whose activations are BF16) with its prefill build where it gets one, as an operator with the
    /// option compiles them; 32-bit configs are left out (their rows are already the storage type), and fp8 unless
    /// `experimentalFP8`.
    public static func storageRows(
        for configs: [MoEConfig], arch: GPUArchitecture = FusedSpecialization.defaultArch,
        experimentalFP8: Bool = FusedSpecialization.supportsFP8
    ) -> [KernelSpec] {
        operatorBuilds(of: configs.filter { $0.precision.storage.byteSize == 2 }) {
            try FusedSpecialization(config: $0, arch: arch, returnStorage: true, experimentalFP8: experimentalFP8)
        }
    }

    /// The tracing builds of `configs` (`flashmoe bench --trace`: `FusedOptions.traceEventsPerBlock`), each with its
    /// prefill build where it gets one, as a traced operator compiles them (fp8 unless `experimentalFP8` left out).
    public static func traced(
        for configs: [MoEConfig], arch: GPUArchitecture = FusedSpecialization.defaultArch,
        experimentalFP8: Bool = FusedSpecialization.supportsFP8
    ) -> [KernelSpec] {
        operatorBuilds(of: configs) {
            try FusedSpecialization(config: $0, arch: arch, trace: true, experimentalFP8: experimentalFP8)
        }
    }

    /// The kernels operators of `make(config)` compile (`FusedSpecialization.operatorBuilds`), each once, in
    /// first-seen order; a config `make` refuses is left out.
    private static func operatorBuilds(
        of configs: [MoEConfig], _ make: (MoEConfig) throws -> FusedSpecialization
    ) -> [KernelSpec] {
        firstSeen(configs.flatMap { c in (try? make(c))?.operatorBuilds().map(\.kernelSpec) ?? [] })
    }

    /// The union of the specializations of `configs` for `arch`, each once, in first-seen order.
    public static func specializations(
        for configs: [MoEConfig], arch: GPUArchitecture = FusedSpecialization.defaultArch
    ) -> [KernelSpec] {
        firstSeen(configs.flatMap { specializations(for: $0, arch: arch) })
    }

    /// `specs` without repeats, each where it first appears (the catalog's lists are short: a linear scan).
    private static func firstSeen(_ specs: [KernelSpec]) -> [KernelSpec] {
        var result: [KernelSpec] = []
        for spec in specs where !result.contains(spec) { result.append(spec) }
        return result
    }
}
