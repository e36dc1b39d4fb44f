import Dispatch
import Synchronization

/// One CUDA C++ program to compile for one architecture: the source, the headers it may include, and the
/// `-D` defines that specialize it.
public struct CompileRequest: Sendable, Hashable {
    /// The program's file name (diagnostics show it), e.g. "selftest.cu".
    public var name: String
    /// The program text.
    public var source: String
    /// Files it may `#include "name"`, name → text.
    public var headers: [String: String]
    /// The target.
    public var arch: GPUArchitecture
    /// `-D name=value` defines (value "" gives `-D name`).
    public var defines: [String: String]
    /// Whether to keep line information for profilers (`-lineinfo`).
    public var lineInfo: Bool

    /// A request; by default with no headers, no defines and no line info.
    public init(
        name: String, source: String, headers: [String: String] = [:], arch: GPUArchitecture,
        defines: [String: String] = [:], lineInfo: Bool = false
    ) {
        self.name = name
        self.source = source
        self.headers = headers
        self.arch = arch
        self.defines = defines
        self.lineInfo = lineInfo
    }

    /// The NVRTC options: C++17, the architecture, functions on the device by default, ptxas statistics (for
    /// registers and spills), line info if asked, then the defines sorted by name.
    public var options: [String] {
        var options = ["-std=c++17", "--gpu-architecture=\(arch.name)", "-default-device", "--ptxas-options=-v"]
        if lineInfo { options.append("-lineinfo") }
        for (key, value) in defines.sorted(by: { $0.key < $1.key }) {
            options.append(value.isEmpty ? "-D\(key)" : "-D\(key)=\(value)")
        }
        return options
    }

    /// The cache key: SHA-256 over a length-prefixed encoding of the compiler identity, the architecture, the
    /// options, the program name and text, and every header (sorted by name). Any change to any of them changes
    /// the key; length prefixes keep distinct field lists from colliding ("ab"+"c" vs "a"+"bc").
    public func cacheKey(compilerIdentity: String) -> [UInt8] {
        var hasher = SHA256()
        func field(_ text: String) {
            let bytes = Array(text.utf8)
            hasher.update(withUnsafeBytes(of: UInt64(bytes.count).littleEndian) { Array($0) })
            hasher.update(bytes)
        }
        field("flashmoe-cubin-key-v1")
        field(compilerIdentity)
        field(arch.name)
        field(String(options.count))
        options.forEach(field)
        field(name)
        field(source)
        field(String(headers.count))
        for (headerName, text) in headers.sorted(by: { $0.key < $1.key }) {
            field(headerName)
            field(text)
        }
        return hasher.finalize()
    }
}

/// How a compile used the cache.
public enum CacheOutcome: Sendable, Hashable, CustomStringConvertible {
    /// A verified entry was used; nothing was compiled.
    case hit
    /// No entry: compiled and stored.
    case miss
    /// An entry failed verification (the reason): compiled again and the entry rewritten.
    case replacedCorrupt(String)
    /// No cache is in use (the reason).
    case disabled(String)

    /// `hit`, `miss`, `miss (corrupt entry replaced: why)` or `off (why)`.
    public var description: String {
        switch self {
        case .hit: "hit"
        case .miss: "miss"
        case .replacedCorrupt(let why): "miss (corrupt entry replaced: \(why))"
        case .disabled(let why): "off (\(why))"
        }
    }
}

/// A compiled program: the cubin, the log, per-kernel resource use, and how it was obtained.
public struct CompiledKernel: Sendable {
    /// The program's name.
    public let name: String
    /// The target it was built for.
    public let arch: GPUArchitecture
    /// The cubin image, for `CUDAModule`.
    public let cubin: [UInt8]
    /// NVRTC's log (ptxas statistics).
    public let log: String
    /// Registers, spills, stack and shared memory of each kernel, parsed from the log.
    public let resources: [KernelResourceUsage]
    /// Whether it came from the cache.
    public let cache: CacheOutcome
    /// Why the cache entry could not be written, if it could not (the result is still good).
    public let cacheWriteFailure: String?
    /// Time to produce it: compiling on a miss, reading and verifying on a hit.
    public let time: Duration
    /// The cache key (`hexString(key)` names the cache file).
    public let key: [UInt8]
}

/// Compiles CUDA C++ to cubins through a `CUDACompiling` backend (NVRTC), with a disk cache in front.
///
/// Failed compiles are never cached. A cache that cannot be read or written degrades to compiling every time;
/// it is never an error.
public struct KernelCompiler: Sendable {
    /// What compiles.
    public let backend: any CUDACompiling
    /// The cubin cache, or nil for none.
    public let cache: CubinCache?
    /// Why there is no cache (when `cache` is nil).
    public let cacheDisabledReason: String

    /// A compiler with an explicit cache (nil: none).
    public init(backend: any CUDACompiling, cache: CubinCache?) {
        self.backend = backend
        self.cache = cache
        self.cacheDisabledReason = cache == nil ? "disabled" : ""
    }

    /// A compiler using the default cache directory for `environment` (see `CubinCache.defaultDirectory`).
    public init(backend: any CUDACompiling, environment: [String: String]) {
        self.backend = backend
        if let dir = CubinCache.defaultDirectory(environment: environment) {
            cache = CubinCache(directory: dir)
            cacheDisabledReason = ""
        } else {
            cache = nil
            cacheDisabledReason = "no FLASHMOE_CACHE_DIR, XDG_CACHE_HOME or HOME"
        }
    }

    /// Compiles `request`, or loads its cubin from the cache.
    public func compile(_ request: CompileRequest) throws(CUDAError) -> CompiledKernel {
        try Self.cached(
            request, key: request.cacheKey(compilerIdentity: backend.identity), cache: cache,
            disabledReason: cacheDisabledReason
        ) { () throws(CUDAError) in
            try backend.compile(
                source: request.source, name: request.name, headers: request.headers, options: request.options)
        }
    }

    /// The cubin under `key` in `cache` when a verified entry is there; otherwise `build`'s, stored under `key`.
    /// Shared by every build that produces cubins (NVRTC's, and the NVSHMEM link).
    static func cached<E: Error>(
        _ request: CompileRequest, key: [UInt8], cache: CubinCache?, disabledReason: String,
        build: () throws(E) -> (cubin: [UInt8], log: String)
    ) throws(E) -> CompiledKernel {
        let clock = ContinuousClock()
        let start = clock.now
        var outcome: CacheOutcome = .disabled(disabledReason)
        if let cache {
            switch cache.load(key: key) {
            case .hit(let cubin, let log):
                return compiled(request, cubin, log, .hit, nil, clock.now - start, key)
            case .absent: outcome = .miss
            case .corrupt(let why): outcome = .replacedCorrupt(why)
            }
        }
        let (cubin, log) = try build()
        var writeFailure: String?
        if let cache, case .failure(let error) = cache.store(key: key, cubin: cubin, log: log) {
            writeFailure = error.description
        }
        return compiled(request, cubin, log, outcome, writeFailure, clock.now - start, key)
    }

    /// Compiles one catalog entry for `arch`, with the kernel headers (`KernelSources.program`).
    public func compile(_ spec: KernelSpec, arch: GPUArchitecture, sources: KernelSources, lineInfo: Bool = false)
        throws(CUDAError) -> CompiledKernel
    {
        let (source, headers) = try sources.program(spec.file)
        return try compile(
            CompileRequest(
                name: spec.file, source: source, headers: headers, arch: arch, defines: spec.defines,
                lineInfo: lineInfo))
    }

    /// Compiles every spec for its architecture side by side, one thread each (independent NVRTC programs; the
    /// cache stores each entry with an atomic rename), or finds it in the cache: each outcome in `jobs`' order, so a
    /// caller can stop at the first failure or report them all.
    public func compileAll(
        _ jobs: [(spec: KernelSpec, arch: GPUArchitecture)], sources: KernelSources, lineInfo: Bool = false
    ) -> [Result<CompiledKernel, CUDAError>] {
        let results = Mutex([Result<CompiledKernel, CUDAError>?](repeating: nil, count: jobs.count))
        DispatchQueue.concurrentPerform(iterations: jobs.count) { i in
            let result = Result { () throws(CUDAError) -> CompiledKernel in
                try compile(jobs[i].spec, arch: jobs[i].arch, sources: sources, lineInfo: lineInfo)
            }
            results.withLock { $0[i] = result }
        }
        return results.withLock { $0 }.map { $0! }
    }

    private static func compiled(
        _ request: CompileRequest, _ cubin: [UInt8], _ log: String, _ outcome: CacheOutcome, _ writeFailure: String?,
        _ time: Duration, _ key: [UInt8]
    ) -> CompiledKernel {
        CompiledKernel(
            name: request.name, arch: request.arch, cubin: cubin, log: log,
            resources: KernelResourceUsage.parse(ptxasLog: log), cache: outcome, cacheWriteFailure: writeFailure,
            time: time, key: key)
    }
}

extension Duration {
    /// The duration in milliseconds.
    public var milliseconds: Double {
        Double(components.seconds) * 1000 + Double(components.attoseconds) / 1e15
    }
}
