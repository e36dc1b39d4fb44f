import CCUDA

/// What one input of a link is (`nvJitLinkInputType`).
public enum JitLinkInputKind: UInt32, Sendable, Hashable, CustomStringConvertible {
    /// A cubin (SASS for one architecture).
    case cubin = 1
    /// PTX text.
    case ptx = 2
    /// LTO-IR, e.g. NVRTC's `-dlto` output (`nvrtcGetLTOIR`).
    case ltoir = 3
    /// A fatbinary.
    case fatbin = 4
    /// A host object holding device code.
    case object = 5
    /// A static library (`.a`) of such objects, e.g. NVSHMEM's `libnvshmem_device.a`.
    case library = 6

    /// The kind's usual name: "cubin", "PTX", "LTO-IR", "fatbin", "object" or "library".
    public var description: String {
        switch self {
        case .cubin: "cubin"
        case .ptx: "PTX"
        case .ltoir: "LTO-IR"
        case .fatbin: "fatbin"
        case .object: "object"
        case .library: "library"
        }
    }
}

/// One input of a link: bytes in memory or a file.
public enum JitLinkInput: Sendable, Hashable {
    /// `bytes` of kind `kind`, called `name` in the logs.
    case data(JitLinkInputKind, bytes: [UInt8], name: String)
    /// The file at `path`, of kind `kind`.
    case file(JitLinkInputKind, path: String)
}

/// The raw nvJitLink calls, one method per C entry point (status codes are `nvJitLinkResult`, 0 = success): the
/// real library (`NVJitLink`) or a fake in tests. `JitLinker` turns them into typed results.
public protocol JitLinkAPI: Sendable {
    /// Which library (name, version, file); part of cache keys.
    var identity: String { get }
    /// `nvJitLinkCreate`: a new link with `options` (e.g. "-arch=sm_90a", "-lto").
    func create(_ handle: inout OpaquePointer?, options: [String]) -> UInt32
    /// `nvJitLinkDestroy`.
    func destroy(_ handle: inout OpaquePointer?) -> UInt32
    /// `nvJitLinkAddData`.
    func addData(_ handle: OpaquePointer, kind: UInt32, bytes: [UInt8], name: String) -> UInt32
    /// `nvJitLinkAddFile`.
    func addFile(_ handle: OpaquePointer, kind: UInt32, path: String) -> UInt32
    /// `nvJitLinkComplete`.
    func complete(_ handle: OpaquePointer) -> UInt32
    /// `nvJitLinkGetLinkedCubinSize` then `nvJitLinkGetLinkedCubin`.
    func linkedCubin(_ handle: OpaquePointer) -> (status: UInt32, cubin: [UInt8])
    /// `nvJitLinkGetErrorLog` (empty when there is none).
    func errorLog(_ handle: OpaquePointer) -> String
    /// `nvJitLinkGetInfoLog` (empty when there is none).
    func infoLog(_ handle: OpaquePointer) -> String
}

/// A link failed: which call, its status, and nvJitLink's error log.
public struct JitLinkError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The call that failed, e.g. "nvJitLinkComplete".
    public let call: String
    /// The `nvJitLinkResult`.
    public let status: UInt32
    /// nvJitLink's error log (undefined symbols, bad inputs), possibly empty.
    public let log: String
    /// What to change.
    public let hint: String

    /// The `nvJitLinkResult` names of nvJitLink 12 and 13.
    public static func name(of status: UInt32) -> String {
        let names = [
            "NVJITLINK_SUCCESS", "NVJITLINK_ERROR_UNRECOGNIZED_OPTION", "NVJITLINK_ERROR_MISSING_ARCH",
            "NVJITLINK_ERROR_INVALID_INPUT", "NVJITLINK_ERROR_PTX_COMPILE", "NVJITLINK_ERROR_NVVM_COMPILE",
            "NVJITLINK_ERROR_INTERNAL", "NVJITLINK_ERROR_THREADPOOL", "NVJITLINK_ERROR_UNRECOGNIZED_INPUT",
            "NVJITLINK_ERROR_FINALIZE", "NVJITLINK_ERROR_NULL_INPUT", "NVJITLINK_ERROR_INCOMPATIBLE_OPTIONS",
            "NVJITLINK_ERROR_INCORRECT_INPUT_TYPE", "NVJITLINK_ERROR_ARCH_MISMATCH", "NVJITLINK_ERROR_OUTDATED_LIBRARY",
            "NVJITLINK_ERROR_MISSING_FATBIN",
        ]
        return Int(status) < names.count ? names[Int(status)] : "nvJitLinkResult \(status)"
    }

    /// "`call` failed: NAME", then the error log (if any) and the hint, each on its own line.
    public var description: String {
        "\(call) failed: \(Self.name(of: status))" + (log.isEmpty ? "" : "\n\(log)") + "\n\(hint)"
    }
}

/// A linked image and what nvJitLink said about it.
public struct JitLinkResult: Sendable {
    /// The cubin, for `CUDAModule`.
    public let cubin: [UInt8]
    /// nvJitLink's info log (ptxas statistics with `-Xptxas=-v`).
    public let infoLog: String
}

/// Links device code with nvJitLink: create with options, add every input, complete, read the cubin; the handle is
/// destroyed on every path. Errors carry the error log and say what to change.
public struct JitLinker: Sendable {
    /// The calls (the real library or a fake).
    public let api: any JitLinkAPI

    /// A linker making its calls through `api`.
    public init(api: any JitLinkAPI) { self.api = api }

    /// Links `inputs` with `options` into one cubin.
    public func link(options: [String], inputs: [JitLinkInput]) throws(JitLinkError) -> JitLinkResult {
        var handle: OpaquePointer?
        let created = api.create(&handle, options: options)
        guard created == 0, let h = handle else {
            throw JitLinkError(
                call: "nvJitLinkCreate", status: created, log: "",
                hint: "check the options \(options) (an architecture is required: -arch=sm_XX)")
        }
        defer { _ = api.destroy(&handle) }
        for input in inputs {
            let (status, call, what): (UInt32, String, String)
            switch input {
            case .data(let kind, let bytes, let name):
                (status, call, what) = (api.addData(h, kind: kind.rawValue, bytes: bytes, name: name), "nvJitLinkAddData", "\(kind) '\(name)'")
            case .file(let kind, let path):
                (status, call, what) = (api.addFile(h, kind: kind.rawValue, path: path), "nvJitLinkAddFile", "\(kind) \(path)")
            }
            guard status == 0 else {
                throw JitLinkError(
                    call: call, status: status, log: api.errorLog(h),
                    hint: "the input \(what) was refused: check its kind and that it exists (nvJitLink reads "
                        + "LTO-IR containers, not raw LLVM bitcode)")
            }
        }
        let completed = api.complete(h)
        guard completed == 0 else {
            throw JitLinkError(
                call: "nvJitLinkComplete", status: completed, log: api.errorLog(h),
                hint: "an undefined reference means a library input is missing; an LTO-IR producer newer than "
                    + "nvJitLink (\(api.identity)) needs a newer nvJitLink")
        }
        let (status, cubin) = api.linkedCubin(h)
        guard status == 0, !cubin.isEmpty else {
            throw JitLinkError(
                call: "nvJitLinkGetLinkedCubin", status: status, log: api.errorLog(h),
                hint: "link for a real architecture (-arch=sm_XX), not a virtual one")
        }
        return JitLinkResult(cubin: cubin, infoLog: api.infoLog(h))
    }
}

/// nvJitLink opened with dlopen (see `NVJitLinkLocator` for where it is looked for).
///
/// `@unchecked Sendable`: the function table is immutable, and nvJitLink is thread-safe for distinct handles.
public final class NVJitLink: JitLinkAPI, @unchecked Sendable {
    /// The library that was loaded.
    public let path: String
    /// nvJitLink's version (`nvJitLinkVersion`), e.g. 13.0.
    public let version: (major: Int, minor: Int)
    private let fn: Functions

    /// "nvJitLink MAJOR.MINOR FILE SIZE bytes": the version, the library's file name and its size.
    public var identity: String {
        "nvJitLink \(version.major).\(version.minor) \(path.split(separator: "/").last ?? "") "
            + "\(SystemFiles.fileSize(path).map(String.init) ?? "?") bytes"
    }

    /// nvJitLink found from the process environment on first use; the error lists every place tried.
    public static let shared: Result<NVJitLink, CUDAError> = Result { () throws(CUDAError) in
        try load(environment: ProcessEnvironment.current())
    }

    /// Loads the first nvJitLink among `NVJitLinkLocator.candidates(environment:)` that resolves every entry point.
    public static func load(environment: [String: String]) throws(CUDAError) -> NVJitLink {
        let (found, attempts) = DynamicLibrary.loadFirst(NVJitLinkLocator.candidates(environment: environment)) {
            (library, _) throws(CUDAError) in try NVJitLink(library, path: library.path)
        }
        if let found { return found }
        let variable = NVJitLinkLocator.overrideVariable
        let hint =
            environment[variable].flatMap { $0.isEmpty ? nil : "\(variable)=\($0) is set, so only it was tried" }
            ?? "install it (pip install nvidia-nvjitlink) or set \(variable) to its file or folder"
        throw .libraryNotFound(library: "nvJitLink", attempts: attempts, hint: hint)
    }

    private init(_ library: DynamicLibrary, path: String) throws(CUDAError) {
        fn = try Functions(library, "nvJitLink (\(path))")
        self.path = path
        var major: UInt32 = 0, minor: UInt32 = 0
        guard fn.version(&major, &minor) == 0 else {
            throw .missingSymbol(library: "nvJitLink (\(path))", symbol: "a working nvJitLinkVersion")
        }
        version = (Int(major), Int(minor))
    }

    /// `nvJitLinkCreate`, with `options` passed as C strings.
    public func create(_ handle: inout OpaquePointer?, options: [String]) -> UInt32 {
        withCStrings(options) { fn.create(&handle, UInt32(options.count), $0) }
    }

    /// `nvJitLinkDestroy`.
    public func destroy(_ handle: inout OpaquePointer?) -> UInt32 { fn.destroy(&handle) }

    /// `nvJitLinkAddData`.
    public func addData(_ handle: OpaquePointer, kind: UInt32, bytes: [UInt8], name: String) -> UInt32 {
        bytes.withUnsafeBytes { fn.addData(handle, kind, $0.baseAddress, bytes.count, name) }
    }

    /// `nvJitLinkAddFile`.
    public func addFile(_ handle: OpaquePointer, kind: UInt32, path: String) -> UInt32 {
        fn.addFile(handle, kind, path)
    }

    /// `nvJitLinkComplete`.
    public func complete(_ handle: OpaquePointer) -> UInt32 { fn.complete(handle) }

    /// `nvJitLinkGetLinkedCubinSize` then `nvJitLinkGetLinkedCubin`; the cubin is empty when either fails.
    public func linkedCubin(_ handle: OpaquePointer) -> (status: UInt32, cubin: [UInt8]) {
        var size = 0
        let sized = fn.cubinSize(handle, &size)
        guard sized == 0, size > 0 else { return (sized, []) }
        var cubin = [UInt8](repeating: 0, count: size)
        let got = cubin.withUnsafeMutableBytes { fn.cubin(handle, $0.baseAddress) }
        return (got, got == 0 ? cubin : [])
    }

    /// `nvJitLinkGetErrorLogSize` then `nvJitLinkGetErrorLog`; empty when there is no log or a call fails.
    public func errorLog(_ handle: OpaquePointer) -> String { log(handle, fn.errorLogSize, fn.errorLog) }

    /// `nvJitLinkGetInfoLogSize` then `nvJitLinkGetInfoLog`; empty when there is no log or a call fails.
    public func infoLog(_ handle: OpaquePointer) -> String { log(handle, fn.infoLogSize, fn.infoLog) }

    private func log(_ handle: OpaquePointer, _ size: Functions.LogSize, _ read: Functions.Log) -> String {
        var n = 0
        guard size(handle, &n) == 0, n > 1 else { return "" }
        var buffer = [CChar](repeating: 0, count: n + 1)
        guard read(handle, &buffer) == 0 else { return "" }
        return String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The entry points (the unversioned names, which every nvJitLink 12.x and 13.x exports).
    private struct Functions {
        typealias Create = @convention(c) (
            UnsafeMutablePointer<OpaquePointer?>, UInt32, UnsafePointer<UnsafePointer<CChar>?>
        ) -> UInt32
        typealias Destroy = @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> UInt32
        typealias AddData = @convention(c) (OpaquePointer, UInt32, UnsafeRawPointer?, Int, UnsafePointer<CChar>)
            -> UInt32
        typealias AddFile = @convention(c) (OpaquePointer, UInt32, UnsafePointer<CChar>) -> UInt32
        typealias Complete = @convention(c) (OpaquePointer) -> UInt32
        typealias Size = @convention(c) (OpaquePointer, UnsafeMutablePointer<Int>) -> UInt32
        typealias Bytes = @convention(c) (OpaquePointer, UnsafeMutableRawPointer?) -> UInt32
        typealias LogSize = @convention(c) (OpaquePointer, UnsafeMutablePointer<Int>) -> UInt32
        typealias Log = @convention(c) (OpaquePointer, UnsafeMutablePointer<CChar>) -> UInt32
        typealias Version = @convention(c) (UnsafeMutablePointer<UInt32>, UnsafeMutablePointer<UInt32>) -> UInt32

        let create: Create
        let destroy: Destroy
        let addData: AddData
        let addFile: AddFile
        let complete: Complete
        let cubinSize: Size
        let cubin: Bytes
        let errorLogSize: LogSize
        let errorLog: Log
        let infoLogSize: LogSize
        let infoLog: Log
        let version: Version

        init(_ l: DynamicLibrary, _ name: String) throws(CUDAError) {
            func f<T>(_ symbol: String, _ type: T.Type) throws(CUDAError) -> T {
                try l.function(symbol, as: type, library: name)
            }
            create = try f("nvJitLinkCreate", Create.self)
            destroy = try f("nvJitLinkDestroy", Destroy.self)
            addData = try f("nvJitLinkAddData", AddData.self)
            addFile = try f("nvJitLinkAddFile", AddFile.self)
            complete = try f("nvJitLinkComplete", Complete.self)
            cubinSize = try f("nvJitLinkGetLinkedCubinSize", Size.self)
            cubin = try f("nvJitLinkGetLinkedCubin", Bytes.self)
            errorLogSize = try f("nvJitLinkGetErrorLogSize", LogSize.self)
            errorLog = try f("nvJitLinkGetErrorLog", Log.self)
            infoLogSize = try f("nvJitLinkGetInfoLogSize", LogSize.self)
            infoLog = try f("nvJitLinkGetInfoLog", Log.self)
            version = try f("nvJitLinkVersion", Version.self)
        }
    }
}
