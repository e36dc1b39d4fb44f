import CCUDA
import Synchronization

/// Options of the GPU operator.
public struct FusedOptions: Sendable, Hashable {
    /// The CUDA device to run on.
    public var deviceOrdinal: Int
    /// The time budget of every device-side wait. A wait that expires ends the launch with a `FusedKernelError`
    /// instead of a hung GPU. Generous by default: legitimate waits last microseconds to milliseconds.
    public var waitBudget: Duration
    /// Shared-memory pipeline stages (3 to 6; 4 fits the 128×256 wgmma tiles in 227 KiB).
    public var stages: Int
    /// Fill the output with NaN before every launch, so an element the kernel fails to write cannot pass a check.
    public var poisonOutput: Bool
    /// Test builds only: the kernel skips one publication, so a wait must expire (see `FusedKernelError`).
    public var injectFault: Bool
    /// Timing builds only: stop after routing (1) or placement (2). The output is not valid.
    public var stopAfterPhase: Int

    public init(
        deviceOrdinal: Int = 0, waitBudget: Duration = .seconds(5), stages: Int = 4, poisonOutput: Bool = false,
        injectFault: Bool = false, stopAfterPhase: Int = 0
    ) {
        self.deviceOrdinal = deviceOrdinal
        self.waitBudget = waitBudget
        self.stages = stages
        self.poisonOutput = poisonOutput
        self.injectFault = injectFault
        self.stopAfterPhase = stopAfterPhase
    }
}

/// The whole MoE layer in one persistent, cooperative kernel launch per forward (the fused operator).
///
/// Creating it compiles (or loads from the cubin cache) the kernel specialised for the layer, uploads and packs
/// the weights once, and sizes the persistent grid from the occupancy API and the device's SM count. Each forward
/// uploads the input, launches once, and reads back the output and the routing; the per-call workspace is one
/// device allocation kept between calls and regrown only for a larger token count. Calls on one operator are
/// serialised (one launch at a time); the kernel's semantics are the CPU oracle's (`Router`, `CPUBackend`).
public final class FusedMoE: BenchmarkableBackend, @unchecked Sendable {
    // @unchecked: the immutable properties are thread-safe handles; mutable state lives in `state`, a Mutex.

    public let name = "cuda"
    public let layer: MoELayer
    /// The device the operator runs on.
    public let device: CUDADevice
    /// The kernel's compile-time constants.
    public let specialization: FusedSpecialization
    /// The compiled kernel (cubin, resources, whether it came from the cache, compile time).
    public let kernel: CompiledKernel
    /// Blocks of the persistent grid (blocks per SM from the occupancy API × SMs).
    public let gridBlocks: Int
    /// Dynamic shared memory per block.
    public let dynamicSharedBytes: Int
    /// Device bytes held by the weights.
    public let weightBytes: Int
    public let options: FusedOptions

    private let module: CUDAModule
    private let function: CUDAFunction
    private let weights: FusedDeviceWeights
    /// The kernel's `Sync` counters (first 256 bytes) and its error record (at byte 256): never reset between calls.
    private let control: DeviceBuffer<UInt8>

    private struct State {
        var workspace: FusedWorkspace?
        var arena: DeviceBuffer<UInt8>?
        var epoch: UInt64 = 0
    }
    private let state = Mutex(State())

    static let threadsPerBlock = 256
    static let controlBytes = 512
    static let errorRecordOffset = 256

    /// Builds the operator for `layer` on the device `options.deviceOrdinal`.
    ///
    /// Throws `MoEError` for shapes the kernel does not support, `CUDAError` when the driver, NVRTC or the device
    /// fails (no GPU, no NVRTC, out of memory, a compile error with its log).
    public init(layer: MoELayer, options: FusedOptions = FusedOptions()) throws {
        self.layer = layer
        self.options = options
        specialization = try FusedSpecialization(
            config: layer.config, stages: options.stages, injectFault: options.injectFault,
            stopAfterPhase: options.stopAfterPhase)
        let driver = try CUDADriver.shared.get()
        device = try CUDADevice(ordinal: options.deviceOrdinal, driver: driver)
        let environment = ProcessEnvironment.current()
        let compiler = KernelCompiler(backend: try NVRTC.shared.get(), environment: environment)
        kernel = try compiler.compile(
            specialization.kernelSpec, arch: device.properties.architecture,
            sources: KernelSources.current(environment: environment))
        module = try CUDAModule(device: device, cubin: kernel.cubin)
        function = try module.function(named: FusedSpecialization.kernelName)
        dynamicSharedBytes = Int(try Self.readGlobal(module, "fmoe_dynamic_smem"))
        let packRows = Int(try Self.readGlobal(module, "fmoe_gated_pack_rows"))
        try function.setMaxDynamicSharedMemory(dynamicSharedBytes)
        gridBlocks = try function.cooperativeGridLimit(
            blockSize: Self.threadsPerBlock, dynamicSharedBytes: dynamicSharedBytes)
        weights = try FusedDeviceWeights(layer: layer, device: device, packRows: packRows)
        weightBytes = weights.byteCount
        control = try DeviceBuffer<UInt8>(device: device, count: Self.controlBytes)
        try control.fill(byte: 0)
    }

    /// Device bytes of the per-call workspace currently allocated (0 before the first call).
    public var workspaceBytes: Int { state.withLock { $0.workspace?.byteCount ?? 0 } }

    /// Runs the layer on `input` [S, H] (rounded to the layer's storage type), in one launch.
    public func forward(_ input: HostTensor) throws -> MoEOutput {
        try layer.checkInput(input)
        let s = input.shape[0], (h, k) = (layer.config.hiddenSize, layer.config.topK)
        if s == 0 {
            return MoEOutput(
                output: .zeros(shape: [0, h]),
                routing: Routing(
                    tokens: 0, topK: k, expertIDs: [], weights: [], slots: [],
                    expertLoad: [Int](repeating: 0, count: layer.config.experts)))
        }
        return try state.withLock { st in
            let (ws, arena) = try prepare(&st, tokens: s)
            try upload(input, to: arena, ws)
            if options.poisonOutput { try poison(arena, ws, tokens: s) }
            try launch(&st, arena, ws, tokens: s, x: arena.address + UInt64(ws.offset(.x)))
            try device.synchronize()
            try checkError(&st)
            return try readOutput(arena, ws, tokens: s)
        }
    }

    /// Times `iterations` launches with CUDA events around each one, after `warmup` untimed launches. Two input
    /// sets (the input and its rows reversed) alternate so the input is not served from L2 by the previous run.
    public func benchmark(input: HostTensor, warmup: Int, iterations: Int) throws -> BenchmarkResult {
        try layer.checkInput(input)
        let s = input.shape[0]
        guard s > 0 else { return BenchmarkResult(samples: [], method: "no tokens", workspaceBytes: 0) }
        return try state.withLock { st in
            let (ws, arena) = try prepare(&st, tokens: s)
            try upload(input, to: arena, ws)
            let reversedRows = try HostTensor(
                shape: input.shape,
                values: (0..<s).reversed().flatMap { r in (0..<input.shape[1]).map { input.float(at: r * input.shape[1] + $0) } },
                as: layer.config.precision.storage)
            let second = try DeviceBuffer<UInt8>(device: device, count: reversedRows.byteCount)
            try reversedRows.withUnsafeBytes { try second.upload($0) }
            let inputs = [arena.address + UInt64(ws.offset(.x)), second.address]
            let start = try CUDAEvent(device: device), stop = try CUDAEvent(device: device)
            for i in 0..<max(warmup, 0) { try launch(&st, arena, ws, tokens: s, x: inputs[i % 2]) }
            try device.synchronize()
            try checkError(&st)
            var samples: [Double] = []
            for i in 0..<max(iterations, 1) {
                try start.record()
                try launch(&st, arena, ws, tokens: s, x: inputs[i % 2])
                try stop.record()
                try stop.synchronize()
                samples.append(try stop.elapsedMilliseconds(since: start))
            }
            try checkError(&st)
            return BenchmarkResult(
                samples: samples,
                method: "CUDA events around each cooperative launch (\(gridBlocks) blocks × \(Self.threadsPerBlock) "
                    + "threads, \(formatByteCount(dynamicSharedBytes)) shared memory each)",
                workspaceBytes: ws.byteCount)
        }
    }

    // MARK: - Launch machinery

    private func prepare(_ st: inout State, tokens s: Int) throws -> (FusedWorkspace, DeviceBuffer<UInt8>) {
        if let ws = st.workspace, let arena = st.arena, ws.maxTokens >= s { return (ws, arena) }
        st.arena = nil  // free the old arena before allocating the larger one
        let ws = FusedWorkspace(spec: specialization, maxTokens: s, gridBlocks: gridBlocks)
        let arena = try DeviceBuffer<UInt8>(device: device, count: ws.byteCount)
        try arena.fill(byte: 0)
        st.workspace = ws
        st.arena = arena
        return (ws, arena)
    }

    private func upload(_ input: HostTensor, to arena: DeviceBuffer<UInt8>, _ ws: FusedWorkspace) throws {
        let x = input.converted(to: layer.config.precision.storage)
        try x.withUnsafeBytes { try arena.upload($0, at: ws.offset(.x)) }
    }

    private func poison(_ arena: DeviceBuffer<UInt8>, _ ws: FusedWorkspace, tokens s: Int) throws {
        // 0xFFFFFFFF is a NaN: any element the kernel does not write fails every comparison.
        try device.makeCurrent()
        try device.driver.check(
            device.driver.memsetD32(
                arena.address + UInt64(ws.offset(.y)), 0xFFFF_FFFF, s * layer.config.hiddenSize, nil),
            "cuMemsetD32_v2(poison output)")
    }

    private func launch(
        _ st: inout State, _ arena: DeviceBuffer<UInt8>, _ ws: FusedWorkspace, tokens s: Int, x: CUdeviceptr
    ) throws {
        st.epoch += 1
        let c = layer.config
        let capacity = c.capacity.perExpert(tokens: s, experts: c.experts, topK: c.topK) ?? Int(Int32.max)
        let base = arena.address
        func at(_ r: FusedWorkspace.Region) -> UInt64 { base + UInt64(ws.offset(r)) }
        let w = weights
        // The order of `Params` in moe.cu.
        let pointers: [UInt64] = [
            x, w.router.address, w.selectionBias?.address ?? 0, w.w1.address, w.w2.address,
            w.b1?.address ?? 0, w.b2?.address ?? 0, w.sharedW1?.address ?? 0, w.sharedW2?.address ?? 0,
            at(.y), at(.ids), at(.weights), at(.slotRow), at(.logits), at(.logitsPart), at(.rankInTile), at(.sharedGate),
            at(.tileDone), at(.counts), at(.base), at(.expertLoad), at(.rowStart), at(.rbStart), at(.task0Start),
            at(.rowToken), at(.target), at(.pending), at(.done0), at(.done1), at(.ring), at(.combineList), at(.hbuf),
            at(.hs),
            at(.ybuf), at(.ys), control.address, control.address + UInt64(Self.errorRecordOffset),
        ]
        var bytes: [UInt8] = []
        bytes.reserveCapacity(pointers.count * 8 + 24)
        for p in pointers { withUnsafeBytes(of: p.littleEndian) { bytes += $0 } }
        withUnsafeBytes(of: Int32(s).littleEndian) { bytes += $0 }
        withUnsafeBytes(of: Int32(clamping: capacity).littleEndian) { bytes += $0 }
        withUnsafeBytes(of: st.epoch.littleEndian) { bytes += $0 }
        let budget = options.waitBudget.components
        let ns = UInt64(max(0, budget.seconds)) * 1_000_000_000 + UInt64(max(0, budget.attoseconds / 1_000_000_000))
        withUnsafeBytes(of: ns.littleEndian) { bytes += $0 }
        try function.launchCooperative(
            grid: Dim3(gridBlocks), block: Dim3(Self.threadsPerBlock), sharedBytes: dynamicSharedBytes,
            arguments: [KernelArgument(rawBytes: bytes, alignment: 8)], gridSizedByCaller: true)
    }

    /// Reads the error record; on an error, resets every counter (the aborted launch left them mid-protocol)
    /// and throws the decoded record.
    private func checkError(_ st: inout State) throws {
        let record = try control.download(count: 40, from: Self.errorRecordOffset)
        guard let error = FusedKernelError.decode(record) else { return }
        try control.fill(byte: 0)
        try st.arena?.fill(byte: 0)
        st.epoch = 0
        throw error
    }

    private func readOutput(_ arena: DeviceBuffer<UInt8>, _ ws: FusedWorkspace, tokens s: Int) throws -> MoEOutput {
        let c = layer.config
        let (h, k, e) = (c.hiddenSize, c.topK, c.experts)
        let y: [Float] = try read(arena, ws.offset(.y), count: s * h)
        let ids: [Int32] = try read(arena, ws.offset(.ids), count: s * k)
        let weights: [Float] = try read(arena, ws.offset(.weights), count: s * k)
        let rows: [Int32] = try read(arena, ws.offset(.slotRow), count: s * k)
        let rowStart: [Int32] = try read(arena, ws.offset(.rowStart), count: e + 1)
        let load: [Int32] = try read(arena, ws.offset(.expertLoad), count: e)
        // The kernel reports a pair's global row; its slot in the expert is the row minus the expert's first row.
        let slots = (0..<s * k).map { i -> Int32 in
            rows[i] >= 0 && ids[i] >= 0 ? rows[i] - rowStart[Int(ids[i])] : -1
        }
        return MoEOutput(
            output: try HostTensor(shape: [s, h], float32: y),
            routing: Routing(
                tokens: s, topK: k, expertIDs: ids, weights: weights, slots: slots, expertLoad: load.map(Int.init)))
    }

    private func read<T: BitwiseCopyable>(_ arena: DeviceBuffer<UInt8>, _ offset: Int, count: Int) throws -> [T] {
        var failure: CUDAError?
        let values = [T](unsafeUninitializedCapacity: count) { buffer, initialized in
            do throws(CUDAError) {
                try arena.download(into: UnsafeMutableRawBufferPointer(buffer), from: offset)
                initialized = count
            } catch {
                failure = error
                initialized = 0
            }
        }
        if let failure { throw failure }
        return values
    }

    private static func readGlobal(_ module: CUDAModule, _ name: String) throws -> Int32 {
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
