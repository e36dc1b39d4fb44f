/// What the fused kernel is specialised for on real GPUs: their architecture and the shared memory a block may opt
/// in to, as the driver reports it (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`), not the table's.
///
/// `FLASHMOE_EMULATE_ARCH=sm_86` (a test knob) configures the kernel as for a smaller GPU on this one: the plain
/// target of this GPU's compute capability (no architecture-specific features, so no wgmma on a Hopper part) and the
/// named architecture's shared memory per block, so the stages and engine an RTX 3090/4090, L4, L40S or RTX 5090
/// would run are checked against the oracle on the GPU at hand (`flashmoe verify`).
public struct FusedDeviceTarget: Sendable {
    /// The environment variable naming the architecture to emulate.
    public static let emulateVariable = "FLASHMOE_EMULATE_ARCH"

    /// The common NVRTC target of the GPUs.
    public let arch: GPUArchitecture
    /// The smallest opt-in shared memory per block among them (or the emulated architecture's, when smaller).
    public let sharedMemoryPerBlock: Int

    /// Reads the properties of GPUs `ordinals` (no context is created). Launches of one kernel on several GPUs need
    /// one architecture: a cubin runs on exactly one.
    public init(ordinals: [Int], environment: [String: String] = ProcessEnvironment.current()) throws {
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
        let limit = properties.map(\.sharedMemoryPerBlockOptIn).min() ?? 0
        try self.init(arch: arch, sharedMemoryPerBlock: limit, emulating: environment[Self.emulateVariable])
    }

    /// The target for GPUs of `arch` with `limit` bytes per block, or the emulation of `emulated` on them.
    public init(arch: GPUArchitecture, sharedMemoryPerBlock limit: Int, emulating emulated: String?) throws(CUDAError) {
        guard let emulated, !emulated.isEmpty else {
            self.arch = arch
            sharedMemoryPerBlock = limit
            return
        }
        let target = try GPUArchitecture(parsing: emulated)
        let emulatedLimit = try ArchitectureLimits.of(target).sharedMemoryPerBlockOptIn
        guard emulatedLimit <= limit else {
            throw .invalidArgument(
                "\(Self.emulateVariable)=\(emulated) needs \(emulatedLimit) B of shared memory per block; this GPU has "
                    + "\(limit) B: emulate a GPU with less")
        }
        // The plain target keeps the kernel off architecture-specific instructions, as on the emulated GPU.
        self.arch = target.architectureSpecific ? arch : GPUArchitecture(parsingPlain: arch)
        sharedMemoryPerBlock = emulatedLimit
    }
}

extension GPUArchitecture {
    /// The same compute capability without the architecture-specific variant (`sm_90a` → `sm_90`).
    init(parsingPlain arch: GPUArchitecture) {
        // "sm_90" always parses: the number comes from a valid architecture.
        self = (try? GPUArchitecture(parsing: "sm_\(arch.number)")) ?? arch
    }
}
