/// The per-block and per-SM limits of one GPU architecture that decide how the fused kernel is configured: the
/// shared memory a block may opt in to (what bounds the pipeline stages), and the register and thread limits that
/// its 256-thread blocks (`__launch_bounds__(256, 1)`) always fit.
///
/// `table` holds the values of the CUDA C++ Programming Guide's "Technical Specifications per Compute Capability"
/// for every architecture the kernel targets, so `flashmoe compile --arch sm_86` can choose a configuration with no
/// GPU present. On a real device the operator uses what the driver reports instead (`init(device:)`,
/// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`). The SM counts in `examples` are facts of products,
/// not of the architecture (two GPUs of one architecture differ); the kernel's grid comes from the occupancy API.
public struct ArchitectureLimits: Sendable, Hashable, CustomStringConvertible {
    /// The compute capability these limits belong to.
    public let computeCapability: ComputeCapability
    /// The most shared memory (static + dynamic) one block can opt in to, bytes.
    public let sharedMemoryPerBlockOptIn: Int
    /// Shared memory per SM, bytes.
    public let sharedMemoryPerMultiprocessor: Int
    /// 32-bit registers per SM.
    public let registersPerMultiprocessor: Int
    /// The most registers one thread can use.
    public let maxRegistersPerThread: Int
    /// The most resident threads per SM.
    public let maxThreadsPerMultiprocessor: Int
    /// Products of this architecture and their SM counts, for the reader ("RTX 4090: 128 SMs").
    public let examples: String

    /// Limits given field by field (bytes for shared memory); the register defaults are every targeted architecture's.
    public init(
        computeCapability: ComputeCapability, sharedMemoryPerBlockOptIn: Int, sharedMemoryPerMultiprocessor: Int,
        registersPerMultiprocessor: Int = 65536, maxRegistersPerThread: Int = 255, maxThreadsPerMultiprocessor: Int,
        examples: String = ""
    ) {
        self.computeCapability = computeCapability
        self.sharedMemoryPerBlockOptIn = sharedMemoryPerBlockOptIn
        self.sharedMemoryPerMultiprocessor = sharedMemoryPerMultiprocessor
        self.registersPerMultiprocessor = registersPerMultiprocessor
        self.maxRegistersPerThread = maxRegistersPerThread
        self.maxThreadsPerMultiprocessor = maxThreadsPerMultiprocessor
        self.examples = examples
    }

    /// The limits a GPU reports through `cuDeviceGetAttribute` (registers: the architecture's, which the driver
    /// reports per block rather than per SM).
    public init(device p: CUDADeviceProperties) {
        let known = Self.table.first { $0.computeCapability == p.computeCapability }
        self.init(
            computeCapability: p.computeCapability, sharedMemoryPerBlockOptIn: p.sharedMemoryPerBlockOptIn,
            sharedMemoryPerMultiprocessor: p.sharedMemoryPerMultiprocessor,
            registersPerMultiprocessor: known?.registersPerMultiprocessor ?? 65536,
            maxRegistersPerThread: known?.maxRegistersPerThread ?? 255,
            maxThreadsPerMultiprocessor: p.maxThreadsPerMultiprocessor,
            examples: "\(p.name): \(p.multiprocessorCount) SMs")
    }

    /// One line: the compute capability, shared memory per block (opt-in) and per SM in KiB, registers and threads
    /// per SM.
    public var description: String {
        "compute capability \(computeCapability): \(sharedMemoryPerBlockOptIn / 1024) KiB shared memory per block "
            + "(\(sharedMemoryPerMultiprocessor / 1024) KiB per SM), \(registersPerMultiprocessor / 1024) K registers "
            + "and \(maxThreadsPerMultiprocessor) threads per SM"
    }

    /// One row of the table: compute capability, KiB per block (opt-in) and per SM, threads per SM, products.
    private static func row(_ cc: (Int, Int), _ block: Int, _ sm: Int, _ threads: Int, _ examples: String) -> Self {
        ArchitectureLimits(
            computeCapability: ComputeCapability(major: cc.0, minor: cc.1), sharedMemoryPerBlockOptIn: block * 1024,
            sharedMemoryPerMultiprocessor: sm * 1024, maxThreadsPerMultiprocessor: threads, examples: examples)
    }

    /// Every architecture the fused kernel targets (cp.async needs compute capability 8.0). All have 64 K registers
    /// per SM and at most 255 per thread.
    public static let table: [ArchitectureLimits] = [
        row((8, 0), 163, 164, 2048, "A100: 108 SMs, A30: 56"),
        row((8, 6), 99, 100, 1536, "RTX 3090: 82 SMs, A40: 84, A10: 72"),
        row((8, 7), 163, 164, 2048, "Jetson AGX Orin: 16 SMs"),
        row((8, 9), 99, 100, 1536, "RTX 4090: 128 SMs, L40S: 142, L4: 58"),
        row((9, 0), 227, 228, 2048, "H100 SXM: 132 SMs, H200: 132"),
        row((10, 0), 227, 228, 2048, "B200: 148 SMs"),
        row((12, 0), 99, 128, 1536, "RTX 5090: 170 SMs"),
    ]

    /// The table's entry for `arch`'s compute capability (the `a` variant shares its base's limits).
    public static func of(_ arch: GPUArchitecture) throws(CUDAError) -> ArchitectureLimits {
        guard let limits = table.first(where: { $0.computeCapability == arch.computeCapability }) else {
            let known = table.map { "sm_\($0.computeCapability.major)\($0.computeCapability.minor)" }
            throw .invalidArgument(
                "no shared-memory limits are known for \(arch): choose one of \(known.joined(separator: ", ")) "
                    + "(on a GPU the driver's own limits are used)")
        }
        return limits
    }
}
