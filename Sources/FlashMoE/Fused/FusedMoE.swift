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
    /// The gate's K split (nil: chosen from the token count and the grid). Fixing it makes runs with different
    /// grids (for example ranks on one GPU) sum the gate's partial products alike, for bitwise comparisons.
    public var gateSplit: Int?
    /// Ranks: build the kernel that records each rank's phase boundaries (`DistributedMoE.phaseTimes()`).
    public var recordPhaseTimes: Bool
    /// Launches after which the epoch restarts at 1. The kernel's flags carry the epoch in 32 bits, so before it
    /// would overflow the host waits for the device, zeroes the counters and flags once and starts over. Tests
    /// lower it to wrap the epoch within a few calls.
    public var epochWrap: UInt64

    public init(
        deviceOrdinal: Int = 0, waitBudget: Duration = .seconds(5), stages: Int = 4, poisonOutput: Bool = false,
        injectFault: Bool = false, stopAfterPhase: Int = 0, gateSplit: Int? = nil,
        epochWrap: UInt64 = UInt64(UInt32.max), recordPhaseTimes: Bool = false
    ) {
        self.recordPhaseTimes = recordPhaseTimes
        self.epochWrap = max(epochWrap, 1)
        self.deviceOrdinal = deviceOrdinal
        self.waitBudget = waitBudget
        self.stages = stages
        self.poisonOutput = poisonOutput
        self.injectFault = injectFault
        self.stopAfterPhase = stopAfterPhase
        self.gateSplit = gateSplit
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
    /// The kernel's compile-time constants.
    public let specialization: FusedSpecialization
    public let options: FusedOptions
    /// The device the operator runs on.
    public var device: CUDADevice { kernel.device }
    /// The compiled kernel (cubin, resources, whether it came from the cache, compile time).
    public var compiledKernel: CompiledKernel { kernel.compiled }
    /// Blocks of the persistent grid (blocks per SM from the occupancy API × SMs).
    public var gridBlocks: Int { kernel.gridLimit }
    /// Dynamic shared memory per block.
    public var dynamicSharedBytes: Int { kernel.dynamicSharedBytes }
    /// Device bytes held by the weights.
    public let weightBytes: Int

    private let kernel: FusedKernel
    private let weights: FusedDeviceWeights
    /// The kernel's `Sync` counters (first 256 bytes) and its error record (at byte 256): never reset between calls.
    private let control: DeviceBuffer<UInt8>

    private struct State {
        var workspace: FusedWorkspace?
        var arena: DeviceBuffer<UInt8>?
        var epoch: UInt64 = 0
    }
    private let state = Mutex(State())

    static let controlBytes = 512
    static let errorRecordOffset = 256

    /// Builds the operator for `layer` on the device `options.deviceOrdinal`.
    ///
    /// Throws `MoEError` for shapes the kernel does not support, `CUDAError` when the driver, NVRTC or the device
    /// fails (no GPU, no NVRTC, out of memory, a compile error with its log).
    public init(layer: MoELayer, options: FusedOptions = FusedOptions()) throws {
        try FusedMemoryCheck.check(layer: layer, options: options)
        self.layer = layer
        self.options = options
        specialization = try FusedSpecialization(
            config: layer.config, stages: options.stages, injectFault: options.injectFault ? 1 : 0,
            stopAfterPhase: options.stopAfterPhase)
        kernel = try FusedKernel(
            specialization: specialization, entry: FusedSpecialization.kernelName, deviceOrdinal: options.deviceOrdinal)
        weights = try FusedDeviceWeights(layer: layer, device: kernel.device, packRows: kernel.packRows)
        weightBytes = weights.byteCount
        control = try DeviceBuffer<UInt8>(device: kernel.device, count: Self.controlBytes)
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
            if options.poisonOutput { try FusedIO.poison(arena, offset: ws.offset(.y), floats: s * h, device: device) }
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
            let second = try FusedIO.upload(FusedIO.reversedRows(input, as: layer.config.precision.storage), device: device)
            let inputs = [arena.address + UInt64(ws.offset(.x)), second.address]
            let samples = try FusedIO.time(device: device, warmup: warmup, iterations: iterations) { i in
                try launch(&st, arena, ws, tokens: s, x: inputs[i % 2])
            }
            try checkError(&st)
            return BenchmarkResult(
                samples: samples,
                method: "CUDA events around each cooperative launch (\(gridBlocks) blocks × "
                    + "\(FusedKernel.threadsPerBlock) threads, \(formatByteCount(dynamicSharedBytes)) shared memory each)",
                workspaceBytes: ws.byteCount)
        }
    }

    // MARK: - Launch machinery

    private func prepare(_ st: inout State, tokens s: Int) throws -> (FusedWorkspace, DeviceBuffer<UInt8>) {
        if let ws = st.workspace, let arena = st.arena, ws.maxTokens >= s { return (ws, arena) }
        st.arena = nil  // free the old arena before allocating the larger one
        let ws = FusedWorkspace(
            spec: specialization, tokens: s, rowCapacity: s * layer.config.topK, gridBlocks: gridBlocks)
        try FusedMemoryCheck.checkArenas([ws], on: [device], tokens: s)
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

    private func launch(
        _ st: inout State, _ arena: DeviceBuffer<UInt8>, _ ws: FusedWorkspace, tokens s: Int, x: CUdeviceptr
    ) throws {
        if st.epoch >= options.epochWrap {
            // The flags hold a 32-bit epoch: restart from zeroed counters rather than overflow it.
            try device.synchronize()
            try control.fill(byte: 0)
            try ws.clearState(of: arena)
            st.epoch = 0
        }
        st.epoch += 1
        let c = layer.config
        let capacity = c.capacity.perExpert(tokens: s, experts: c.experts, topK: c.topK) ?? Int(Int32.max)
        let pointers = ws.pointers(
            base: arena.address, x: x, weights: weights, control: control.address,
            errorRecord: control.address + UInt64(Self.errorRecordOffset), peers: 0)
        let bytes = FusedParams.encode(
            pointers: pointers,
            FusedParams.Scalars(
                tokens: s, capacity: capacity, rank: 0,
                gateSplit: options.gateSplit ?? kernel.gateSplit(tokens: s, blocks: gridBlocks),
                rowBlocks: ws.rowBlocks, epoch: st.epoch, budgetNanoseconds: FusedParams.nanoseconds(options.waitBudget)))
        try kernel.function.launchCooperative(
            grid: Dim3(gridBlocks), block: Dim3(FusedKernel.threadsPerBlock), sharedBytes: dynamicSharedBytes,
            arguments: [KernelArgument(rawBytes: bytes, alignment: 8)], gridSizedByCaller: true)
    }

    /// Reads the error record; on an error, resets every counter (the aborted launch left them mid-protocol)
    /// and throws the decoded record.
    private func checkError(_ st: inout State) throws {
        guard let error = try FusedIO.takeError(
            control: control, offset: Self.errorRecordOffset, arenas: st.arena.map { [$0] } ?? [])
        else { return }
        st.epoch = 0
        throw error
    }

    private func readOutput(_ arena: DeviceBuffer<UInt8>, _ ws: FusedWorkspace, tokens s: Int) throws -> MoEOutput {
        let c = layer.config
        let (h, k, e) = (c.hiddenSize, c.topK, c.experts)
        let y: [Float] = try FusedIO.read(arena, ws.offset(.y), count: s * h)
        let ids: [Int32] = try FusedIO.read(arena, ws.offset(.ids), count: s * k)
        let weights: [Float] = try FusedIO.read(arena, ws.offset(.weights), count: s * k)
        let rows: [Int32] = try FusedIO.read(arena, ws.offset(.slotRow), count: s * k)
        let rowStart: [Int32] = try FusedIO.read(arena, ws.offset(.rowStart), count: e + 1)
        let load: [Int32] = try FusedIO.read(arena, ws.offset(.expertLoad), count: e)
        // The kernel reports a pair's global row; its slot in the expert is the row minus the expert's first row.
        let slots = (0..<s * k).map { i -> Int32 in
            rows[i] >= 0 && ids[i] >= 0 ? rows[i] - rowStart[Int(ids[i])] : -1
        }
        return MoEOutput(
            output: try HostTensor(shape: [s, h], float32: y),
            routing: Routing(
                tokens: s, topK: k, expertIDs: ids, weights: weights, slots: slots, expertLoad: load.map(Int.init)))
    }
}
