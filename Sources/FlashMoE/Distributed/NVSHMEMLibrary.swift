import CCUDA
import Synchronization

/// NVSHMEM's host library (`libnvshmem_host.so.3`, shipped in the `nvidia-nvshmem-cu13` / `-cu12` wheels) opened
/// with dlopen, and the unique-id bootstrap through a `Rendezvous`: the host half of the transport between nodes
/// that `docs/multinode.md` plans (§4, §8 stage 4). The kernel does not use NVSHMEM yet (that needs the device
/// library linked by nvJitLink, stage 3); this is the loader and the collective init, testable on their own.
///
/// Only entry points the library exports are used: `nvshmemx_init_attr` is a `static inline` in the headers that
/// calls a function of the static device library, so the host-only init is `nvshmemx_hostlib_init_attr`, and each
/// loaded module then needs `nvshmemx_cumodule_init`. The structs passed in (`nvshmemx_uniqueid_v1`, 128 bytes;
/// the init attributes, 144 bytes) were checked against the headers of the versions in `checkedVersions` only, so
/// `load` refuses any other version (`NVSHMEMVersionCheck`).
///
/// `@unchecked Sendable`: the function table is immutable and `state` is a Mutex; NVSHMEM's host calls are made
/// from one thread per PE.
public final class NVSHMEMLibrary: @unchecked Sendable {
    /// The file that was opened.
    public let path: String
    /// `nvshmem_info_get_version`: the OpenSHMEM spec version the library implements (e.g. 1.3).
    public let specVersion: (major: Int, minor: Int)
    /// `nvshmemx_vendor_get_version_info`: the library's own release (e.g. 3.4.5).
    public let version: NVSHMEMVersion
    private let fn: Functions
    /// Whether `nvshmemx_hostlib_init_attr` succeeded and `finalize` has not run yet.
    private let initialized = Mutex(false)

    /// The environment variable naming the library file, or a folder holding `libnvshmem_host.so.3`.
    public static let overrideVariable = "FLASHMOE_NVSHMEM"
    static let soname = "libnvshmem_host.so.3"
    /// `NVSHMEMX_INIT_WITH_UNIQUEID` (host/nvshmemx_api.h).
    static let initWithUniqueID: UInt32 = 1 << 3
    /// Bytes of `nvshmemx_uniqueid_t`.
    public static let uniqueIDBytes = 128
    /// Bytes of `nvshmemx_init_attr_t` (v2).
    static let initAttrBytes = 144

    /// Where to look, in order: `FLASHMOE_NVSHMEM` alone when set; else the soname through the loader, then the
    /// wheels' `nvidia/nvshmem/lib/` under the Python site folders NVRTC is searched in.
    public static func candidates(environment: [String: String], glob: ((String) -> [String])? = nil) -> [String] {
        let glob = glob ?? SystemFiles.glob
        if let explicit = environment[overrideVariable], !explicit.isEmpty {
            let path = explicit.hasSuffix("/") ? String(explicit.dropLast()) : explicit
            return path.hasSuffix(".so") || path.contains(".so.") ? [path] : ["\(path)/\(soname)"]
        }
        var result = [soname]
        for site in NVRTCLocator.siteDirectories(environment: environment) {
            let pattern = "\(site)/nvidia/nvshmem/lib/\(soname)"
            let expanded = pattern.contains("*") ? glob(pattern).sorted(by: >) : [pattern]
            for path in expanded.isEmpty ? [pattern] : expanded where !result.contains(path) { result.append(path) }
        }
        return result
    }

    /// Opens the first candidate that loads and resolves every entry point, and checks its version.
    ///
    /// - Throws: `CUDAError.libraryNotFound` listing every place tried and how to install it,
    ///   `.missingSymbol` for a library without an entry point used here, or `.invalidArgument` for a version
    ///   whose struct layouts were not checked (`NVSHMEMVersionCheck`).
    public static func load(environment: [String: String] = ProcessEnvironment.current()) throws(CUDAError)
        -> NVSHMEMLibrary
    {
        // RTLD_GLOBAL: NVSHMEM loads its bootstrap and transport plugins, which resolve symbols of the host library.
        var attempts: [LibraryAttempt] = []
        for candidate in candidates(environment: environment) {
            switch DynamicLibrary.open(candidate, global: true) {
            case .success(let library): return try NVSHMEMLibrary(library, path: candidate, environment: environment)
            case .failure(let attempt): attempts.append(attempt)
            }
        }
        throw .libraryNotFound(
            library: "NVSHMEM (\(soname))", attempts: attempts,
            hint: "pip install nvidia-nvshmem-cu13 (or -cu12), or point \(overrideVariable) at its nvidia/nvshmem/lib")
    }

    private init(_ library: DynamicLibrary, path: String, environment: [String: String]) throws(CUDAError) {
        self.path = path
        fn = try Functions(library)
        var major: Int32 = 0, minor: Int32 = 0
        fn.infoGetVersion(&major, &minor)
        specVersion = (Int(major), Int(minor))
        var patch: Int32 = 0
        fn.vendorGetVersionInfo(&major, &minor, &patch)
        version = NVSHMEMVersion(major: Int(major), minor: Int(minor), patch: Int(patch))
        try NVSHMEMVersionCheck.check(version, path: path, environment: environment)
    }

    // MARK: - Bootstrap

    /// A new unique id (`nvshmemx_get_uniqueid`), made by one rank and given to all.
    public func uniqueID() throws(NVSHMEMError) -> [UInt8] {
        var id = [UInt8](repeating: 0, count: Self.uniqueIDBytes)
        // NVSHMEMX_UNIQUEID_INITIALIZER: the version word, (1 << 16) + sizeof.
        Self.store(Int32((1 << 16) + Self.uniqueIDBytes), in: &id, at: 0)
        let status = id.withUnsafeMutableBytes { fn.getUniqueID($0.baseAddress!) }
        try NVSHMEMError.check(status, "nvshmemx_get_uniqueid")
        return id
    }

    /// Initializes this process as PE `rank` of `ranks` with `uniqueID` (`nvshmemx_set_attr_uniqueid_args`, then
    /// `nvshmemx_hostlib_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID)`); collective: every PE calls it. The CUDA context
    /// of this PE's GPU must be current.
    public func initialize(rank: Int, ranks: Int, uniqueID: [UInt8]) throws(NVSHMEMError) {
        guard uniqueID.count == Self.uniqueIDBytes else {
            throw NVSHMEMError(call: "initialize", status: -1, detail: "a unique id has \(Self.uniqueIDBytes) bytes, not \(uniqueID.count)")
        }
        var id = uniqueID
        var attr = Self.initialAttributes(layout: NVSHMEMVersionCheck.layout(of: version) ?? .v2)
        let status: Int32 = id.withUnsafeMutableBytes { idBytes in
            attr.withUnsafeMutableBytes { attrBytes in
                let set = fn.setAttrUniqueIDArgs(Int32(rank), Int32(ranks), idBytes.baseAddress!, attrBytes.baseAddress!)
                guard set == 0 else { return -1000 + set }
                return fn.hostlibInitAttr(Self.initWithUniqueID, attrBytes.baseAddress!)
            }
        }
        if status <= -1000 { try NVSHMEMError.check(status + 1000, "nvshmemx_set_attr_uniqueid_args") }
        try NVSHMEMError.check(status, "nvshmemx_hostlib_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID)")
        initialized.withLock { $0 = true }
    }

    /// Whether this process is an initialized PE (init succeeded, `finalize` not yet run).
    public var isInitialized: Bool { initialized.withLock { $0 } }

    /// Rank 0 makes the unique id and posts it; every rank reads it and initializes (the rendezvous's rank and
    /// world size become the PE and PE count).
    public func bootstrap(_ rendezvous: any RankExchange) throws {
        let mine = rendezvous.rank == 0 ? try uniqueID() : []
        let posted = try rendezvous.allGather("nvshmem unique id", mine)
        try initialize(rank: rendezvous.rank, ranks: rendezvous.worldSize, uniqueID: posted[0])
    }

    /// `nvshmemx_init_attr_t` as the library's own NVSHMEMX_INIT_ATTR_INITIALIZER leaves it: versions set, no MPI
    /// communicator, unique-id arguments unset (-1); v2 (3.8) also has the device unset (-1) where v1 (3.4) has
    /// padding. Offsets (both layouts): attr.version 0, mpi_comm 8, args.version 16, uid_args.version 24, id 32,
    /// myrank 40, nranks 44, v2's cuda_device_id 48.
    static func initialAttributes(layout: NVSHMEMInitAttrLayout = .v2) -> [UInt8] {
        var a = [UInt8](repeating: 0, count: initAttrBytes)
        let v = Int32(layout.rawValue) << 16
        store(v + Int32(initAttrBytes), in: &a, at: 0)  // attr.version
        store(v + 128, in: &a, at: 16)  // args.version (nvshmemx_init_args_v1/v2, 128 bytes)
        store(Int32((1 << 16) + 24), in: &a, at: 24)  // args.uid_args.version (24 bytes)
        store(Int32(-1), in: &a, at: 40)  // args.uid_args.myrank
        store(Int32(-1), in: &a, at: 44)  // args.uid_args.nranks
        if layout == .v2 { store(Int32(-1), in: &a, at: 48) }  // args.cuda_device_id
        return a
    }

    private static func store(_ v: Int32, in bytes: inout [UInt8], at offset: Int) {
        withUnsafeBytes(of: v.littleEndian) { for (i, b) in $0.enumerated() { bytes[offset + i] = b } }
    }

    // MARK: - After init

    /// This PE (`nvshmem_my_pe`).
    public var myPE: Int { Int(fn.myPE()) }
    /// PEs (`nvshmem_n_pes`).
    public var peCount: Int { Int(fn.nPEs()) }

    /// `nvshmem_malloc`: collective, the same size on every PE; nil when the symmetric heap is exhausted.
    public func allocate(bytes: Int) -> UInt64? {
        fn.malloc(bytes).map { UInt64(UInt(bitPattern: $0)) }
    }

    /// `nvshmem_free` (collective).
    public func free(_ address: UInt64) { fn.free(UnsafeMutableRawPointer(bitPattern: UInt(address))) }

    /// `nvshmem_ptr`: where PE `pe`'s copy of the symmetric `address` is mapped here, when loads and stores reach
    /// it (NVLink or the same GPU); nil when only the network does.
    public func peerAddress(_ address: UInt64, pe: Int) -> UInt64? {
        fn.ptr(UnsafeRawPointer(bitPattern: UInt(address)), Int32(pe)).map { UInt64(UInt(bitPattern: $0)) }
    }

    /// `nvshmem_barrier_all`.
    public func barrierAll() { fn.barrierAll() }

    /// `nvshmemx_cumodule_init`: fills a loaded module's device-side NVSHMEM state (after init, before a launch).
    public func initializeModule(_ module: CUmodule) throws(NVSHMEMError) {
        try NVSHMEMError.check(fn.cumoduleInit(module), "nvshmemx_cumodule_init")
    }

    /// `nvshmemx_hostlib_finalize` (collective), once, and only after a successful `initialize`: a failed or
    /// repeated call does nothing. Call it with this PE's CUDA context current, before the process exits: a PE
    /// left initialized at exit has NVSHMEM's proxy thread running while the CUDA driver tears down.
    public func finalize() {
        let wasInitialized = initialized.withLock { was in
            defer { was = false }
            return was
        }
        if wasInitialized { fn.hostlibFinalize() }
    }

    // MARK: - Entry points

    private struct Functions {
        typealias GetUniqueID = @convention(c) (UnsafeMutableRawPointer) -> Int32
        typealias SetAttrUniqueIDArgs = @convention(c) (Int32, Int32, UnsafeRawPointer, UnsafeMutableRawPointer) -> Int32
        typealias HostlibInitAttr = @convention(c) (UInt32, UnsafeMutableRawPointer) -> Int32
        typealias Void0 = @convention(c) () -> Void
        typealias Int0 = @convention(c) () -> Int32
        typealias Malloc = @convention(c) (Int) -> UnsafeMutableRawPointer?
        typealias Free = @convention(c) (UnsafeMutableRawPointer?) -> Void
        typealias Ptr = @convention(c) (UnsafeRawPointer?, Int32) -> UnsafeMutableRawPointer?
        typealias ModuleInit = @convention(c) (CUmodule) -> Int32
        typealias InfoGetVersion = @convention(c) (UnsafeMutablePointer<Int32>, UnsafeMutablePointer<Int32>) -> Void
        typealias VendorVersion = @convention(c) (
            UnsafeMutablePointer<Int32>, UnsafeMutablePointer<Int32>, UnsafeMutablePointer<Int32>
        ) -> Void

        let getUniqueID: GetUniqueID
        let setAttrUniqueIDArgs: SetAttrUniqueIDArgs
        let hostlibInitAttr: HostlibInitAttr
        let hostlibFinalize: Void0
        let myPE: Int0
        let nPEs: Int0
        let malloc: Malloc
        let free: Free
        let ptr: Ptr
        let barrierAll: Void0
        let cumoduleInit: ModuleInit
        let infoGetVersion: InfoGetVersion
        let vendorGetVersionInfo: VendorVersion

        init(_ l: DynamicLibrary) throws(CUDAError) {
            let name = "NVSHMEM (\(NVSHMEMLibrary.soname))"
            getUniqueID = try l.function("nvshmemx_get_uniqueid", as: GetUniqueID.self, library: name)
            setAttrUniqueIDArgs = try l.function(
                "nvshmemx_set_attr_uniqueid_args", as: SetAttrUniqueIDArgs.self, library: name)
            hostlibInitAttr = try l.function("nvshmemx_hostlib_init_attr", as: HostlibInitAttr.self, library: name)
            hostlibFinalize = try l.function("nvshmemx_hostlib_finalize", as: Void0.self, library: name)
            myPE = try l.function("nvshmem_my_pe", as: Int0.self, library: name)
            nPEs = try l.function("nvshmem_n_pes", as: Int0.self, library: name)
            malloc = try l.function("nvshmem_malloc", as: Malloc.self, library: name)
            free = try l.function("nvshmem_free", as: Free.self, library: name)
            ptr = try l.function("nvshmem_ptr", as: Ptr.self, library: name)
            barrierAll = try l.function("nvshmem_barrier_all", as: Void0.self, library: name)
            cumoduleInit = try l.function("nvshmemx_cumodule_init", as: ModuleInit.self, library: name)
            infoGetVersion = try l.function("nvshmem_info_get_version", as: InfoGetVersion.self, library: name)
            vendorGetVersionInfo = try l.function(
                "nvshmemx_vendor_get_version_info", as: VendorVersion.self, library: name)
        }
    }
}

/// An NVSHMEM host call returned a non-zero status.
public struct NVSHMEMError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The call.
    public let call: String
    /// Its status (NVSHMEM's int return value).
    public let status: Int32
    /// What to check.
    public let detail: String

    static func check(_ status: Int32, _ call: String) throws(NVSHMEMError) {
        guard status != 0 else { return }
        throw NVSHMEMError(
            call: call, status: status,
            detail: "set NVSHMEM_DEBUG=INFO for NVSHMEM's own account; every PE must call it with the same unique id "
                + "and PE count, one GPU per PE")
    }

    /// `call failed with status N: detail`.
    public var description: String { "\(call) failed with status \(status): \(detail)" }
}
