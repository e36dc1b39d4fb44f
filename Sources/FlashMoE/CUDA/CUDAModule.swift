import CCUDA

/// A loaded cubin (`cuModuleLoadData`), unloaded when this object and every function taken from it are gone.
///
/// `@unchecked Sendable`: the handle never changes and module queries are thread-safe.
public final class CUDAModule: @unchecked Sendable {
    /// The device the module is loaded on.
    public let device: CUDADevice
    let handle: CUmodule

    /// Loads a cubin image. A cubin built for another architecture, or by an NVRTC newer than the driver,
    /// fails with `CUDAError.driverTooOld`.
    public init(device: CUDADevice, cubin: [UInt8]) throws(CUDAError) {
        guard !cubin.isEmpty else { throw .invalidArgument("cannot load an empty cubin") }
        try device.makeCurrent()
        var module: CUmodule?
        let result = cubin.withUnsafeBytes { device.driver.moduleLoadData(&module, $0.baseAddress!) }
        try device.driver.check(
            result, "cuModuleLoadData (on \(device.properties.architecture))",
            hint: result != CUDA_ERROR_INVALID_IMAGE
                ? nil
                : "the image is not a cubin this driver can load: compile it for \(device.properties.architecture) "
                    + "with an NVRTC no newer than the driver")
        guard let module else { throw .invalidArgument("cuModuleLoadData returned no module") }
        self.device = device
        self.handle = module
    }

    deinit {
        _ = try? device.makeCurrent()
        _ = device.driver.moduleUnload(handle)
    }

    /// The kernel named `name` (its `extern "C"` name, or the mangled one).
    public func function(named name: String) throws(CUDAError) -> CUDAFunction {
        try device.makeCurrent()
        var function: CUfunction?
        try device.driver.check(
            device.driver.moduleGetFunction(&function, handle, name), "cuModuleGetFunction(\(name))",
            hint: "the module has no kernel named '\(name)': check the name and that it is declared extern \"C\"")
        guard let function else { throw .invalidArgument("cuModuleGetFunction returned no function for \(name)") }
        return CUDAFunction(module: self, name: name, handle: function)
    }

    /// The device address and size of the `__device__` global named `name`.
    public func global(named name: String) throws(CUDAError) -> (address: CUdeviceptr, byteCount: Int) {
        try device.makeCurrent()
        var address: CUdeviceptr = 0
        var bytes = 0
        try device.driver.check(
            device.driver.moduleGetGlobal(&address, &bytes, handle, name), "cuModuleGetGlobal_v2(\(name))",
            hint: "the module has no __device__ variable named '\(name)' (declare it extern \"C\")")
        return (address, bytes)
    }
}

/// What the compiler and driver say about one kernel (`cuFuncGetAttribute`).
public struct CUDAFunctionAttributes: Sendable, Hashable {
    /// Registers per thread.
    public let registers: Int
    /// Local memory per thread (stack and spills).
    public let localBytesPerThread: Int
    /// Statically declared shared memory per block.
    public let staticSharedBytes: Int
    /// User `__constant__` memory.
    public let constantBytes: Int
    /// The most threads per block this kernel can launch with on this device.
    public let maxThreadsPerBlock: Int
    /// The current dynamic shared memory limit per block.
    public let maxDynamicSharedBytes: Int
    /// The PTX ISA version × 10 it was compiled from.
    public let ptxVersion: Int
    /// The SASS architecture × 10 of the binary (90 for sm_90a).
    public let binaryVersion: Int
}

/// A kernel in a loaded module: its attributes, occupancy, and launches.
///
/// `@unchecked Sendable`: immutable; the module it came from stays loaded while it exists.
public final class CUDAFunction: @unchecked Sendable {
    /// The module the kernel lives in (kept loaded).
    public let module: CUDAModule
    /// The kernel's name.
    public let name: String
    let handle: CUfunction

    init(module: CUDAModule, name: String, handle: CUfunction) {
        self.module = module
        self.name = name
        self.handle = handle
    }

    private var device: CUDADevice { module.device }

    /// Registers, local and shared memory, thread limits.
    public func attributes() throws(CUDAError) -> CUDAFunctionAttributes {
        try device.makeCurrent()
        func read(_ attribute: CUfunction_attribute) throws(CUDAError) -> Int {
            var value: Int32 = 0
            try device.driver.check(
                device.driver.functionGetAttribute(&value, attribute, handle),
                "cuFuncGetAttribute(\(name), \(attribute.rawValue))")
            return Int(value)
        }
        return CUDAFunctionAttributes(
            registers: try read(CU_FUNC_ATTRIBUTE_NUM_REGS),
            localBytesPerThread: try read(CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
            staticSharedBytes: try read(CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES),
            constantBytes: try read(CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES),
            maxThreadsPerBlock: try read(CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK),
            maxDynamicSharedBytes: try read(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES),
            ptxVersion: try read(CU_FUNC_ATTRIBUTE_PTX_VERSION),
            binaryVersion: try read(CU_FUNC_ATTRIBUTE_BINARY_VERSION))
    }

    /// Allows launches with up to `bytes` of dynamic shared memory per block (above the default 48 KiB up to the
    /// device's opt-in limit minus the kernel's static shared memory).
    public func setMaxDynamicSharedMemory(_ bytes: Int) throws(CUDAError) {
        let limit = device.properties.sharedMemoryPerBlockOptIn
        guard bytes >= 0, bytes <= limit else {
            throw .invalidArgument(
                "\(name) cannot use \(formatByteCount(bytes)) of dynamic shared memory: "
                    + "\(device.properties.name) allows at most \(formatByteCount(limit)) per block")
        }
        try device.makeCurrent()
        try device.driver.check(
            device.driver.functionSetAttribute(handle, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, Int32(bytes)),
            "cuFuncSetAttribute(\(name), MAX_DYNAMIC_SHARED_SIZE_BYTES, \(bytes))",
            hint: "the kernel's static shared memory plus \(bytes) bytes exceeds the per-block limit")
    }

    /// How many blocks of `blockSize` threads using `dynamicSharedBytes` fit on one SM at once.
    public func maxActiveBlocksPerMultiprocessor(blockSize: Int, dynamicSharedBytes: Int = 0) throws(CUDAError)
        -> Int
    {
        guard blockSize >= 1, dynamicSharedBytes >= 0 else {
            throw .invalidArgument("occupancy needs a block size ≥ 1 and shared memory ≥ 0")
        }
        try device.makeCurrent()
        var blocks: Int32 = 0
        try device.driver.check(
            device.driver.occupancyMaxActiveBlocksPerMultiprocessor(
                &blocks, handle, Int32(blockSize), dynamicSharedBytes),
            "cuOccupancyMaxActiveBlocksPerMultiprocessor(\(name))")
        return Int(blocks)
    }

    /// The largest grid a cooperative launch of this kernel can use: blocks per SM × SMs. Throws if not even one
    /// block fits on an SM.
    public func cooperativeGridLimit(blockSize: Int, dynamicSharedBytes: Int = 0) throws(CUDAError) -> Int {
        let perSM = try maxActiveBlocksPerMultiprocessor(blockSize: blockSize, dynamicSharedBytes: dynamicSharedBytes)
        guard perSM > 0 else {
            throw .invalidArgument(
                "\(name) cannot run even one block of \(blockSize) threads with \(formatByteCount(dynamicSharedBytes)) "
                    + "of dynamic shared memory on an SM: use fewer threads or less shared memory")
        }
        return perSM * device.properties.multiprocessorCount
    }

    /// Queues the kernel on `stream` (nil: the legacy default stream).
    public func launch(
        grid: Dim3, block: Dim3, sharedBytes: Int = 0, stream: CUDAStream? = nil, arguments: [KernelArgument]
    ) throws(CUDAError) {
        let (g, b, s) = try launchShape(grid, block, sharedBytes)
        try device.makeCurrent()
        let result = KernelArgument.withParameterArray(arguments) {
            device.driver.launchKernel(handle, grid: g, block: b, sharedBytes: s, stream: stream?.handle, parameters: $0)
        }
        try device.driver.check(result, "cuLaunchKernel(\(name), grid \(grid), block \(block))")
    }

    /// Queues the kernel as a cooperative launch: all `grid` blocks are co-resident (grid-wide barriers are safe)
    /// or the launch fails. Size `grid` with `cooperativeGridLimit`; pass `gridSizedByCaller` when it was, to skip
    /// the occupancy query on a hot path (the driver still refuses a grid that cannot be co-resident).
    public func launchCooperative(
        grid: Dim3, block: Dim3, sharedBytes: Int = 0, stream: CUDAStream? = nil, arguments: [KernelArgument],
        gridSizedByCaller: Bool = false
    ) throws(CUDAError) {
        try launchCooperative(
            grid: grid, block: block, sharedBytes: sharedBytes, streamHandle: stream?.handle, arguments: arguments,
            gridSizedByCaller: gridSizedByCaller)
    }

    /// `launchCooperative` on a raw `CUstream` of this function's device (a framework's stream; nil: the legacy
    /// default stream).
    public func launchCooperative(
        grid: Dim3, block: Dim3, sharedBytes: Int = 0, streamHandle: CUstream?, arguments: [KernelArgument],
        gridSizedByCaller: Bool = false
    ) throws(CUDAError) {
        guard device.properties.cooperativeLaunch else {
            throw .invalidArgument("\(device.properties.name) does not support cooperative launches")
        }
        let limit =
            gridSizedByCaller
            ? grid.total : try cooperativeGridLimit(blockSize: block.total, dynamicSharedBytes: sharedBytes)
        guard grid.total <= limit else {
            throw .invalidArgument(
                "a cooperative launch of \(name) can have at most \(limit) blocks of \(block.total) threads on "
                    + "\(device.properties.name), not \(grid.total)")
        }
        let (g, b, s) = try launchShape(grid, block, sharedBytes)
        try device.makeCurrent()
        let result = KernelArgument.withParameterArray(arguments) {
            device.driver.launchCooperativeKernel(
                handle, grid: g, block: b, sharedBytes: s, stream: streamHandle, parameters: $0)
        }
        try device.driver.check(result, "cuLaunchCooperativeKernel(\(name), grid \(grid), block \(block))")
    }

    private func launchShape(_ grid: Dim3, _ block: Dim3, _ sharedBytes: Int) throws(CUDAError)
        -> ((UInt32, UInt32, UInt32), (UInt32, UInt32, UInt32), UInt32)
    {
        guard sharedBytes >= 0, sharedBytes <= Int(UInt32.max) else {
            throw .invalidArgument("dynamic shared memory must be between 0 and 4 GiB, not \(sharedBytes)")
        }
        return (try grid.driverShape("grid"), try block.driverShape("block"), UInt32(sharedBytes))
    }
}
