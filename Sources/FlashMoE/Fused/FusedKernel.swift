import CCUDA

/// A compiled, loaded specialisation of the fused kernel and the facts the host needs to launch it.
///
/// The kernel reports its own launch contract through module globals (dynamic shared memory, the gated-weight
/// packing block, the size of its parameter structs, the gate's expert tiles), so the host never re-derives a
/// constant the kernel could disagree with.
struct FusedKernel {
    let device: CUDADevice
    let compiled: CompiledKernel
    let module: CUDAModule
    let function: CUDAFunction
    let dynamicSharedBytes: Int
    let packRows: Int
    let paramsBytes: Int
    let peerBytes: Int
    let gateTiles: Int
    /// Blocks of a cooperative launch: blocks per SM from the occupancy API × SMs.
    let gridLimit: Int

    static let threadsPerBlock = 256

    init(specialization: FusedSpecialization, entry: String, deviceOrdinal: Int) throws {
        let driver = try CUDADriver.shared.get()
        device = try CUDADevice(ordinal: deviceOrdinal, driver: driver)
        let environment = ProcessEnvironment.current()
        let compiler = KernelCompiler(backend: try NVRTC.shared.get(), environment: environment)
        compiled = try compiler.compile(
            specialization.kernelSpec, arch: specialization.arch,
            sources: KernelSources.current(environment: environment))
        module = try CUDAModule(device: device, cubin: compiled.cubin)
        function = try module.function(named: entry)
        dynamicSharedBytes = Int(try Self.readGlobal(module, "fmoe_dynamic_smem"))
        packRows = Int(try Self.readGlobal(module, "fmoe_gated_pack_rows"))
        paramsBytes = Int(try Self.readGlobal(module, "fmoe_params_bytes"))
        peerBytes = Int(try Self.readGlobal(module, "fmoe_peer_bytes"))
        gateTiles = Int(try Self.readGlobal(module, "fmoe_gate_tiles"))
        guard paramsBytes == FusedParams.byteCount, peerBytes == FusedParams.peerByteCount else {
            throw CUDAError.invalidArgument(
                "the kernel's Params (\(paramsBytes) B) or Peer (\(peerBytes) B) layout differs from the host's "
                    + "(\(FusedParams.byteCount) B, \(FusedParams.peerByteCount) B): kernel sources and binary disagree")
        }
        // Static + dynamic shared memory must fit the block's opt-in limit; say which numbers when they do not.
        let staticBytes = compiled.resources.first { $0.name == entry }?.sharedBytes ?? 0
        let limit = device.properties.sharedMemoryPerBlockOptIn
        guard staticBytes + dynamicSharedBytes <= limit else {
            throw CUDAError.invalidArgument(
                "\(entry) needs \(staticBytes) B static + \(dynamicSharedBytes) B dynamic shared memory per block; "
                    + "\(device.properties.name) allows \(limit) B: use fewer pipeline stages (FusedOptions.stages)")
        }
        try function.setMaxDynamicSharedMemory(dynamicSharedBytes)
        gridLimit = try function.cooperativeGridLimit(
            blockSize: Self.threadsPerBlock, dynamicSharedBytes: dynamicSharedBytes)
    }

    /// The gate's K split for `tokens` tokens on `blocks` blocks: enough (token tile, expert tile, K slice) tasks to
    /// occupy the grid when token tiles are few, at most 4 (the kernel clamps to its K slices).
    func gateSplit(tokens: Int, blocks: Int) -> Int {
        let tiles = max(1, (tokens + 127) / 128)
        return max(1, min(4, blocks / (tiles * gateTiles)))
    }

    static func readGlobal(_ module: CUDAModule, _ name: String) throws -> Int32 {
        let (address, size) = try module.global(named: name)
        guard size == 4 else { throw CUDAError.invalidArgument("kernel global \(name) has \(size) bytes, not 4") }
        var value: Int32 = 0
        try module.device.makeCurrent()
        try withUnsafeMutableBytes(of: &value) { raw throws(CUDAError) in
            try module.device.driver.check(
                module.device.driver.memcpyDtoH(raw.baseAddress!, address, 4, nil), "cuMemcpyDtoH_v2(\(name))")
        }
        return value
    }
}

/// The kernel's `Params` and `Peer` structs (moe.cu), assembled field by field in their C layout.
enum FusedParams {
    /// 40 pointers, six 32-bit ints, two 64-bit ints.
    static let byteCount = 40 * 8 + 6 * 4 + 2 * 8
    /// 10 pointers.
    static let peerByteCount = 10 * 8

    /// The scalar tail of `Params`.
    struct Scalars {
        var tokens: Int
        var capacity: Int
        var rank: Int
        var gateSplit: Int
        var rowBlocks: Int
        var epoch: UInt64
        var budgetNanoseconds: UInt64
    }

    static func encode(pointers: [UInt64], _ s: Scalars) -> [UInt8] {
        precondition(pointers.count == 40, "Params has 40 pointers")  // a programming error, not input
        var bytes: [UInt8] = []
        bytes.reserveCapacity(byteCount)
        for p in pointers { withUnsafeBytes(of: p.littleEndian) { bytes += $0 } }
        for v in [s.tokens, s.capacity, s.rank, s.gateSplit, s.rowBlocks, 0] {
            withUnsafeBytes(of: Int32(clamping: v).littleEndian) { bytes += $0 }
        }
        withUnsafeBytes(of: s.epoch.littleEndian) { bytes += $0 }
        withUnsafeBytes(of: s.budgetNanoseconds.littleEndian) { bytes += $0 }
        return bytes
    }

    static func encodePeer(_ pointers: [UInt64]) -> [UInt8] {
        precondition(pointers.count == 10, "Peer has 10 pointers")
        var bytes: [UInt8] = []
        for p in pointers { withUnsafeBytes(of: p.littleEndian) { bytes += $0 } }
        return bytes
    }

    static func nanoseconds(_ d: Duration) -> UInt64 {
        let c = d.components
        return UInt64(max(0, c.seconds)) * 1_000_000_000 + UInt64(max(0, c.attoseconds / 1_000_000_000))
    }
}
