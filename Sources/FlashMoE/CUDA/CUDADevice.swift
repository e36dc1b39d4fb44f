import CCUDA

/// What one GPU is, read with `cuDeviceGet*` (no context needed).
public struct CUDADeviceProperties: Sendable, Hashable {
    /// The device ordinal (as CUDA_VISIBLE_DEVICES numbers them).
    public let ordinal: Int
    /// The marketing name, e.g. "NVIDIA H200".
    public let name: String
    /// Compute capability (9.0 for Hopper).
    public let computeCapability: ComputeCapability
    /// Streaming multiprocessors.
    public let multiprocessorCount: Int
    /// Shared memory a block gets without opting in (48 KiB).
    public let sharedMemoryPerBlock: Int
    /// Shared memory a block can opt in to with `CUDAFunction.setMaxDynamicSharedMemory` (227 KiB on H100/H200).
    public let sharedMemoryPerBlockOptIn: Int
    /// Shared memory per SM.
    public let sharedMemoryPerMultiprocessor: Int
    /// L2 cache size.
    public let l2CacheBytes: Int
    /// Total device memory.
    public let totalMemoryBytes: Int
    /// The most threads a block can have.
    public let maxThreadsPerBlock: Int
    /// The most resident threads per SM.
    public let maxThreadsPerMultiprocessor: Int
    /// Whether `cuLaunchCooperativeKernel` is supported.
    public let cooperativeLaunch: Bool

    /// The NVRTC target for this GPU (`sm_90a` on compute capability 9.0).
    public var architecture: GPUArchitecture {
        GPUArchitecture(computeCapability)
    }

    /// Reads every property of device `ordinal`.
    public static func query(ordinal: Int, driver: any CUDADriverAPI) throws(CUDAError) -> CUDADeviceProperties {
        var device: CUdevice = 0
        try driver.check(driver.deviceGet(&device, Int32(ordinal)), "cuDeviceGet(\(ordinal))")
        return try query(device, ordinal: ordinal, driver: driver)
    }

    static func query(_ device: CUdevice, ordinal: Int, driver: any CUDADriverAPI) throws(CUDAError)
        -> CUDADeviceProperties
    {
        func attribute(_ a: CUdevice_attribute) throws(CUDAError) -> Int {
            var value: Int32 = 0
            try driver.check(driver.deviceGetAttribute(&value, a, device), "cuDeviceGetAttribute(\(a.rawValue))")
            return Int(value)
        }
        var name = ""
        try driver.check(driver.deviceGetName(&name, device), "cuDeviceGetName")
        var total = 0
        try driver.check(driver.deviceTotalMem(&total, device), "cuDeviceTotalMem_v2")
        return CUDADeviceProperties(
            ordinal: ordinal, name: name,
            computeCapability: ComputeCapability(
                major: try attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                minor: try attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)),
            multiprocessorCount: try attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            sharedMemoryPerBlock: try attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK),
            sharedMemoryPerBlockOptIn: try attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
            sharedMemoryPerMultiprocessor: try attribute(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
            l2CacheBytes: try attribute(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE),
            totalMemoryBytes: total,
            maxThreadsPerBlock: try attribute(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK),
            maxThreadsPerMultiprocessor: try attribute(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR),
            cooperativeLaunch: try attribute(CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH) != 0)
    }
}

/// An opened GPU: its properties and its primary context, retained once for this object's lifetime.
///
/// A CUDA context is current per *thread*, and Swift code moves between threads, so every wrapper method makes
/// this device's context current before it calls the driver (`makeCurrent()`, one `cuCtxGetCurrent` when it
/// already is). Buffers, streams, events and modules keep their device alive, so the context outlives them.
///
/// `@unchecked Sendable`: all stored properties are immutable, and the primary context and the driver calls
/// are thread-safe.
public final class CUDADevice: @unchecked Sendable {
    /// The driver every call goes through.
    public let driver: any CUDADriverAPI
    /// What this GPU is.
    public let properties: CUDADeviceProperties
    let handle: CUdevice
    let context: CUcontext

    /// The number of GPUs the driver sees.
    public static func count(driver: any CUDADriverAPI) throws(CUDAError) -> Int {
        var count: Int32 = 0
        try driver.check(driver.deviceGetCount(&count), "cuDeviceGetCount")
        return Int(count)
    }

    /// Opens device `ordinal`: reads its properties and retains its primary context.
    public init(ordinal: Int = 0, driver: any CUDADriverAPI) throws(CUDAError) {
        let available = try Self.count(driver: driver)
        guard available > 0 else {
            throw .noDevice(detail: "the driver sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        }
        guard (0..<available).contains(ordinal) else {
            throw .invalidArgument("there is no GPU \(ordinal): this machine has \(available) (0...\(available - 1))")
        }
        var device: CUdevice = 0
        try driver.check(driver.deviceGet(&device, Int32(ordinal)), "cuDeviceGet(\(ordinal))")
        let properties = try CUDADeviceProperties.query(device, ordinal: ordinal, driver: driver)
        var context: CUcontext?
        try driver.check(driver.primaryContextRetain(&context, device), "cuDevicePrimaryCtxRetain")
        guard let context else {
            _ = driver.primaryContextRelease(device)
            throw .invalidArgument("cuDevicePrimaryCtxRetain returned no context for GPU \(ordinal)")
        }
        self.driver = driver
        self.properties = properties
        self.handle = device
        self.context = context
        try makeCurrent()  // a failure here runs deinit, which releases the context
    }

    deinit {
        _ = driver.primaryContextRelease(handle)
    }

    /// Makes this device's primary context current on the calling thread.
    public func makeCurrent() throws(CUDAError) {
        var current: CUcontext?
        if driver.contextGetCurrent(&current) == CUDA_SUCCESS, current == context { return }
        try driver.check(driver.contextSetCurrent(context), "cuCtxSetCurrent")
    }

    /// Free and total device memory, as the driver reports them now.
    public func memoryInfo() throws(CUDAError) -> (free: Int, total: Int) {
        try makeCurrent()
        var free = 0, total = 0
        try driver.check(driver.memGetInfo(&free, &total), "cuMemGetInfo_v2")
        return (free, total)
    }

    /// Waits for all work on this device (`cuCtxSynchronize`).
    public func synchronize() throws(CUDAError) {
        try makeCurrent()
        try driver.check(driver.contextSynchronize(), "cuCtxSynchronize")
    }

    /// Whether kernels on this device can access `peer`'s memory directly (NVLink / PCIe P2P).
    public func canAccessPeer(_ peer: CUDADevice) throws(CUDAError) -> Bool {
        var can: Int32 = 0
        try driver.check(driver.deviceCanAccessPeer(&can, handle, peer.handle), "cuDeviceCanAccessPeer")
        return can != 0
    }

    /// The direct path from this GPU to `peer`, another GPU: whether kernels here can access its memory, with
    /// native atomics, and how the driver ranks the link. No context is needed.
    public func peerLink(to peer: CUDADevice) throws(CUDAError) -> PeerLink {
        let (source, destination) = (properties.ordinal, peer.properties.ordinal)
        guard source != destination else {
            throw .invalidArgument("GPU \(source) is not its own peer: ask for the link to another GPU")
        }
        func attribute(_ a: CUdevice_P2PAttribute, _ name: String) throws(CUDAError) -> Int {
            var value: Int32 = 0
            try driver.check(
                driver.deviceGetP2PAttribute(&value, a, handle, peer.handle),
                "cuDeviceGetP2PAttribute(\(name), \(source) → \(destination))")
            return Int(value)
        }
        let access = try canAccessPeer(peer)
        let atomics = try attribute(CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED, "NATIVE_ATOMIC_SUPPORTED")
        let rank = try attribute(CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK, "PERFORMANCE_RANK")
        return PeerLink(
            source: source, destination: destination, access: access, nativeAtomics: atomics != 0,
            performanceRank: rank)
    }

    /// Lets kernels on this device access `peer`'s memory. Enabling it twice is not an error.
    public func enablePeerAccess(to peer: CUDADevice) throws(CUDAError) {
        try makeCurrent()
        let result = driver.contextEnablePeerAccess(peer.context, 0)
        if result == CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED { return }
        try driver.check(
            result, "cuCtxEnablePeerAccess(\(properties.ordinal) → \(peer.properties.ordinal))",
            hint: "check canAccessPeer first: these GPUs may have no peer-to-peer path")
    }
}
