/// What the fused kernel is specialised for on real GPUs: their architecture and the shared memory a block may opt
/// in to, as the driver reports it (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`), not the table's.
struct FusedDeviceTarget {
    /// The common NVRTC target of the GPUs.
    let arch: GPUArchitecture
    /// The smallest opt-in shared memory per block among them.
    let sharedMemoryPerBlock: Int

    /// Reads the properties of GPUs `ordinals` (no context is created). Launches of one kernel on several GPUs need
    /// one architecture: a cubin runs on exactly one.
    init(ordinals: [Int]) throws {
        let driver = try CUDADriver.shared.get()
        let available = try CUDADevice.count(driver: driver)
        guard available > 0 else {
            throw CUDAError.noDevice(detail: "the driver sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        }
        if let bad = ordinals.first(where: { !(0..<available).contains($0) }) {
            throw CUDAError.invalidArgument("there is no GPU \(bad): this machine has \(available) (0...\(available - 1))")
        }
        let properties = try ordinals.map { o throws(CUDAError) in try CUDADeviceProperties.query(ordinal: o, driver: driver) }
        let archs = Set(properties.map(\.architecture))
        guard archs.count == 1, let arch = archs.first else {
            throw CUDAError.invalidArgument(
                "the GPUs \(ordinals) have different architectures (\(archs.map(\.name).sorted().joined(separator: ", "))): "
                    + "one kernel launch per GPU needs GPUs of one kind")
        }
        self.arch = arch
        sharedMemoryPerBlock = properties.map(\.sharedMemoryPerBlockOptIn).min() ?? 0
    }
}
