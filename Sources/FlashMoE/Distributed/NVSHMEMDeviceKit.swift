/// NVSHMEM's device side as the kernel build needs it: the headers NVRTC compiles the kernel's NVSHMEM calls from,
/// the CUDA headers those include, and the static device library nvJitLink links (for the library's device state).
///
/// The wheel (`nvidia-nvshmem-cu13`) also ships `libnvshmem_device_sm_XX.bc`, but that is raw LLVM bitcode for
/// LLVM-based compilers: nvJitLink refuses it as every input kind. With `NVSHMEM_ENABLE_ALL_DEVICE_INLINING` the
/// headers define every device call inline, so the only symbols left for the link are the library's device state
/// and version, which `lib/libnvshmem_device.a` holds.
public struct NVSHMEMDeviceKit: Sendable, Hashable, CustomStringConvertible {
    /// `nvidia/nvshmem/include` (holds `nvshmem.h`).
    public let includeDirectory: String
    /// `nvidia/nvshmem/lib/libnvshmem_device.a`.
    public let deviceLibrary: String
    /// A folder holding `cuda_runtime.h` (the headers include it).
    public let cudaIncludeDirectory: String
    /// Where `cuda/std/cstdint` is, when not under `cudaIncludeDirectory` itself (CUDA 13's `include/cccl`).
    public let cccl: String?

    /// A folder holding NVSHMEM's `include/` and `lib/` (the wheel's `nvidia/nvshmem`).
    public static let homeVariable = "FLASHMOE_NVSHMEM_HOME"
    /// A folder holding `cuda_runtime.h` (a toolkit's `include`, or the nvidia-cuda-runtime wheel's).
    public static let cudaIncludeVariable = "FLASHMOE_CUDA_INCLUDE"

    /// A kit of the given folders and library, as found (no checks; `locate` searches for them).
    public init(includeDirectory: String, deviceLibrary: String, cudaIncludeDirectory: String, cccl: String?) {
        self.includeDirectory = includeDirectory
        self.deviceLibrary = deviceLibrary
        self.cudaIncludeDirectory = cudaIncludeDirectory
        self.cccl = cccl
    }

    /// NVRTC options for the NVSHMEM build: the include folders and the define that inlines every device call.
    public var nvrtcOptions: [String] {
        ["-I\(includeDirectory)", "-I\(cudaIncludeDirectory)"] + (cccl.map { ["-I\($0)"] } ?? [])
            + ["-DNVSHMEM_ENABLE_ALL_DEVICE_INLINING"]
    }

    /// Text that identifies the inputs (part of the cache key): the library's path and size.
    public var identity: String {
        "nvshmem device \(deviceLibrary) \(SystemFiles.fileSize(deviceLibrary).map(String.init) ?? "?") bytes"
    }

    /// The NVSHMEM include folder, device library and CUDA include folder, then ` + CCCL folder` when there is one.
    public var description: String {
        "NVSHMEM headers \(includeDirectory), device library \(deviceLibrary), CUDA headers \(cudaIncludeDirectory)"
            + (cccl.map { " + \($0)" } ?? "")
    }

    /// NVSHMEM homes to try: `FLASHMOE_NVSHMEM_HOME` alone when set; else the parent of `FLASHMOE_NVSHMEM`'s
    /// folder, then `nvidia/nvshmem` under the Python site folders.
    public static func homeCandidates(environment: [String: String], glob: ((String) -> [String])? = nil) -> [String] {
        if let home = environment[homeVariable], !home.isEmpty { return [trimmed(home)] }
        var patterns: [String] = []
        if let host = environment[NVSHMEMLibrary.overrideVariable], !host.isEmpty {
            var folder = trimmed(host)
            if folder.contains(".so") { folder = parent(folder) }
            patterns.append(parent(folder))  // .../nvidia/nvshmem/lib -> .../nvidia/nvshmem
        }
        patterns += NVRTCLocator.siteDirectories(environment: environment).map { "\($0)/nvidia/nvshmem" }
        return NVRTCLocator.expand(patterns, glob: glob ?? SystemFiles.glob)
    }

    /// CUDA include folders to try: `FLASHMOE_CUDA_INCLUDE` alone when set; else the nvidia-cuda-runtime wheels'
    /// `nvidia/cu13/include` under the site folders, then `/usr/local/cuda/include`, `/usr/local/cuda-*/include`.
    public static func cudaIncludeCandidates(environment: [String: String], glob: ((String) -> [String])? = nil)
        -> [String]
    {
        if let dir = environment[cudaIncludeVariable], !dir.isEmpty { return [trimmed(dir)] }
        var patterns = NVRTCLocator.siteDirectories(environment: environment).map { "\($0)/nvidia/cu13/include" }
        patterns += ["/usr/local/cuda/include", "/usr/local/cuda-*/include"]
        return NVRTCLocator.expand(patterns, glob: glob ?? SystemFiles.glob)
    }

    /// The first NVSHMEM home holding both `include/nvshmem.h` and `lib/libnvshmem_device.a`, and the first CUDA
    /// include folder holding `cuda_runtime.h` and `cuda/std/cstdint` (directly or under `cccl/`).
    ///
    /// - Throws: `NVSHMEMBuildError.missing` listing every place tried and what to install.
    public static func locate(
        environment: [String: String] = ProcessEnvironment.current(), glob: ((String) -> [String])? = nil,
        exists: ((String) -> Bool)? = nil
    ) throws(NVSHMEMBuildError) -> NVSHMEMDeviceKit {
        let exists = exists ?? { SystemFiles.exists($0) }
        let homes = homeCandidates(environment: environment, glob: glob)
        guard let home = homes.first(where: { exists("\($0)/include/nvshmem.h") && exists("\($0)/lib/libnvshmem_device.a") })
        else {
            throw .missing(
                what: "NVSHMEM's device headers and lib/libnvshmem_device.a", tried: homes,
                hint: "pip install nvidia-nvshmem-cu13, or set \(homeVariable) to its nvidia/nvshmem folder")
        }
        let cudas = cudaIncludeCandidates(environment: environment, glob: glob)
        for dir in cudas where exists("\(dir)/cuda_runtime.h") {
            if exists("\(dir)/cuda/std/cstdint") {
                return NVSHMEMDeviceKit(
                    includeDirectory: "\(home)/include", deviceLibrary: "\(home)/lib/libnvshmem_device.a",
                    cudaIncludeDirectory: dir, cccl: nil)
            }
            if exists("\(dir)/cccl/cuda/std/cstdint") {
                return NVSHMEMDeviceKit(
                    includeDirectory: "\(home)/include", deviceLibrary: "\(home)/lib/libnvshmem_device.a",
                    cudaIncludeDirectory: dir, cccl: "\(dir)/cccl")
            }
        }
        throw .missing(
            what: "the CUDA headers NVSHMEM's device headers include (cuda_runtime.h and CCCL's cuda/std/cstdint)",
            tried: cudas,
            hint: "pip install nvidia-cuda-runtime nvidia-cuda-cccl (13.x), or set \(cudaIncludeVariable) to a "
                + "CUDA toolkit's include folder")
    }

    private static func trimmed(_ path: String) -> String { path.hasSuffix("/") ? String(path.dropLast()) : path }
    private static func parent(_ path: String) -> String {
        path.lastIndex(of: "/").map { String(path[..<$0]) } ?? path
    }
}

/// The NVSHMEM kernel build could not find its inputs, or failed.
public enum NVSHMEMBuildError: Error, Sendable, Hashable, CustomStringConvertible {
    /// `what` was not found in any of the places `tried`; `hint` says how to provide it.
    case missing(what: String, tried: [String], hint: String)
    /// The link failed.
    case link(JitLinkError)

    /// What was not found, each place tried on its own line, then the hint; or the link error.
    public var description: String {
        switch self {
        case .missing(let what, let tried, let hint):
            "NVSHMEM kernel build: \(what) not found; tried:\n"
                + tried.map { "  \($0)" }.joined(separator: "\n") + "\n\(hint)"
        case .link(let error): "NVSHMEM kernel link: \(error)"
        }
    }
}
