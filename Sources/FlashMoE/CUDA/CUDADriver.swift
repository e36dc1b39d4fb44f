import CCUDA

/// The real CUDA driver: `libcuda.so.1` opened with dlopen and a table of its entry points.
///
/// Symbols are resolved through `cuGetProcAddress_v2` with the CUDA 12.0 ABI (so a newer driver hands back the
/// 12.0 semantics of every call, whatever it has added since), falling back to the versioned exported names
/// (`cuMemAlloc_v2`, ...) on a driver that predates it. `load()` also calls `cuInit(0)`: a loaded driver is an
/// initialized one.
///
/// `@unchecked Sendable`: the table is immutable after `load()`, and the driver API is thread-safe.
public final class CUDADriver: CUDADriverAPI, @unchecked Sendable {
    /// The library as the loader found it (a full path where it can tell).
    public let libraryPath: String
    /// How the entry points were resolved: "cuGetProcAddress_v2 (CUDA 12.0 ABI)" or "dlsym".
    public let resolution: String
    private let fn: Functions
    private let ipc: IPCFunctions
    private let tensorMaps: TensorMapFunctions

    /// The process-wide driver, loaded and initialized on first use; the error says why there is none.
    public static let shared: Result<CUDADriver, CUDAError> = Result { () throws(CUDAError) in try load() }

    /// Opens `library`, resolves every entry point and calls `cuInit(0)`.
    public static func load(library: String = "libcuda.so.1") throws(CUDAError) -> CUDADriver {
        let opened: DynamicLibrary
        switch DynamicLibrary.open(library) {
        case .success(let lib): opened = lib
        case .failure(let attempt):
            throw .libraryNotFound(
                library: "the CUDA driver (\(library))", attempts: [attempt], hint: "install the NVIDIA driver")
        }
        let driver = try CUDADriver(opened)
        try driver.check(driver.initialize(0), "cuInit")
        return driver
    }

    private init(_ library: DynamicLibrary) throws(CUDAError) {
        libraryPath = library.loadedPath
        let resolver = try Resolver(library)
        resolution = resolver.viaProcAddress ? "cuGetProcAddress_v2 (CUDA 12.0 ABI)" : "dlsym"
        fn = try Functions(resolver)
        ipc = try IPCFunctions(resolver)
        tensorMaps = TensorMapFunctions(resolver)
    }

    // MARK: CUDADriverAPI

    /// `cuInit`.
    public func initialize(_ flags: UInt32) -> CUresult { fn.cuInit(flags) }
    /// `cuDriverGetVersion`.
    public func driverGetVersion(_ version: inout Int32) -> CUresult { fn.cuDriverGetVersion(&version) }

    /// `cuGetErrorName`; nil when the driver does not know `code`.
    public func errorName(_ code: CUresult) -> String? {
        var text: UnsafePointer<CChar>?
        return fn.cuGetErrorName(code, &text) == CUDA_SUCCESS ? text.map { String(cString: $0) } : nil
    }

    /// `cuGetErrorString`; nil when the driver does not know `code`.
    public func errorString(_ code: CUresult) -> String? {
        var text: UnsafePointer<CChar>?
        return fn.cuGetErrorString(code, &text) == CUDA_SUCCESS ? text.map { String(cString: $0) } : nil
    }

    /// `cuDeviceGetCount`.
    public func deviceGetCount(_ count: inout Int32) -> CUresult { fn.cuDeviceGetCount(&count) }
    /// `cuDeviceGet`.
    public func deviceGet(_ device: inout CUdevice, _ ordinal: Int32) -> CUresult { fn.cuDeviceGet(&device, ordinal) }

    /// `cuDeviceGetName` into a 256-byte buffer; `name` is set only on success.
    public func deviceGetName(_ name: inout String, _ device: CUdevice) -> CUresult {
        var buffer = [CChar](repeating: 0, count: 256)
        let result = fn.cuDeviceGetName(&buffer, Int32(buffer.count), device)
        if result == CUDA_SUCCESS {
            name = String(decoding: buffer.prefix(while: { $0 != 0 }).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        return result
    }

    /// `cuDeviceGetAttribute`.
    public func deviceGetAttribute(_ value: inout Int32, _ attribute: CUdevice_attribute, _ device: CUdevice)
        -> CUresult
    { fn.cuDeviceGetAttribute(&value, attribute, device) }

    /// `cuDeviceTotalMem_v2`.
    public func deviceTotalMem(_ bytes: inout Int, _ device: CUdevice) -> CUresult {
        fn.cuDeviceTotalMem_v2(&bytes, device)
    }

    /// `cuDeviceCanAccessPeer`.
    public func deviceCanAccessPeer(_ canAccess: inout Int32, _ device: CUdevice, _ peer: CUdevice) -> CUresult {
        fn.cuDeviceCanAccessPeer(&canAccess, device, peer)
    }

    /// `cuDeviceGetP2PAttribute`.
    public func deviceGetP2PAttribute(
        _ value: inout Int32, _ attribute: CUdevice_P2PAttribute, _ source: CUdevice, _ destination: CUdevice
    ) -> CUresult {
        fn.cuDeviceGetP2PAttribute(&value, attribute, source, destination)
    }

    /// `cuDevicePrimaryCtxRetain`.
    public func primaryContextRetain(_ context: inout CUcontext?, _ device: CUdevice) -> CUresult {
        fn.cuDevicePrimaryCtxRetain(&context, device)
    }

    /// `cuDevicePrimaryCtxRelease_v2`.
    public func primaryContextRelease(_ device: CUdevice) -> CUresult { fn.cuDevicePrimaryCtxRelease_v2(device) }
    /// `cuCtxGetCurrent`.
    public func contextGetCurrent(_ context: inout CUcontext?) -> CUresult { fn.cuCtxGetCurrent(&context) }
    /// `cuCtxSetCurrent`.
    public func contextSetCurrent(_ context: CUcontext?) -> CUresult { fn.cuCtxSetCurrent(context) }
    /// `cuCtxSynchronize`.
    public func contextSynchronize() -> CUresult { fn.cuCtxSynchronize() }

    /// `cuCtxEnablePeerAccess`.
    public func contextEnablePeerAccess(_ peer: CUcontext, _ flags: UInt32) -> CUresult {
        fn.cuCtxEnablePeerAccess(peer, flags)
    }

    /// `cuMemAlloc_v2`.
    public func memAlloc(_ address: inout CUdeviceptr, _ bytes: Int) -> CUresult { fn.cuMemAlloc_v2(&address, bytes) }
    /// `cuMemFree_v2`.
    public func memFree(_ address: CUdeviceptr) -> CUresult { fn.cuMemFree_v2(address) }
    /// `cuMemGetInfo_v2`.
    public func memGetInfo(_ free: inout Int, _ total: inout Int) -> CUresult { fn.cuMemGetInfo_v2(&free, &total) }

    /// `cuMemcpyHtoD_v2`, or `cuMemcpyHtoDAsync_v2` when `stream` is not nil.
    public func memcpyHtoD(_ destination: CUdeviceptr, _ source: UnsafeRawPointer, _ bytes: Int, _ stream: CUstream?)
        -> CUresult
    {
        guard let stream else { return fn.cuMemcpyHtoD_v2(destination, source, bytes) }
        return fn.cuMemcpyHtoDAsync_v2(destination, source, bytes, stream)
    }

    /// `cuMemcpyDtoH_v2`, or `cuMemcpyDtoHAsync_v2` when `stream` is not nil.
    public func memcpyDtoH(
        _ destination: UnsafeMutableRawPointer, _ source: CUdeviceptr, _ bytes: Int, _ stream: CUstream?
    ) -> CUresult {
        guard let stream else { return fn.cuMemcpyDtoH_v2(destination, source, bytes) }
        return fn.cuMemcpyDtoHAsync_v2(destination, source, bytes, stream)
    }

    /// `cuMemcpyDtoD_v2`, or `cuMemcpyDtoDAsync_v2` when `stream` is not nil.
    public func memcpyDtoD(_ destination: CUdeviceptr, _ source: CUdeviceptr, _ bytes: Int, _ stream: CUstream?)
        -> CUresult
    {
        guard let stream else { return fn.cuMemcpyDtoD_v2(destination, source, bytes) }
        return fn.cuMemcpyDtoDAsync_v2(destination, source, bytes, stream)
    }

    /// `cuMemsetD8_v2`, or `cuMemsetD8Async` when `stream` is not nil.
    public func memsetD8(_ destination: CUdeviceptr, _ value: UInt8, _ count: Int, _ stream: CUstream?) -> CUresult {
        guard let stream else { return fn.cuMemsetD8_v2(destination, value, count) }
        return fn.cuMemsetD8Async(destination, value, count, stream)
    }

    /// `cuMemsetD32_v2`, or `cuMemsetD32Async` when `stream` is not nil.
    public func memsetD32(_ destination: CUdeviceptr, _ value: UInt32, _ count: Int, _ stream: CUstream?) -> CUresult {
        guard let stream else { return fn.cuMemsetD32_v2(destination, value, count) }
        return fn.cuMemsetD32Async(destination, value, count, stream)
    }

    /// `cuModuleLoadData`.
    public func moduleLoadData(_ module: inout CUmodule?, _ image: UnsafeRawPointer) -> CUresult {
        fn.cuModuleLoadData(&module, image)
    }

    /// `cuModuleUnload`.
    public func moduleUnload(_ module: CUmodule) -> CUresult { fn.cuModuleUnload(module) }

    /// `cuModuleGetFunction`.
    public func moduleGetFunction(_ function: inout CUfunction?, _ module: CUmodule, _ name: String) -> CUresult {
        fn.cuModuleGetFunction(&function, module, name)
    }

    /// `cuModuleGetGlobal_v2`.
    public func moduleGetGlobal(_ address: inout CUdeviceptr, _ bytes: inout Int, _ module: CUmodule, _ name: String)
        -> CUresult
    { fn.cuModuleGetGlobal_v2(&address, &bytes, module, name) }

    /// `cuFuncGetAttribute`.
    public func functionGetAttribute(_ value: inout Int32, _ attribute: CUfunction_attribute, _ function: CUfunction)
        -> CUresult
    { fn.cuFuncGetAttribute(&value, attribute, function) }

    /// `cuFuncSetAttribute`.
    public func functionSetAttribute(_ function: CUfunction, _ attribute: CUfunction_attribute, _ value: Int32)
        -> CUresult
    { fn.cuFuncSetAttribute(function, attribute, value) }

    /// `cuOccupancyMaxActiveBlocksPerMultiprocessor`.
    public func occupancyMaxActiveBlocksPerMultiprocessor(
        _ blocks: inout Int32, _ function: CUfunction, _ blockSize: Int32, _ dynamicSharedBytes: Int
    ) -> CUresult {
        fn.cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, function, blockSize, dynamicSharedBytes)
    }

    /// `cuLaunchKernel`, with no `extra` options.
    public func launchKernel(
        _ function: CUfunction, grid: (UInt32, UInt32, UInt32), block: (UInt32, UInt32, UInt32),
        sharedBytes: UInt32, stream: CUstream?, parameters: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    ) -> CUresult {
        fn.cuLaunchKernel(
            function, grid.0, grid.1, grid.2, block.0, block.1, block.2, sharedBytes, stream, parameters, nil)
    }

    /// `cuLaunchCooperativeKernel`.
    public func launchCooperativeKernel(
        _ function: CUfunction, grid: (UInt32, UInt32, UInt32), block: (UInt32, UInt32, UInt32),
        sharedBytes: UInt32, stream: CUstream?, parameters: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    ) -> CUresult {
        fn.cuLaunchCooperativeKernel(
            function, grid.0, grid.1, grid.2, block.0, block.1, block.2, sharedBytes, stream, parameters)
    }

    /// `cuStreamCreate`.
    public func streamCreate(_ stream: inout CUstream?, _ flags: UInt32) -> CUresult { fn.cuStreamCreate(&stream, flags) }
    /// `cuStreamDestroy_v2`.
    public func streamDestroy(_ stream: CUstream) -> CUresult { fn.cuStreamDestroy_v2(stream) }
    /// `cuStreamSynchronize`.
    public func streamSynchronize(_ stream: CUstream?) -> CUresult { fn.cuStreamSynchronize(stream) }
    /// `cuEventCreate`.
    public func eventCreate(_ event: inout CUevent?, _ flags: UInt32) -> CUresult { fn.cuEventCreate(&event, flags) }
    /// `cuEventDestroy_v2`.
    public func eventDestroy(_ event: CUevent) -> CUresult { fn.cuEventDestroy_v2(event) }
    /// `cuEventRecord`.
    public func eventRecord(_ event: CUevent, _ stream: CUstream?) -> CUresult { fn.cuEventRecord(event, stream) }
    /// `cuEventSynchronize`.
    public func eventSynchronize(_ event: CUevent) -> CUresult { fn.cuEventSynchronize(event) }

    /// `cuEventElapsedTime`: the milliseconds from `start` to `end`.
    public func eventElapsedTime(_ milliseconds: inout Float, _ start: CUevent, _ end: CUevent) -> CUresult {
        fn.cuEventElapsedTime(&milliseconds, start, end)
    }

    // MARK: Device-resident forward (h1)

    /// `cuMemHostAlloc`.
    public func memHostAlloc(_ pointer: inout UnsafeMutableRawPointer?, _ bytes: Int, _ flags: UInt32) -> CUresult {
        fn.cuMemHostAlloc(&pointer, bytes, flags)
    }

    /// `cuMemHostGetDevicePointer_v2`.
    public func memHostGetDevicePointer(
        _ address: inout CUdeviceptr, _ pointer: UnsafeMutableRawPointer, _ flags: UInt32
    ) -> CUresult { fn.cuMemHostGetDevicePointer_v2(&address, pointer, flags) }

    /// `cuMemFreeHost`.
    public func memFreeHost(_ pointer: UnsafeMutableRawPointer) -> CUresult { fn.cuMemFreeHost(pointer) }

    /// `cuStreamGetCtx`.
    public func streamGetContext(_ stream: CUstream?, _ context: inout CUcontext?) -> CUresult {
        fn.cuStreamGetCtx(stream, &context)
    }
}

/// Finds entry points: `cuGetProcAddress_v2(base name, 12000)` first, the exported ABI name second.
private struct Resolver {
    /// The CUDA version whose ABI we ask cuGetProcAddress for.
    static let abiVersion: Int32 = 12000
    let library: DynamicLibrary
    let procAddress: PFN_cuGetProcAddress_v2?

    var viaProcAddress: Bool { procAddress != nil }

    init(_ library: DynamicLibrary) throws(CUDAError) {
        self.library = library
        procAddress = library.address(of: "cuGetProcAddress_v2").map {
            unsafeBitCast($0, to: PFN_cuGetProcAddress_v2.self)
        }
    }

    /// `base` is the API name ("cuMemAlloc"), `exported` the ABI symbol of its 12.0 version ("cuMemAlloc_v2").
    func resolve<T>(_ base: String, _ exported: String, as type: T.Type) throws(CUDAError) -> T {
        if let procAddress {
            var pointer: UnsafeMutableRawPointer?
            var status = CU_GET_PROC_ADDRESS_SUCCESS
            let flags = cuuint64_t(CU_GET_PROC_ADDRESS_LEGACY_STREAM)
            if procAddress(base, &pointer, Self.abiVersion, flags, &status) == CUDA_SUCCESS,
                status == CU_GET_PROC_ADDRESS_SUCCESS, let pointer
            {
                return unsafeBitCast(pointer, to: type)
            }
        }
        return try library.function(exported, as: type, library: "libcuda.so.1")
    }
}

/// The resolved driver entry points, typed by the CCUDA typedefs.
private struct Functions {
    let cuInit: PFN_cuInit
    let cuDriverGetVersion: PFN_cuDriverGetVersion
    let cuGetErrorName: PFN_cuGetErrorName
    let cuGetErrorString: PFN_cuGetErrorString
    let cuDeviceGetCount: PFN_cuDeviceGetCount
    let cuDeviceGet: PFN_cuDeviceGet
    let cuDeviceGetName: PFN_cuDeviceGetName
    let cuDeviceGetAttribute: PFN_cuDeviceGetAttribute
    let cuDeviceTotalMem_v2: PFN_cuDeviceTotalMem_v2
    let cuDeviceCanAccessPeer: PFN_cuDeviceCanAccessPeer
    let cuDeviceGetP2PAttribute: PFN_cuDeviceGetP2PAttribute
    let cuDevicePrimaryCtxRetain: PFN_cuDevicePrimaryCtxRetain
    let cuDevicePrimaryCtxRelease_v2: PFN_cuDevicePrimaryCtxRelease_v2
    let cuCtxGetCurrent: PFN_cuCtxGetCurrent
    let cuCtxSetCurrent: PFN_cuCtxSetCurrent
    let cuCtxSynchronize: PFN_cuCtxSynchronize
    let cuCtxEnablePeerAccess: PFN_cuCtxEnablePeerAccess
    let cuMemAlloc_v2: PFN_cuMemAlloc_v2
    let cuMemFree_v2: PFN_cuMemFree_v2
    let cuMemGetInfo_v2: PFN_cuMemGetInfo_v2
    let cuMemcpyHtoD_v2: PFN_cuMemcpyHtoD_v2
    let cuMemcpyHtoDAsync_v2: PFN_cuMemcpyHtoDAsync_v2
    let cuMemcpyDtoH_v2: PFN_cuMemcpyDtoH_v2
    let cuMemcpyDtoHAsync_v2: PFN_cuMemcpyDtoHAsync_v2
    let cuMemcpyDtoD_v2: PFN_cuMemcpyDtoD_v2
    let cuMemcpyDtoDAsync_v2: PFN_cuMemcpyDtoDAsync_v2
    let cuMemsetD8_v2: PFN_cuMemsetD8_v2
    let cuMemsetD8Async: PFN_cuMemsetD8Async
    let cuMemsetD32_v2: PFN_cuMemsetD32_v2
    let cuMemsetD32Async: PFN_cuMemsetD32Async
    let cuModuleLoadData: PFN_cuModuleLoadData
    let cuModuleUnload: PFN_cuModuleUnload
    let cuModuleGetFunction: PFN_cuModuleGetFunction
    let cuModuleGetGlobal_v2: PFN_cuModuleGetGlobal_v2
    let cuFuncGetAttribute: PFN_cuFuncGetAttribute
    let cuFuncSetAttribute: PFN_cuFuncSetAttribute
    let cuOccupancyMaxActiveBlocksPerMultiprocessor: PFN_cuOccupancyMaxActiveBlocksPerMultiprocessor
    let cuLaunchKernel: PFN_cuLaunchKernel
    let cuLaunchCooperativeKernel: PFN_cuLaunchCooperativeKernel
    let cuStreamCreate: PFN_cuStreamCreate
    let cuStreamDestroy_v2: PFN_cuStreamDestroy_v2
    let cuStreamSynchronize: PFN_cuStreamSynchronize
    let cuEventCreate: PFN_cuEventCreate
    let cuEventDestroy_v2: PFN_cuEventDestroy_v2
    let cuEventRecord: PFN_cuEventRecord
    let cuEventSynchronize: PFN_cuEventSynchronize
    let cuEventElapsedTime: PFN_cuEventElapsedTime
    // Device-resident forward (h1)
    let cuMemHostAlloc: PFN_cuMemHostAlloc
    let cuMemHostGetDevicePointer_v2: PFN_cuMemHostGetDevicePointer_v2
    let cuMemFreeHost: PFN_cuMemFreeHost
    let cuStreamGetCtx: PFN_cuStreamGetCtx

    init(_ r: Resolver) throws(CUDAError) {
        cuInit = try r.resolve("cuInit", "cuInit", as: PFN_cuInit.self)
        cuDriverGetVersion = try r.resolve("cuDriverGetVersion", "cuDriverGetVersion", as: PFN_cuDriverGetVersion.self)
        cuGetErrorName = try r.resolve("cuGetErrorName", "cuGetErrorName", as: PFN_cuGetErrorName.self)
        cuGetErrorString = try r.resolve("cuGetErrorString", "cuGetErrorString", as: PFN_cuGetErrorString.self)
        cuDeviceGetCount = try r.resolve("cuDeviceGetCount", "cuDeviceGetCount", as: PFN_cuDeviceGetCount.self)
        cuDeviceGet = try r.resolve("cuDeviceGet", "cuDeviceGet", as: PFN_cuDeviceGet.self)
        cuDeviceGetName = try r.resolve("cuDeviceGetName", "cuDeviceGetName", as: PFN_cuDeviceGetName.self)
        cuDeviceGetAttribute = try r.resolve(
            "cuDeviceGetAttribute", "cuDeviceGetAttribute", as: PFN_cuDeviceGetAttribute.self)
        cuDeviceTotalMem_v2 = try r.resolve("cuDeviceTotalMem", "cuDeviceTotalMem_v2", as: PFN_cuDeviceTotalMem_v2.self)
        cuDeviceCanAccessPeer = try r.resolve(
            "cuDeviceCanAccessPeer", "cuDeviceCanAccessPeer", as: PFN_cuDeviceCanAccessPeer.self)
        cuDeviceGetP2PAttribute = try r.resolve(
            "cuDeviceGetP2PAttribute", "cuDeviceGetP2PAttribute", as: PFN_cuDeviceGetP2PAttribute.self)
        cuDevicePrimaryCtxRetain = try r.resolve(
            "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain", as: PFN_cuDevicePrimaryCtxRetain.self)
        cuDevicePrimaryCtxRelease_v2 = try r.resolve(
            "cuDevicePrimaryCtxRelease", "cuDevicePrimaryCtxRelease_v2", as: PFN_cuDevicePrimaryCtxRelease_v2.self)
        cuCtxGetCurrent = try r.resolve("cuCtxGetCurrent", "cuCtxGetCurrent", as: PFN_cuCtxGetCurrent.self)
        cuCtxSetCurrent = try r.resolve("cuCtxSetCurrent", "cuCtxSetCurrent", as: PFN_cuCtxSetCurrent.self)
        cuCtxSynchronize = try r.resolve("cuCtxSynchronize", "cuCtxSynchronize", as: PFN_cuCtxSynchronize.self)
        cuCtxEnablePeerAccess = try r.resolve(
            "cuCtxEnablePeerAccess", "cuCtxEnablePeerAccess", as: PFN_cuCtxEnablePeerAccess.self)
        cuMemAlloc_v2 = try r.resolve("cuMemAlloc", "cuMemAlloc_v2", as: PFN_cuMemAlloc_v2.self)
        cuMemFree_v2 = try r.resolve("cuMemFree", "cuMemFree_v2", as: PFN_cuMemFree_v2.self)
        cuMemGetInfo_v2 = try r.resolve("cuMemGetInfo", "cuMemGetInfo_v2", as: PFN_cuMemGetInfo_v2.self)
        cuMemcpyHtoD_v2 = try r.resolve("cuMemcpyHtoD", "cuMemcpyHtoD_v2", as: PFN_cuMemcpyHtoD_v2.self)
        cuMemcpyHtoDAsync_v2 = try r.resolve(
            "cuMemcpyHtoDAsync", "cuMemcpyHtoDAsync_v2", as: PFN_cuMemcpyHtoDAsync_v2.self)
        cuMemcpyDtoH_v2 = try r.resolve("cuMemcpyDtoH", "cuMemcpyDtoH_v2", as: PFN_cuMemcpyDtoH_v2.self)
        cuMemcpyDtoHAsync_v2 = try r.resolve(
            "cuMemcpyDtoHAsync", "cuMemcpyDtoHAsync_v2", as: PFN_cuMemcpyDtoHAsync_v2.self)
        cuMemcpyDtoD_v2 = try r.resolve("cuMemcpyDtoD", "cuMemcpyDtoD_v2", as: PFN_cuMemcpyDtoD_v2.self)
        cuMemcpyDtoDAsync_v2 = try r.resolve(
            "cuMemcpyDtoDAsync", "cuMemcpyDtoDAsync_v2", as: PFN_cuMemcpyDtoDAsync_v2.self)
        cuMemsetD8_v2 = try r.resolve("cuMemsetD8", "cuMemsetD8_v2", as: PFN_cuMemsetD8_v2.self)
        cuMemsetD8Async = try r.resolve("cuMemsetD8Async", "cuMemsetD8Async", as: PFN_cuMemsetD8Async.self)
        cuMemsetD32_v2 = try r.resolve("cuMemsetD32", "cuMemsetD32_v2", as: PFN_cuMemsetD32_v2.self)
        cuMemsetD32Async = try r.resolve("cuMemsetD32Async", "cuMemsetD32Async", as: PFN_cuMemsetD32Async.self)
        cuModuleLoadData = try r.resolve("cuModuleLoadData", "cuModuleLoadData", as: PFN_cuModuleLoadData.self)
        cuModuleUnload = try r.resolve("cuModuleUnload", "cuModuleUnload", as: PFN_cuModuleUnload.self)
        cuModuleGetFunction = try r.resolve(
            "cuModuleGetFunction", "cuModuleGetFunction", as: PFN_cuModuleGetFunction.self)
        cuModuleGetGlobal_v2 = try r.resolve(
            "cuModuleGetGlobal", "cuModuleGetGlobal_v2", as: PFN_cuModuleGetGlobal_v2.self)
        cuFuncGetAttribute = try r.resolve("cuFuncGetAttribute", "cuFuncGetAttribute", as: PFN_cuFuncGetAttribute.self)
        cuFuncSetAttribute = try r.resolve("cuFuncSetAttribute", "cuFuncSetAttribute", as: PFN_cuFuncSetAttribute.self)
        cuOccupancyMaxActiveBlocksPerMultiprocessor = try r.resolve(
            "cuOccupancyMaxActiveBlocksPerMultiprocessor", "cuOccupancyMaxActiveBlocksPerMultiprocessor",
            as: PFN_cuOccupancyMaxActiveBlocksPerMultiprocessor.self)
        cuLaunchKernel = try r.resolve("cuLaunchKernel", "cuLaunchKernel", as: PFN_cuLaunchKernel.self)
        cuLaunchCooperativeKernel = try r.resolve(
            "cuLaunchCooperativeKernel", "cuLaunchCooperativeKernel", as: PFN_cuLaunchCooperativeKernel.self)
        cuStreamCreate = try r.resolve("cuStreamCreate", "cuStreamCreate", as: PFN_cuStreamCreate.self)
        cuStreamDestroy_v2 = try r.resolve("cuStreamDestroy", "cuStreamDestroy_v2", as: PFN_cuStreamDestroy_v2.self)
        cuStreamSynchronize = try r.resolve(
            "cuStreamSynchronize", "cuStreamSynchronize", as: PFN_cuStreamSynchronize.self)
        cuEventCreate = try r.resolve("cuEventCreate", "cuEventCreate", as: PFN_cuEventCreate.self)
        cuEventDestroy_v2 = try r.resolve("cuEventDestroy", "cuEventDestroy_v2", as: PFN_cuEventDestroy_v2.self)
        cuEventRecord = try r.resolve("cuEventRecord", "cuEventRecord", as: PFN_cuEventRecord.self)
        cuEventSynchronize = try r.resolve("cuEventSynchronize", "cuEventSynchronize", as: PFN_cuEventSynchronize.self)
        cuEventElapsedTime = try r.resolve("cuEventElapsedTime", "cuEventElapsedTime", as: PFN_cuEventElapsedTime.self)
        // Device-resident forward (h1)
        cuMemHostAlloc = try r.resolve("cuMemHostAlloc", "cuMemHostAlloc", as: PFN_cuMemHostAlloc.self)
        cuMemHostGetDevicePointer_v2 = try r.resolve(
            "cuMemHostGetDevicePointer", "cuMemHostGetDevicePointer_v2", as: PFN_cuMemHostGetDevicePointer_v2.self)
        cuMemFreeHost = try r.resolve("cuMemFreeHost", "cuMemFreeHost", as: PFN_cuMemFreeHost.self)
        cuStreamGetCtx = try r.resolve("cuStreamGetCtx", "cuStreamGetCtx", as: PFN_cuStreamGetCtx.self)
    }
}

// MARK: - Inter-process memory (one process per GPU; h7's block, keep it together)

extension CUDADriver {
    /// `cuIpcGetMemHandle`.
    public func ipcGetMemHandle(_ handle: inout CUipcMemHandle, _ address: CUdeviceptr) -> CUresult {
        ipc.cuIpcGetMemHandle(&handle, address)
    }

    /// `cuIpcOpenMemHandle_v2`.
    public func ipcOpenMemHandle(_ address: inout CUdeviceptr, _ handle: CUipcMemHandle, _ flags: UInt32) -> CUresult {
        ipc.cuIpcOpenMemHandle_v2(&address, handle, flags)
    }

    /// `cuIpcCloseMemHandle`.
    public func ipcCloseMemHandle(_ address: CUdeviceptr) -> CUresult { ipc.cuIpcCloseMemHandle(address) }
}

/// The IPC entry points (exported as `cuIpcGetMemHandle`, `cuIpcOpenMemHandle_v2`, `cuIpcCloseMemHandle`).
private struct IPCFunctions {
    let cuIpcGetMemHandle: PFN_cuIpcGetMemHandle
    let cuIpcOpenMemHandle_v2: PFN_cuIpcOpenMemHandle_v2
    let cuIpcCloseMemHandle: PFN_cuIpcCloseMemHandle

    init(_ r: Resolver) throws(CUDAError) {
        cuIpcGetMemHandle = try r.resolve("cuIpcGetMemHandle", "cuIpcGetMemHandle", as: PFN_cuIpcGetMemHandle.self)
        cuIpcOpenMemHandle_v2 = try r.resolve(
            "cuIpcOpenMemHandle", "cuIpcOpenMemHandle_v2", as: PFN_cuIpcOpenMemHandle_v2.self)
        cuIpcCloseMemHandle = try r.resolve(
            "cuIpcCloseMemHandle", "cuIpcCloseMemHandle", as: PFN_cuIpcCloseMemHandle.self)
    }
}

// MARK: - Tensor maps for TMA (sm_90a engine; h9's block, keep it together)

extension CUDADriver {
    /// `cuTensorMapEncodeTiled` through a 64-byte aligned buffer; `CUDA_ERROR_INVALID_VALUE` when the array lengths
    /// disagree, `CUDA_ERROR_NOT_SUPPORTED` when the driver lacks the entry point.
    public func tensorMapEncodeTiled(
        _ map: inout CUtensorMap, _ dataType: CUtensorMapDataType, _ address: CUdeviceptr, _ dims: [UInt64],
        _ strides: [UInt64], _ box: [UInt32], _ swizzle: CUtensorMapSwizzle, _ l2Promotion: CUtensorMapL2promotion
    ) -> CUresult {
        guard !dims.isEmpty, strides.count == dims.count - 1, box.count == dims.count else {
            return CUDA_ERROR_INVALID_VALUE
        }
        // The driver writes the descriptor through a 64-byte aligned pointer; Swift's inout storage promises less.
        let out = UnsafeMutableRawPointer.allocate(
            byteCount: MemoryLayout<CUtensorMap>.size, alignment: 64)
        defer { out.deallocate() }
        let elementStrides = [UInt32](repeating: 1, count: dims.count)
        guard let encode = tensorMaps.cuTensorMapEncodeTiled else { return CUDA_ERROR_NOT_SUPPORTED }
        let result = encode(
            out.assumingMemoryBound(to: CUtensorMap.self), dataType, UInt32(dims.count),
            UnsafeMutableRawPointer(bitPattern: UInt(address)), dims, strides, box, elementStrides,
            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, l2Promotion, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
        if result == CUDA_SUCCESS { map = out.load(as: CUtensorMap.self) }
        return result
    }
}

/// The tensor-map entry point (exported as `cuTensorMapEncodeTiled`, CUDA 12.0). Optional: a driver without it
/// still runs every other path, and encoding reports CUDA_ERROR_NOT_SUPPORTED.
private struct TensorMapFunctions {
    let cuTensorMapEncodeTiled: PFN_cuTensorMapEncodeTiled?

    init(_ r: Resolver) {
        cuTensorMapEncodeTiled = try? r.resolve(
            "cuTensorMapEncodeTiled", "cuTensorMapEncodeTiled", as: PFN_cuTensorMapEncodeTiled.self)
    }
}
