import CCUDA

/// A compiled, loaded specialisation of the fused kernel and the facts the host needs to launch it.
///
/// The kernel reports its own launch contract through module globals (dynamic shared memory, the gated-weight
/// packing block, the size and field offsets of its parameter structs, the gate's expert tiles), so the host never
/// re-derives a constant the kernel could disagree with.
struct FusedKernel {
    let device: CUDADevice
    let compiled: CompiledKernel
    let module: CUDAModule
    let function: CUDAFunction
    let dynamicSharedBytes: Int
    let packRows: Int
    let gateTiles: Int
    /// Rows of the router GEMM (`EG`: E, plus the shared expert's gate when it has one).
    let routerRows: Int
    /// The most tokens a launch may have for its gate to run as dot products (`gate_gemv.cuh`; 0: never).
    let gateGemvTokens: Int
    /// Blocks of a cooperative launch: blocks per SM from the occupancy API × SMs.
    let gridLimit: Int
    /// Threads per block, read from the kernel (`fmoe_block_threads`): 256, or 384 with the TMA engine's producer
    /// warpgroup (`FusedSpecialization.tmaEngine`).
    let blockThreads: Int
    /// Bytes of the kernel's second parameter, the TMA operands' tensor maps (`FusedTensorMaps`); 0: no such
    /// parameter.
    let tensorMapBytes: Int

    /// The phases' threads per block (the kernel's `PHASE_THREADS`).
    static let threadsPerBlock = 256

    /// The gate's K split for `tokens` tokens (over all ranks) on `blocks` blocks (the kernel clamps it to its K
    /// slices); 0 asks for the decode gate (`gate_gemv.cuh`) when the kernel has one and the tokens are few enough.
    func gateSplit(tokens: Int, blocks: Int) -> Int {
        if tokens >= 1 && tokens <= gateGemvTokens { return 0 }
        return Self.gateSplit(tokens: tokens, blocks: blocks, gateTiles: gateTiles, routerRows: routerRows)
    }

    /// The gate's K split: enough (token tile, expert tile, K slice) tasks to occupy the blocks when token tiles are
    /// few, at most `FusedWorkspace.gateSplitMax`. Above 4 only while a token tile's partials stay within 16
    /// batches of loads (routing reads split · min(S, 128) · routerRows floats a tile, 2048 a batch, over the
    /// tile's route tasks): decode's one small token tile gets up to 16 slices (the gate was 18 of qwen3-30b-a3b's
    /// 97 µs at S = 1 with 4 slices, H200), fuller tiles keep at most 4. Every split keeps split · S ≤ 128 · blocks
    /// (it is at most blocks / tiles).
    static func gateSplit(tokens: Int, blocks: Int, gateTiles: Int, routerRows: Int) -> Int {
        let tiles = max(1, (tokens + 127) / 128)
        let occupancy = blocks / (tiles * max(gateTiles, 1))
        let batches = (min(max(tokens, 1), 128) * max(routerRows, 1) + 2047) / 2048
        let reduction = max(4, 16 / batches)
        return max(1, min(FusedWorkspace.gateSplitMax, occupancy, reduction))
    }
}

extension FusedKernel {
    /// Compiles (or loads from the cache) `specialization`, loads it on device `deviceOrdinal` and reads its launch
    /// contract; throws when the kernel's `Params` or `Peer` layout differs from the host's encoding.
    init(specialization: FusedSpecialization, entry: String, deviceOrdinal: Int) throws {
        self = try Self.load([specialization], entry: entry, deviceOrdinal: deviceOrdinal)[0]
    }

    /// The same for several specialisations (an operator's decode and prefill kernels, `FusedPrefillEngine`): NVRTC
    /// compiles them side by side (`compile`), then each loads in order.
    static func load(_ specs: [FusedSpecialization], entry: String, deviceOrdinal: Int) throws -> [FusedKernel] {
        let driver = try CUDADriver.shared.get()
        let compiled = try compile(specs)
        let device = try CUDADevice(ordinal: deviceOrdinal, driver: driver)
        return try specs.indices.map { i in
            try FusedKernel(
                specialization: specs[i], entry: entry, device: device, build: { _, _ in compiled[i] },
                prepare: { _ in })
        }
    }

    /// Compiles (or finds in the cache) `specs`, side by side (`KernelCompiler.compileAll`); throws the first failure.
    static func compile(_ specs: [FusedSpecialization]) throws -> [CompiledKernel] {
        let environment = ProcessEnvironment.current()
        let compiler = KernelCompiler(backend: try NVRTC.shared.get(), environment: environment)
        // FLASHMOE_LINEINFO=1: keep source lines in the cubin, so compute-sanitizer and ncu name kernel lines.
        return try compiler.compileAll(
            specs.map { ($0.kernelSpec, $0.arch) }, sources: KernelSources.current(environment: environment),
            lineInfo: environment["FLASHMOE_LINEINFO"] == "1"
        ).map { try $0.get() }
    }

    /// The same, with the cubin from `build` (e.g. the NVSHMEM link) and `prepare` run on the module right after it
    /// loads, before any launch (e.g. `nvshmemx_cumodule_init`).
    init(
        specialization: FusedSpecialization, entry: String, device: CUDADevice,
        build: (KernelSpec, GPUArchitecture) throws -> CompiledKernel, prepare: (CUDAModule) throws -> Void
    ) throws {
        let arch = device.properties.architecture
        if specialization.config.precision == .fp8 && !FusedSpecialization.hasFP8Engine(arch) {
            throw MoEError(
                .unsupported,
                "precision fp8 runs on sm_90a (Hopper) and sm_89 (Ada) GPUs only; \(device.properties.name) is \(arch) (docs/fp8.md): run fp8 on the CPU backends or use --precision bf16")
        }
        // The specialization's target, not always the device's own (FLASHMOE_EMULATE_ARCH runs a smaller GPU's build).
        let compiled = try build(specialization.kernelSpec, specialization.arch)
        let module = try CUDAModule(device: device, cubin: compiled.cubin)
        try prepare(module)
        let function = try module.function(named: entry)
        // The probe writes Params' size and field offsets into a module global (one launch at load, never again).
        try module.function(named: "fmoe_params_probe").launch(grid: Dim3(1), block: Dim3(1), arguments: [])
        try device.synchronize()
        let paramsLayout = try Self.readGlobal(module, "fmoe_params_layout", count: FusedParams.layout.count)
        try FusedParams.checkLayout(kernel: paramsLayout.map(Int.init))
        let peerBytes = Int(try Self.readGlobal(module, "fmoe_peer_bytes"))
        guard peerBytes == FusedParams.peerByteCount else {
            throw CUDAError.invalidArgument(
                "the kernel's Peer (\(peerBytes) B) layout differs from the host's (\(FusedParams.peerByteCount) B): "
                    + "kernel sources and binary disagree")
        }
        let dynamicSharedBytes = Int(try Self.readGlobal(module, "fmoe_dynamic_smem"))
        // Static + dynamic shared memory must fit the block's opt-in limit; say which numbers when they do not.
        let staticBytes = compiled.resources.first { $0.name == entry }?.sharedBytes ?? 0
        let limit = device.properties.sharedMemoryPerBlockOptIn
        guard staticBytes + dynamicSharedBytes <= limit else {
            throw CUDAError.invalidArgument(
                "\(entry) needs \(staticBytes) B static + \(dynamicSharedBytes) B dynamic shared memory per block; "
                    + "\(device.properties.name) allows \(limit) B: use fewer pipeline stages (FusedOptions.stages)")
        }
        try function.setMaxDynamicSharedMemory(dynamicSharedBytes)
        let blockThreads = Int(try Self.readGlobal(module, "fmoe_block_threads"))
        let tensorMapBytes = Int(try Self.readGlobal(module, "fmoe_tma_maps_bytes"))
        guard tensorMapBytes == (specialization.tmaEngine ? FusedTensorMaps.byteCount : 0) else {
            throw CUDAError.invalidArgument(
                "the kernel's tensor-map parameter has \(tensorMapBytes) B, the host's \(specialization.tmaEngine ? FusedTensorMaps.byteCount : 0) B: "
                    + "kernel sources and binary disagree")
        }
        self.init(
            device: device, compiled: compiled, module: module, function: function,
            dynamicSharedBytes: dynamicSharedBytes, packRows: Int(try Self.readGlobal(module, "fmoe_gated_pack_rows")),
            gateTiles: Int(try Self.readGlobal(module, "fmoe_gate_tiles")),
            routerRows: Int(try Self.readGlobal(module, "fmoe_router_rows")),
            gateGemvTokens: Int(try Self.readGlobal(module, "fmoe_gate_gemv_tokens")),
            gridLimit: try function.cooperativeGridLimit(blockSize: blockThreads, dynamicSharedBytes: dynamicSharedBytes),
            blockThreads: blockThreads, tensorMapBytes: tensorMapBytes)
    }

    static func readGlobal(_ module: CUDAModule, _ name: String) throws -> Int32 {
        try readGlobal(module, name, count: 1)[0]
    }

    /// `count` 32-bit values of the module global `name` (its size must be exactly that).
    static func readGlobal(_ module: CUDAModule, _ name: String, count: Int) throws -> [Int32] {
        let (address, size) = try module.global(named: name)
        guard size == 4 * count else {
            throw CUDAError.invalidArgument(
                "kernel global \(name) has \(size) bytes, not \(4 * count): kernel sources and binary disagree")
        }
        var values = [Int32](repeating: 0, count: count)
        try module.device.makeCurrent()
        try values.withUnsafeMutableBytes { raw in
            try module.device.driver.check(
                module.device.driver.memcpyDtoH(raw.baseAddress!, address, 4 * count, nil), "cuMemcpyDtoH_v2(\(name))")
        }
        return values
    }
}

/// The kernel's `Params` and `Peer` structs (moe.cu), assembled field by field in their C layout.
enum FusedParams {
    /// `Params`' pointer fields, in declaration order (8 bytes each).
    static let pointerFields = [
        "x", "wg", "sel_bias", "w1", "w2", "b1", "b2", "ws1", "ws2", "y", "ids", "weights", "slot_row", "logits",
        "logits_part", "rank_in_tile", "shared_gate", "tile_done", "counts", "base", "expert_load", "row_start",
        "rb_start", "task0_start", "row_token", "target", "pending", "done0", "done1", "ring", "combine_list", "hbuf",
        "hs", "ybuf", "ys", "sync", "err", "peers", "tile_dispatched", "rows_sent", "err_mirror", "xq", "xq_scale", "hq",
        "hq_scale", "hq_done",
    ]
    /// Then the 32-bit ints, then the 64-bit ones.
    static let intFields = [
        "tokens", "capacity", "rank", "gate_ksplit", "row_blocks", "max_tokens", "part_rows", "y_storage",
        "inject_fault", "pad",
    ]
    static let wideFields = ["epoch", "budget_ns", "epoch_wrap"]

    static var fieldNames: [String] { pointerFields + intFields + wideFields }
    /// Each field's byte offset, in `fieldNames` order (C layout: the ints fill a multiple of 8 bytes).
    static var offsets: [Int] {
        let ints = pointerFields.count * 8, wides = ints + intFields.count * 4
        return pointerFields.indices.map { $0 * 8 } + intFields.indices.map { ints + $0 * 4 }
            + wideFields.indices.map { wides + $0 * 8 }
    }
    /// 46 pointers, ten 32-bit ints, three 64-bit ints.
    static var byteCount: Int { pointerFields.count * 8 + intFields.count * 4 + wideFields.count * 8 }
    /// What `fmoe_params_layout` holds: the size, then every field's offset.
    static var layout: [Int] { [byteCount] + offsets }
    /// 10 pointers.
    static let peerByteCount = 10 * 8

    /// Compares the kernel's `fmoe_params_layout` with the host's encoding; the error names the first field that
    /// differs (issue 11: a field added on one side only must fail at load, not corrupt a launch).
    static func checkLayout(kernel: [Int]) throws {
        guard kernel != layout else { return }
        let names = ["sizeof(Params)"] + fieldNames
        let i = zip(kernel, layout).enumerated().first { $0.element.0 != $0.element.1 }?.offset
            ?? min(kernel.count, layout.count)
        let what = i < names.count ? names[i] : "field \(i)"
        throw CUDAError.invalidArgument(
            "the kernel's Params layout differs from the host's at \(what) (kernel \(i < kernel.count ? kernel[i] : -1), "
                + "host \(i < layout.count ? layout[i] : -1)): kernel sources and binary disagree")
    }

    /// The scalar tail of `Params`.
    struct Scalars {
        var tokens: Int
        var capacity: Int
        var rank: Int
        var gateSplit: Int
        var rowBlocks: Int
        var maxTokens: Int = 0
        var partRows: Int = 0
        var yStorage: Bool = false
        var injectFault: Bool = false
        var epoch: UInt64
        var budgetNanoseconds: UInt64
        var epochWrap: UInt64 = UInt64(UInt32.max)
    }

    static func encode(pointers: [UInt64], _ s: Scalars) -> [UInt8] {
        precondition(pointers.count == pointerFields.count, "Params has \(pointerFields.count) pointers")
        var bytes: [UInt8] = []
        bytes.reserveCapacity(byteCount)
        for p in pointers { withUnsafeBytes(of: p.littleEndian) { bytes += $0 } }
        let ints = [
            s.tokens, s.capacity, s.rank, s.gateSplit, s.rowBlocks, s.maxTokens, s.partRows, s.yStorage ? 1 : 0,
            s.injectFault ? 1 : 0, 0,
        ]
        precondition(ints.count == intFields.count, "Params has \(intFields.count) ints")
        for v in ints { withUnsafeBytes(of: Int32(clamping: v).littleEndian) { bytes += $0 } }
        for v in [s.epoch, s.budgetNanoseconds, s.epochWrap] { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
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
