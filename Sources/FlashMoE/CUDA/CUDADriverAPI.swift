import CCUDA

/// The CUDA driver entry points FlashMoE calls, one method per driver function, returning the raw `CUresult`.
///
/// `CUDADriver` implements it over the real `libcuda.so.1`; tests implement it with a fake that has no GPU, to check
/// error mapping, context handling and that every allocation is freed. All wrappers (`CUDADevice`,
/// `DeviceBuffer`, ...) go through this protocol and nothing else, and they turn results into `CUDAError`s in one
/// place (`check`). The methods mirror the C calls (out-parameters are `inout`); where a driver function has a
/// synchronous and a stream-ordered form, `stream: nil` selects the synchronous one.
///
/// Conforming types must be safe to call from any thread, as the driver is.
public protocol CUDADriverAPI: AnyObject, Sendable {
    // MARK: Initialization and errors

    /// `cuInit`.
    func initialize(_ flags: UInt32) -> CUresult
    /// `cuDriverGetVersion`: the CUDA version the driver supports, e.g. 13000.
    func driverGetVersion(_ version: inout Int32) -> CUresult
    /// `cuGetErrorName`, e.g. "CUDA_ERROR_OUT_OF_MEMORY"; nil for a code the driver does not know.
    func errorName(_ code: CUresult) -> String?
    /// `cuGetErrorString`, e.g. "out of memory"; nil for a code the driver does not know.
    func errorString(_ code: CUresult) -> String?

    // MARK: Devices

    /// `cuDeviceGetCount`.
    func deviceGetCount(_ count: inout Int32) -> CUresult
    /// `cuDeviceGet`.
    func deviceGet(_ device: inout CUdevice, _ ordinal: Int32) -> CUresult
    /// `cuDeviceGetName`.
    func deviceGetName(_ name: inout String, _ device: CUdevice) -> CUresult
    /// `cuDeviceGetAttribute`.
    func deviceGetAttribute(_ value: inout Int32, _ attribute: CUdevice_attribute, _ device: CUdevice) -> CUresult
    /// `cuDeviceTotalMem_v2`.
    func deviceTotalMem(_ bytes: inout Int, _ device: CUdevice) -> CUresult
    /// `cuDeviceCanAccessPeer`.
    func deviceCanAccessPeer(_ canAccess: inout Int32, _ device: CUdevice, _ peer: CUdevice) -> CUresult
    /// `cuDeviceGetP2PAttribute`: one property of the link from `source` to `destination` (two different devices),
    /// e.g. whether kernels on `source` can do native atomics on `destination`'s memory.
    func deviceGetP2PAttribute(
        _ value: inout Int32, _ attribute: CUdevice_P2PAttribute, _ source: CUdevice, _ destination: CUdevice
    ) -> CUresult

    // MARK: Contexts

    /// `cuDevicePrimaryCtxRetain`.
    func primaryContextRetain(_ context: inout CUcontext?, _ device: CUdevice) -> CUresult
    /// `cuDevicePrimaryCtxRelease_v2`.
    func primaryContextRelease(_ device: CUdevice) -> CUresult
    /// `cuCtxGetCurrent` (for the calling thread).
    func contextGetCurrent(_ context: inout CUcontext?) -> CUresult
    /// `cuCtxSetCurrent` (for the calling thread).
    func contextSetCurrent(_ context: CUcontext?) -> CUresult
    /// `cuCtxSynchronize`.
    func contextSynchronize() -> CUresult
    /// `cuCtxEnablePeerAccess`: lets the current context access `peer`'s memory.
    func contextEnablePeerAccess(_ peer: CUcontext, _ flags: UInt32) -> CUresult

    // MARK: Memory

    /// `cuMemAlloc_v2`.
    func memAlloc(_ address: inout CUdeviceptr, _ bytes: Int) -> CUresult
    /// `cuMemFree_v2`.
    func memFree(_ address: CUdeviceptr) -> CUresult
    /// `cuMemGetInfo_v2`.
    func memGetInfo(_ free: inout Int, _ total: inout Int) -> CUresult
    /// `cuMemcpyHtoD_v2`, or `cuMemcpyHtoDAsync_v2` on `stream`.
    func memcpyHtoD(_ destination: CUdeviceptr, _ source: UnsafeRawPointer, _ bytes: Int, _ stream: CUstream?)
        -> CUresult
    /// `cuMemcpyDtoH_v2`, or `cuMemcpyDtoHAsync_v2` on `stream`.
    func memcpyDtoH(_ destination: UnsafeMutableRawPointer, _ source: CUdeviceptr, _ bytes: Int, _ stream: CUstream?)
        -> CUresult
    /// `cuMemcpyDtoD_v2`, or `cuMemcpyDtoDAsync_v2` on `stream`.
    func memcpyDtoD(_ destination: CUdeviceptr, _ source: CUdeviceptr, _ bytes: Int, _ stream: CUstream?) -> CUresult
    /// `cuMemsetD8_v2`, or `cuMemsetD8Async` on `stream`.
    func memsetD8(_ destination: CUdeviceptr, _ value: UInt8, _ count: Int, _ stream: CUstream?) -> CUresult
    /// `cuMemsetD32_v2`, or `cuMemsetD32Async` on `stream`.
    func memsetD32(_ destination: CUdeviceptr, _ value: UInt32, _ count: Int, _ stream: CUstream?) -> CUresult

    // MARK: Modules and kernels

    /// `cuModuleLoadData`: loads a cubin image.
    func moduleLoadData(_ module: inout CUmodule?, _ image: UnsafeRawPointer) -> CUresult
    /// `cuModuleUnload`.
    func moduleUnload(_ module: CUmodule) -> CUresult
    /// `cuModuleGetFunction`.
    func moduleGetFunction(_ function: inout CUfunction?, _ module: CUmodule, _ name: String) -> CUresult
    /// `cuModuleGetGlobal_v2`.
    func moduleGetGlobal(_ address: inout CUdeviceptr, _ bytes: inout Int, _ module: CUmodule, _ name: String)
        -> CUresult
    /// `cuFuncGetAttribute`.
    func functionGetAttribute(_ value: inout Int32, _ attribute: CUfunction_attribute, _ function: CUfunction)
        -> CUresult
    /// `cuFuncSetAttribute`.
    func functionSetAttribute(_ function: CUfunction, _ attribute: CUfunction_attribute, _ value: Int32) -> CUresult
    /// `cuOccupancyMaxActiveBlocksPerMultiprocessor`.
    func occupancyMaxActiveBlocksPerMultiprocessor(
        _ blocks: inout Int32, _ function: CUfunction, _ blockSize: Int32, _ dynamicSharedBytes: Int
    ) -> CUresult
    /// `cuLaunchKernel` (no `extra`). `parameters[i]` points at the value of kernel parameter i.
    func launchKernel(
        _ function: CUfunction, grid: (UInt32, UInt32, UInt32), block: (UInt32, UInt32, UInt32),
        sharedBytes: UInt32, stream: CUstream?, parameters: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    ) -> CUresult
    /// `cuLaunchCooperativeKernel`: like `launchKernel`, but every block is guaranteed co-resident or it fails.
    func launchCooperativeKernel(
        _ function: CUfunction, grid: (UInt32, UInt32, UInt32), block: (UInt32, UInt32, UInt32),
        sharedBytes: UInt32, stream: CUstream?, parameters: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    ) -> CUresult

    // MARK: Streams and events

    /// `cuStreamCreate`.
    func streamCreate(_ stream: inout CUstream?, _ flags: UInt32) -> CUresult
    /// `cuStreamDestroy_v2`.
    func streamDestroy(_ stream: CUstream) -> CUresult
    /// `cuStreamSynchronize` (nil: the legacy default stream).
    func streamSynchronize(_ stream: CUstream?) -> CUresult
    /// `cuEventCreate`.
    func eventCreate(_ event: inout CUevent?, _ flags: UInt32) -> CUresult
    /// `cuEventDestroy_v2`.
    func eventDestroy(_ event: CUevent) -> CUresult
    /// `cuEventRecord` (nil stream: the legacy default stream).
    func eventRecord(_ event: CUevent, _ stream: CUstream?) -> CUresult
    /// `cuEventSynchronize`.
    func eventSynchronize(_ event: CUevent) -> CUresult
    /// `cuEventElapsedTime`.
    func eventElapsedTime(_ milliseconds: inout Float, _ start: CUevent, _ end: CUevent) -> CUresult

    // MARK: Device-resident forward (h1): host-mapped pinned memory, a stream's context

    /// `cuMemHostAlloc`: page-locked host memory (`flags`: `CU_MEMHOSTALLOC_*`).
    func memHostAlloc(_ pointer: inout UnsafeMutableRawPointer?, _ bytes: Int, _ flags: UInt32) -> CUresult
    /// `cuMemHostGetDevicePointer_v2`: the device address of host memory allocated with `CU_MEMHOSTALLOC_DEVICEMAP`.
    func memHostGetDevicePointer(_ address: inout CUdeviceptr, _ pointer: UnsafeMutableRawPointer, _ flags: UInt32)
        -> CUresult
    /// `cuMemFreeHost`.
    func memFreeHost(_ pointer: UnsafeMutableRawPointer) -> CUresult
    /// `cuStreamGetCtx`: the context a stream belongs to (nil: the legacy default stream of the current context).
    func streamGetContext(_ stream: CUstream?, _ context: inout CUcontext?) -> CUresult

    // MARK: Inter-process memory (one process per GPU; h7's block, keep it together)

    /// `cuIpcGetMemHandle`: a handle another process can open to map the `cuMemAlloc` allocation at `address`.
    func ipcGetMemHandle(_ handle: inout CUipcMemHandle, _ address: CUdeviceptr) -> CUresult
    /// `cuIpcOpenMemHandle_v2`: maps another process's allocation into the current context.
    func ipcOpenMemHandle(_ address: inout CUdeviceptr, _ handle: CUipcMemHandle, _ flags: UInt32) -> CUresult
    /// `cuIpcCloseMemHandle`: unmaps memory mapped by `ipcOpenMemHandle`.
    func ipcCloseMemHandle(_ address: CUdeviceptr) -> CUresult

    // MARK: Tensor maps for TMA (sm_90a engine; h9's block, keep it together)

    /// `cuTensorMapEncodeTiled`: encodes into `map` a descriptor of the `dims.count`-dimensional tensor at `address`
    /// (`dims` innermost first, `strides`: the byte strides of dimensions 1 …, so one fewer), read in boxes of
    /// `box` elements. `TensorMap` is the checked way in.
    func tensorMapEncodeTiled(
        _ map: inout CUtensorMap, _ dataType: CUtensorMapDataType, _ address: CUdeviceptr, _ dims: [UInt64],
        _ strides: [UInt64], _ box: [UInt32], _ swizzle: CUtensorMapSwizzle, _ l2Promotion: CUtensorMapL2promotion
    ) -> CUresult
}

extension CUDADriverAPI {
    /// Turns a driver result into a typed error: out-of-memory with the requested size, "no device",
    /// "driver too old", or the driver's own name and text for `call`. `hint` is appended to generic errors.
    public func check(
        _ result: CUresult, _ call: @autoclosure () -> String, requestedBytes: Int? = nil,
        hint: @autoclosure () -> String? = nil
    ) throws(CUDAError) {
        guard result != CUDA_SUCCESS else { return }
        throw error(for: result, call: call(), requestedBytes: requestedBytes, hint: hint())
    }

    /// The `CUDAError` for a failed `call` (see `check`).
    public func error(for result: CUresult, call: String, requestedBytes: Int? = nil, hint: String? = nil)
        -> CUDAError
    {
        let name = errorName(result) ?? "CUDA error \(result.rawValue)"
        let text = errorString(result) ?? "unknown error"
        switch result {
        case CUDA_ERROR_OUT_OF_MEMORY where requestedBytes != nil:
            var free = 0, total = 0
            let freeBytes = memGetInfo(&free, &total) == CUDA_SUCCESS ? free : nil
            return .outOfMemory(call: call, requestedBytes: requestedBytes ?? 0, freeBytes: freeBytes)
        case CUDA_ERROR_NO_DEVICE:
            return .noDevice(detail: "\(call) reported \(name): no CUDA-capable GPU is visible to this process "
                + "(check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        case CUDA_ERROR_UNSUPPORTED_PTX_VERSION, CUDA_ERROR_NO_BINARY_FOR_GPU, CUDA_ERROR_INSUFFICIENT_DRIVER:
            var version: Int32 = 0
            let driverVersion = driverGetVersion(&version) == CUDA_SUCCESS ? Int(version) : nil
            return .driverTooOld(
                call: call, name: name, driverVersion: driverVersion,
                detail: "\(text). The kernel was compiled by an NVRTC newer than this driver, or for another GPU "
                    + "architecture: update the NVIDIA driver, or point FLASHMOE_NVRTC at an NVRTC no newer than "
                    + "the driver")
        default:
            return .driver(
                call: call, code: result.rawValue, name: name, text: text, hint: hint ?? Self.defaultHint(result))
        }
    }

    /// What to do about codes whose driver text alone does not say it.
    static func defaultHint(_ result: CUresult) -> String? {
        switch result {
        case CUDA_ERROR_STUB_LIBRARY:
            return "libcuda.so.1 is the CUDA toolkit's stub, not the driver: remove the stubs folder from "
                + "LD_LIBRARY_PATH"
        case CUDA_ERROR_INVALID_CONTEXT:
            return "no CUDA context is current on this thread (a FlashMoE bug: every entry point must make its "
                + "device's context current)"
        case CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE:
            return "the grid has more blocks than can be co-resident: size it with CUDAFunction.cooperativeGridLimit"
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES:
            return "the block needs more registers or shared memory than an SM has: use fewer threads per block"
        case CUDA_ERROR_ILLEGAL_ADDRESS:
            return "a kernel accessed memory out of bounds; the context is now unusable: restart the process"
        case CUDA_ERROR_UNKNOWN:
            return "often the kernel module and libcuda versions differ, or /dev/nvidia* is not accessible"
        default:
            return nil
        }
    }
}
