import CCUDA

#if canImport(Glibc)
import Glibc
#endif

/// Something that turns CUDA C++ into a cubin: NVRTC, or a fake in tests.
public protocol CUDACompiling: Sendable {
    /// Text that identifies this compiler build (version and library); part of every cache key, so a different
    /// NVRTC never reuses another's cubins.
    var identity: String { get }

    /// Compiles `source` (called `name` in diagnostics) with `headers` (include name → text) and NVRTC `options`.
    /// Returns the cubin and the compiler log (ptxas output when `--ptxas-options=-v` is given).
    /// A source error throws `CUDAError.compileFailed` with the log.
    func compile(source: String, name: String, headers: [String: String], options: [String]) throws(CUDAError)
        -> (cubin: [UInt8], log: String)
}

/// NVRTC, the CUDA runtime compiler, opened with dlopen (see `NVRTCLocator` for where it is looked for).
///
/// `@unchecked Sendable`: the function table is immutable, and NVRTC is thread-safe for calls on distinct
/// programs (each `compile` creates and destroys its own).
public final class NVRTC: CUDACompiling, @unchecked Sendable {
    /// The library that was loaded.
    public let path: String
    /// NVRTC's version (major, minor), e.g. 13.0.
    public let version: (major: Int, minor: Int)
    /// The architectures it can compile for (`nvrtcGetSupportedArchs`: 75, 80, ..., 120).
    public let supportedArchitectures: [Int]
    /// Places tried before `path`, and why each failed.
    public let earlierAttempts: [LibraryAttempt]
    /// Where `libnvrtc-builtins` came from (it must sit next to the library or on the loader's path).
    public let builtins: String
    private let fn: Functions

    /// "nvrtc MAJOR.MINOR FILE SIZE bytes": the version, the library's file name and its size.
    public var identity: String {
        "nvrtc \(version.major).\(version.minor) \(path.split(separator: "/").last ?? "") "
            + "\(SystemFiles.fileSize(path).map(String.init) ?? "?") bytes"
    }

    /// NVRTC found from the process environment on first use; the error lists every place tried.
    public static let shared: Result<NVRTC, CUDAError> = Result { () throws(CUDAError) in
        try load(environment: ProcessEnvironment.current())
    }

    /// Searches the places `NVRTCLocator` lists for `environment` and loads the first NVRTC that works.
    public static func load(environment: [String: String]) throws(CUDAError) -> NVRTC {
        let (found, attempts) = DynamicLibrary.loadFirst(NVRTCLocator.candidates(environment: environment)) {
            (library, earlier) throws(CUDAError) in try NVRTC(library, attempts: earlier)
        }
        if let found { return found }
        let variable = NVRTCLocator.overrideVariable
        let hint =
            environment[variable].flatMap { $0.isEmpty ? nil : "\(variable)=\($0) is set, so only it was tried" }
            ?? "install it (pip install nvidia-cuda-nvrtc) or set \(variable) to its file or folder"
        throw .libraryNotFound(library: "NVRTC", attempts: attempts, hint: hint)
    }

    private init(_ library: DynamicLibrary, attempts: [LibraryAttempt]) throws(CUDAError) {
        let name = "NVRTC (\(library.path))"
        fn = try Functions(library, name)
        path = library.loadedPath
        earlierAttempts = attempts
        var major: Int32 = 0, minor: Int32 = 0
        guard fn.nvrtcVersion(&major, &minor) == NVRTC_SUCCESS else {
            throw .missingSymbol(library: name, symbol: "a working nvrtcVersion")
        }
        version = (Int(major), Int(minor))
        var count: Int32 = 0
        var archs: [Int32] = []
        if fn.nvrtcGetNumSupportedArchs(&count) == NVRTC_SUCCESS, count > 0 {
            archs = [Int32](repeating: 0, count: Int(count))
            if fn.nvrtcGetSupportedArchs(&archs) != NVRTC_SUCCESS { archs = [] }
        }
        supportedArchitectures = archs.map(Int.init)
        builtins = Self.preloadBuiltins(nextTo: path, version: version)
    }

    /// NVRTC dlopens `libnvrtc-builtins.so.MAJOR.MINOR` by name when it compiles. A pip wheel's folder is not on the
    /// loader's path, so load the copy next to libnvrtc first (RTLD_GLOBAL): NVRTC's own dlopen then finds it.
    private static func preloadBuiltins(nextTo library: String, version: (major: Int, minor: Int)) -> String {
        let soname = "libnvrtc-builtins.so.\(version.major).\(version.minor)"
        guard let slash = library.lastIndex(of: "/") else { return "\(soname) via the loader's search path" }
        let sibling = "\(library[..<slash])/\(soname)"
        switch DynamicLibrary.open(sibling, global: true) {
        case .success: return sibling
        case .failure(let attempt): return "\(soname) via the loader's search path (\(attempt))"
        }
    }

    /// `nvrtcCreateProgram`, `nvrtcCompileProgram`, then `nvrtcGetCUBIN`; a source error throws `compileFailed`
    /// with the log, a virtual architecture (no cubin) `CUDAError.nvrtc`.
    public func compile(source: String, name: String, headers: [String: String], options: [String])
        throws(CUDAError) -> (cubin: [UInt8], log: String)
    {
        try withProgram(source: source, name: name, headers: headers, options: options) {
            (program, log) throws(CUDAError) in
            var size = 0
            try check(fn.nvrtcGetCUBINSize(program, &size), "nvrtcGetCUBINSize", log: log)
            guard size > 0 else {
                throw .nvrtc(
                    call: "nvrtcGetCUBIN", code: 0, name: "empty cubin", log: log,
                    hint: "pass a real architecture (--gpu-architecture=sm_XX), not a virtual compute_XX one")
            }
            var cubin = [UInt8](repeating: 0, count: size)
            let got = cubin.withUnsafeMutableBytes {
                fn.nvrtcGetCUBIN(program, $0.baseAddress!.assumingMemoryBound(to: CChar.self))
            }
            try check(got, "nvrtcGetCUBIN", log: log)
            return (cubin, log)
        }
    }

    /// Compiles `source` to LTO-IR for nvJitLink (`options` must hold `-dlto`): `nvrtcGetLTOIR` after the compile.
    public func compileToLTOIR(source: String, name: String, headers: [String: String], options: [String])
        throws(CUDAError) -> (ltoir: [UInt8], log: String)
    {
        guard let getSize = fn.nvrtcGetLTOIRSize, let get = fn.nvrtcGetLTOIR else {
            throw .missingSymbol(library: "NVRTC (\(path))", symbol: "nvrtcGetLTOIR (NVRTC 12.0 or newer)")
        }
        return try withProgram(source: source, name: name, headers: headers, options: options) {
            (program, log) throws(CUDAError) in
            var size = 0
            try check(getSize(program, &size), "nvrtcGetLTOIRSize", log: log)
            guard size > 0 else {
                throw .nvrtc(call: "nvrtcGetLTOIR", code: 0, name: "empty LTO-IR", log: log, hint: "pass -dlto")
            }
            var ir = [UInt8](repeating: 0, count: size)
            let got = ir.withUnsafeMutableBytes { get(program, $0.baseAddress!) }
            try check(got, "nvrtcGetLTOIR", log: log)
            return (ir, log)
        }
    }

    /// Creates and compiles a program, hands it and its log to `extract`, and destroys it on every path.
    private func withProgram<R>(
        source: String, name: String, headers: [String: String], options: [String],
        _ extract: (nvrtcProgram, String) throws(CUDAError) -> R
    ) throws(CUDAError) -> R {
        let headerNames = headers.keys.sorted()
        var program: nvrtcProgram?
        let created = withCStrings(headerNames.map { headers[$0]! }) { texts in
            withCStrings(headerNames) { names in
                fn.nvrtcCreateProgram(&program, source, name, Int32(headerNames.count), texts, names)
            }
        }
        try check(created, "nvrtcCreateProgram", log: "")
        defer { _ = fn.nvrtcDestroyProgram(&program) }
        guard let program else {
            throw .nvrtc(call: "nvrtcCreateProgram", code: 0, name: "no program", log: "", hint: nil)
        }

        let compiled = withCStrings(options) { fn.nvrtcCompileProgram(program, Int32(options.count), $0) }
        let log = programLog(program)
        if compiled == NVRTC_ERROR_COMPILATION {
            let arch = options.first { $0.hasPrefix("--gpu-architecture=") }?.split(separator: "=").last
            throw .compileFailed(program: name, arch: arch.map(String.init) ?? "?", log: log)
        }
        try check(compiled, "nvrtcCompileProgram", log: log)
        return try extract(program, log)
    }

    private func programLog(_ program: nvrtcProgram) -> String {
        var size = 0
        guard fn.nvrtcGetProgramLogSize(program, &size) == NVRTC_SUCCESS, size > 1 else { return "" }
        var buffer = [CChar](repeating: 0, count: size)
        guard fn.nvrtcGetProgramLog(program, &buffer) == NVRTC_SUCCESS else { return "" }
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private func check(_ result: nvrtcResult, _ call: String, log: String) throws(CUDAError) {
        guard result != NVRTC_SUCCESS else { return }
        let name = fn.nvrtcGetErrorString(result).map { String(cString: $0) } ?? "NVRTC error \(result.rawValue)"
        let hint: String? =
            switch result {
            case NVRTC_ERROR_BUILTIN_OPERATION_FAILURE:
                "NVRTC could not load its builtins library (\(builtins)): it must sit next to \(path)"
            case NVRTC_ERROR_INVALID_OPTION:
                "an option was rejected; NVRTC \(version.major).\(version.minor) compiles for "
                    + supportedArchitectures.map { "sm_\($0)" }.joined(separator: ", ")
            default: nil
            }
        throw .nvrtc(call: call, code: result.rawValue, name: name, log: log, hint: hint)
    }
}

/// Calls `body` with a C array of C strings that lives for the call.
func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafePointer<CChar>?>) -> R) -> R {
    let copies = strings.map { strdup($0) }
    defer { copies.forEach { free($0) } }
    let pointers = copies.map { UnsafePointer($0) }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress ?? UnsafePointer(bitPattern: 8)!) }
}

/// The NVRTC entry points, typed by the CCUDA typedefs.
private struct Functions {
    let nvrtcGetErrorString: PFN_nvrtcGetErrorString
    let nvrtcVersion: PFN_nvrtcVersion
    let nvrtcGetNumSupportedArchs: PFN_nvrtcGetNumSupportedArchs
    let nvrtcGetSupportedArchs: PFN_nvrtcGetSupportedArchs
    let nvrtcCreateProgram: PFN_nvrtcCreateProgram
    let nvrtcDestroyProgram: PFN_nvrtcDestroyProgram
    let nvrtcCompileProgram: PFN_nvrtcCompileProgram
    let nvrtcGetProgramLogSize: PFN_nvrtcGetProgramLogSize
    let nvrtcGetProgramLog: PFN_nvrtcGetProgramLog
    let nvrtcGetCUBINSize: PFN_nvrtcGetCUBINSize
    let nvrtcGetCUBIN: PFN_nvrtcGetCUBIN
    /// LTO-IR output (NVRTC 12.0+); nil in an older NVRTC, which then cannot build for nvJitLink.
    let nvrtcGetLTOIRSize: (@convention(c) (nvrtcProgram?, UnsafeMutablePointer<Int>?) -> nvrtcResult)?
    let nvrtcGetLTOIR: (@convention(c) (nvrtcProgram?, UnsafeMutableRawPointer?) -> nvrtcResult)?

    init(_ library: DynamicLibrary, _ name: String) throws(CUDAError) {
        func f<T>(_ symbol: String, _ type: T.Type) throws(CUDAError) -> T {
            try library.function(symbol, as: type, library: name)
        }
        nvrtcGetErrorString = try f("nvrtcGetErrorString", PFN_nvrtcGetErrorString.self)
        nvrtcVersion = try f("nvrtcVersion", PFN_nvrtcVersion.self)
        nvrtcGetNumSupportedArchs = try f("nvrtcGetNumSupportedArchs", PFN_nvrtcGetNumSupportedArchs.self)
        nvrtcGetSupportedArchs = try f("nvrtcGetSupportedArchs", PFN_nvrtcGetSupportedArchs.self)
        nvrtcCreateProgram = try f("nvrtcCreateProgram", PFN_nvrtcCreateProgram.self)
        nvrtcDestroyProgram = try f("nvrtcDestroyProgram", PFN_nvrtcDestroyProgram.self)
        nvrtcCompileProgram = try f("nvrtcCompileProgram", PFN_nvrtcCompileProgram.self)
        nvrtcGetProgramLogSize = try f("nvrtcGetProgramLogSize", PFN_nvrtcGetProgramLogSize.self)
        nvrtcGetProgramLog = try f("nvrtcGetProgramLog", PFN_nvrtcGetProgramLog.self)
        nvrtcGetCUBINSize = try f("nvrtcGetCUBINSize", PFN_nvrtcGetCUBINSize.self)
        nvrtcGetCUBIN = try f("nvrtcGetCUBIN", PFN_nvrtcGetCUBIN.self)
        nvrtcGetLTOIRSize = try? f("nvrtcGetLTOIRSize", (@convention(c) (nvrtcProgram?, UnsafeMutablePointer<Int>?) -> nvrtcResult).self)
        nvrtcGetLTOIR = try? f("nvrtcGetLTOIR", (@convention(c) (nvrtcProgram?, UnsafeMutableRawPointer?) -> nvrtcResult).self)
    }
}
