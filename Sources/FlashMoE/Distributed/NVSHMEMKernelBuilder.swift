/// Something that compiles CUDA C++ to LTO-IR for nvJitLink: NVRTC, or a fake in tests.
public protocol LTOCompiling: Sendable {
    /// Text that identifies this compiler (part of cache keys).
    var identity: String { get }
    /// Compiles `source` to LTO-IR with `options` (which hold `-dlto`).
    func compileToLTOIR(source: String, name: String, headers: [String: String], options: [String])
        throws(CUDAError) -> (ltoir: [UInt8], log: String)
}

extension NVRTC: LTOCompiling {}

/// Builds the ranks kernel with the NVSHMEM transport (`FMOE_NVSHMEM=1`): NVRTC compiles the kernel file to LTO-IR
/// with NVSHMEM's headers, then nvJitLink links it with NVSHMEM's static device library into one cubin, which
/// `CUDAModule` loads like any other (the host then runs `nvshmemx_cumodule_init` on the module).
///
/// Cubins go through the same `CubinCache` as NVRTC's, keyed on the compiler, the linker, the device library and
/// every option and source text.
public struct NVSHMEMKernelBuilder: Sendable {
    /// The LTO-IR compiler.
    public let compiler: any LTOCompiling
    /// The linker.
    public let linker: JitLinker
    /// NVSHMEM's headers and device library.
    public let kit: NVSHMEMDeviceKit
    /// The cubin cache, or nil.
    public let cache: CubinCache?

    /// The define that selects the NVSHMEM transport in the kernel sources.
    public static let define = "FMOE_NVSHMEM"

    /// A builder of the given parts (`fromEnvironment` finds the real ones).
    public init(compiler: any LTOCompiling, linker: JitLinker, kit: NVSHMEMDeviceKit, cache: CubinCache?) {
        self.compiler = compiler
        self.linker = linker
        self.kit = kit
        self.cache = cache
    }

    /// NVRTC, nvJitLink and NVSHMEM found from `environment`, with the default cubin cache.
    public static func fromEnvironment(_ environment: [String: String] = ProcessEnvironment.current()) throws
        -> NVSHMEMKernelBuilder
    {
        let nvrtc = try NVRTC.shared.get()
        let link = try NVJitLink.shared.get()
        return NVSHMEMKernelBuilder(
            compiler: nvrtc, linker: JitLinker(api: link), kit: try NVSHMEMDeviceKit.locate(environment: environment),
            cache: CubinCache.defaultDirectory(environment: environment).map(CubinCache.init(directory:)))
    }

    /// The compile request for `spec` on `arch`: the spec's defines plus `FMOE_NVSHMEM=1`.
    public func request(_ spec: KernelSpec, arch: GPUArchitecture, sources: KernelSources) throws(CUDAError)
        -> CompileRequest
    {
        let (source, headers) = try sources.program(spec.file)
        var defines = spec.defines
        defines[Self.define] = "1"
        return CompileRequest(name: spec.file, source: source, headers: headers, arch: arch, defines: defines)
    }

    /// NVRTC's options: the request's, less the ptxas statistics (there is no ptxas at this step; nvJitLink prints
    /// them), plus relocatable LTO-IR output and the kit's include folders.
    public func compileOptions(_ request: CompileRequest) -> [String] {
        request.options.filter { !$0.hasPrefix("--ptxas-options") } + ["-dlto", "-rdc=true"] + kit.nvrtcOptions
    }

    /// nvJitLink's options: the architecture, link-time optimisation, ptxas statistics in the info log.
    public func linkOptions(_ arch: GPUArchitecture) -> [String] { ["-arch=\(arch.name)", "-lto", "-Xptxas=-v"] }

    /// Compiles and links `spec` for `arch` (or loads the cubin from the cache).
    public func build(_ spec: KernelSpec, arch: GPUArchitecture, sources: KernelSources) throws -> CompiledKernel {
        let request = try request(spec, arch: arch, sources: sources)
        let key = request.cacheKey(
            compilerIdentity: "nvshmem-lto-v1 \(compiler.identity) | \(linker.api.identity) | \(kit.identity) | "
                + compileOptions(request).joined(separator: " "))
        return try KernelCompiler.cached(request, key: key, cache: cache, disabledReason: "no cache directory") {
            () throws -> (cubin: [UInt8], log: String) in
            let (ltoir, compileLog) = try compiler.compileToLTOIR(
                source: request.source, name: request.name, headers: request.headers, options: compileOptions(request))
            do throws(JitLinkError) {
                let linked = try linker.link(
                    options: linkOptions(arch),
                    inputs: [.data(.ltoir, bytes: ltoir, name: request.name), .file(.library, path: kit.deviceLibrary)])
                return (linked.cubin, compileLog + linked.infoLog)
            } catch {
                throw NVSHMEMBuildError.link(error)
            }
        }
    }
}
