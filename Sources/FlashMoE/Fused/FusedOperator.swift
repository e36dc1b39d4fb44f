import CCUDA
import Synchronization

/// The GPU operator core: one persistent, cooperative kernel launch per forward over device memory, on the
/// caller's stream.
///
/// Created once per layer: it compiles (or loads from the cubin cache) the kernel specialised for the config (fp8
/// layers of many experts on sm_90a: two, the second for prefill launches, `FusedPrefillEngine`), takes
/// the weights in the kernel's layout, sizes the persistent grid from the occupancy API and, when `maxTokens` is
/// given, allocates the workspace (one device arena) for that many tokens. Then each `forward(_:)`:
/// - makes the device's context current, checks the arguments and the error mirror (no device call),
/// - enqueues exactly one kernel launch on the caller's stream: no host synchronisation, no allocation, no copy,
///   no memset. The epoch lives on the device (the kernel advances it), so a CUDA graph that captured the launch
///   replays correctly any number of times, with new input values each time.
/// A fault the kernel records (a wait that expired) is copied by the launch's last block into host-mapped memory:
/// it is thrown on the next forward or `checkErrors()`, or at once with `FusedOptions.synchronousErrors`; the
/// device state is reset then. Calls are serialised (one at a time per operator), and the launches of one
/// operator must run one after another on the device: enqueue them on one stream (or order the streams with
/// events). They share the operator's workspace and counters; two operators may run side by side.
///
/// `FusedMoE` wraps it with the host-array `MoEBackend` API.
public final class FusedOperator: @unchecked Sendable {
    // @unchecked: the immutable properties are thread-safe handles; mutable state lives in `state`, a Mutex.

    /// The layer's configuration.
    public let config: MoEConfig
    /// The kernel's compile-time constants.
    public let specialization: FusedSpecialization
    /// The options it was built with.
    public let options: FusedOptions
    /// The most tokens one forward may pass, when fixed at creation (nil: the workspace grows on demand).
    public let maxTokens: Int?
    /// Device bytes held by the weights.
    public var weightBytes: Int { weights.byteCount }
    /// The device the operator runs on.
    public var device: CUDADevice { kernel.device }
    /// The compiled kernel (cubin, resources, whether it came from the cache, compile time).
    public var compiledKernel: CompiledKernel { kernel.compiled }
    /// fp8 on sm_90a: the TMA engine's build that launches of at least `prefillTokens` tokens run
    /// (`FusedPrefillEngine`); nil when every launch runs `specialization`.
    public var prefillSpecialization: FusedSpecialization? { prefill?.specialization }
    /// The prefill kernel's compile (nil without one).
    public var prefillCompiledKernel: CompiledKernel? { prefill?.kernel.compiled }
    /// The fewest tokens a launch of the prefill kernel has (nil without one).
    public var prefillTokens: Int? { prefill?.minTokens }
    /// Why an operator that would launch a prefill kernel has none (it did not build, its compile spills, or its
    /// launch facts differ from the first kernel's); nil otherwise.
    public let prefillSkipReason: String?
    /// Why the prefill kernel runs 128-row fp8 tiles where 256 were asked for (that build failed, spilled or did not
    /// match the first kernel); nil when it runs the rows asked for or there is no prefill kernel.
    public var prefillNarrowedReason: String? { prefill?.narrowedBecause }
    /// Blocks of the persistent grid (blocks per SM from the occupancy API × SMs).
    public var gridBlocks: Int { kernel.gridLimit }
    /// Dynamic shared memory per block.
    public var dynamicSharedBytes: Int { kernel.dynamicSharedBytes }
    /// Rows per gate/up block of the gated W1/W3 packing (`FusedDeviceWeights`), read from the kernel.
    public var packRows: Int { kernel.packRows }

    let kernel: FusedKernel
    /// The second kernel, for prefill launches (fp8 on sm_90a), or nil.
    let prefill: FusedPrefillEngine?
    let weights: FusedDeviceWeights
    /// Tracing builds: where the kernel records its timeline (`FusedMoE.recordedTrace()`).
    let traceBuffer: FusedTraceBuffer?
    /// Tracing builds with a prefill kernel: where that kernel records.
    let prefillTraceBuffer: FusedTraceBuffer?
    /// The kernel's `Sync` counters (first 256 bytes, the device epoch among them) and its error record (at byte
    /// 256): reset only after an error.
    let control: DeviceBuffer<UInt8>
    /// Host-mapped copy of the error record, written by a launch's last block when the record holds an error.
    let mirror: HostMappedBuffer

    struct State {
        var workspace: FusedWorkspace?
        var arena: DeviceBuffer<UInt8>?
        /// TMA-engine builds: the tensor-map parameter for this arena (`FusedTensorMaps`).
        var tensorMaps: [UInt8]?
        /// Whether the last launch ran the prefill kernel (whose trace `recordedTrace()` reads).
        var lastRanPrefill = false
    }
    let state = Mutex(State())

    static let controlBytes = 512
    static let errorRecordOffset = 256
    static let errorRecordBytes = 40

    /// Builds the operator for `layer` (weights uploaded and packed once) on `options.deviceOrdinal`.
    ///
    /// - Parameter maxTokens: the most tokens one forward may pass; the workspace is allocated for it now. nil sizes
    ///   it on the first forward and regrows it for a larger one (an allocation inside that forward).
    public convenience init(layer: MoELayer, options: FusedOptions = FusedOptions(), maxTokens: Int? = nil) throws {
        try self.init(config: layer.config, options: options, maxTokens: maxTokens) { kernel in
            try FusedDeviceWeights(layer: layer, device: kernel.device, packRows: kernel.packRows)
        }
    }

    /// Compiles and loads the kernel for `config`, then takes the weights from `makeWeights`, which receives the
    /// loaded kernel (its device and `packRows`, which gated packing needs): operators built from the caller's
    /// device weights start here.
    convenience init(
        config: MoEConfig, options: FusedOptions, maxTokens: Int?,
        makeWeights: (FusedKernel) throws -> FusedDeviceWeights
    ) throws {
        // Weights and the workspace must fit in the GPU's free memory: refuse with a suggestion before allocating.
        try FusedMemoryCheck.check(
            config: config, tokens: max(maxTokens ?? FusedMemoryCheck.tokensAtCreation, 1),
            devices: [options.deviceOrdinal])
        let target = try FusedDeviceTarget(ordinals: [options.deviceOrdinal])
        let specialization = try FusedSpecialization(
            config: config, arch: target.arch, sharedMemoryPerBlock: target.sharedMemoryPerBlock, stages: options.stages,
            injectFault: options.injectFault ? 1 : 0, stopAfterPhase: options.stopAfterPhase,
            trace: options.traceEventsPerBlock > 0, returnStorage: options.storageReturns)
        let (kernel, outcome) = try FusedPrefillEngine.load(
            baseSpec: specialization, options: options, sharedMemoryPerBlock: target.sharedMemoryPerBlock
        ) { specs in
            try FusedKernel.load(specs, entry: FusedSpecialization.kernelName, deviceOrdinal: options.deviceOrdinal)
        } resources: { spec in
            try FusedKernel.compile([spec])[0].resources
        }
        try self.init(
            specialization: specialization, options: options, maxTokens: maxTokens, kernel: kernel,
            weights: try makeWeights(kernel), prefill: outcome)
    }

    /// The designated initializer: an already loaded kernel and weights (tests build both over a fake driver).
    init(
        specialization: FusedSpecialization, options: FusedOptions, maxTokens: Int?, kernel: FusedKernel,
        weights: FusedDeviceWeights, prefill: FusedPrefillEngine.Outcome = .notApplicable
    ) throws {
        if let maxTokens, maxTokens < 0 {
            throw MoEError(.invalidConfig, "maxTokens must be at least 0, not \(maxTokens)")
        }
        config = specialization.config
        self.specialization = specialization
        self.options = options
        self.maxTokens = maxTokens
        self.kernel = kernel
        self.weights = weights
        switch prefill {
        case .engine(let engine):
            self.prefill = engine
            prefillSkipReason = nil
        case .skipped(let reason):
            self.prefill = nil
            prefillSkipReason = reason
        case .notApplicable:
            self.prefill = nil
            prefillSkipReason = nil
        }
        func makeTraceBuffer(_ k: FusedKernel) throws -> FusedTraceBuffer? {
            try specialization.trace
                ? FusedTraceBuffer(module: k.module, blocks: k.gridLimit, capacity: max(options.traceEventsPerBlock, 1))
                : nil
        }
        traceBuffer = try makeTraceBuffer(kernel)
        prefillTraceBuffer = try self.prefill.flatMap { try makeTraceBuffer($0.kernel) }
        control = try DeviceBuffer<UInt8>(device: kernel.device, count: Self.controlBytes)
        try control.fill(byte: 0)
        mirror = try HostMappedBuffer(device: kernel.device, byteCount: 64)
        // The weight copies and fills above are queued on the legacy stream, which a caller's non-blocking stream
        // does not wait for: they must be complete before the first launch (prepare synchronizes after its memset).
        if let maxTokens {
            try state.withLock { st in _ = try prepare(&st, tokens: max(maxTokens, 1)) }
        } else {
            try kernel.device.synchronize()
        }
    }

    /// The specialisation a launch of `tokens` tokens runs: the prefill kernel's from `prefillTokens` on, else the
    /// first kernel's.
    public func specialization(forTokens tokens: Int) -> FusedSpecialization {
        prefill(forTokens: tokens)?.specialization ?? specialization
    }

    /// The kernel a launch of `tokens` tokens runs.
    func kernel(forTokens tokens: Int) -> FusedKernel {
        prefill(forTokens: tokens)?.kernel ?? kernel
    }

    /// The prefill engine when a launch of `tokens` tokens runs it, else nil.
    private func prefill(forTokens tokens: Int) -> FusedPrefillEngine? {
        prefill.flatMap { $0.runs(tokens: tokens) ? $0 : nil }
    }

    /// Device bytes of the workspace currently allocated (0 before the first call when sized lazily).
    public var workspaceBytes: Int { state.withLock { $0.workspace?.byteCount ?? 0 } }

    // MARK: - The device forward

    /// Enqueues one forward over the caller's device memory on `call.stream` (see `DeviceForward`): exactly one
    /// kernel launch, nothing else. Throws, before launching anything, `MoEError` for a bad argument (token count
    /// out of range, a null or misaligned pointer, a stream of another device) and the `FusedKernelError` an
    /// earlier launch recorded (the device state is reset then; call again to run).
    public func forward(_ call: DeviceForward) throws {
        try state.withLock { st in try forward(call, &st) }
    }

    /// Throws the error a finished launch recorded, if any (then resets the device state), without synchronising:
    /// launches still running are seen by a later check.
    public func checkErrors() throws {
        try state.withLock { st in
            try device.makeCurrent()
            try takeMirroredError(&st)
        }
    }

    /// Waits for the work queued on `stream` (nil: the legacy default stream), then throws the error any launch
    /// recorded — for a point where the caller waits anyway.
    public func checkErrors(synchronizing stream: CUstream?) throws {
        try state.withLock { st in
            try device.makeCurrent()
            try device.driver.check(device.driver.streamSynchronize(stream), "cuStreamSynchronize")
            try takeMirroredError(&st)
        }
    }

    func forward(_ call: DeviceForward, _ st: inout State) throws {
        try device.makeCurrent()
        try validate(call)
        try takeMirroredError(&st)
        guard call.tokens > 0 else { return }
        let (ws, arena) = try prepare(&st, tokens: call.tokens)
        let s = call.tokens
        let c = config
        let capacity = c.capacity.perExpert(tokens: s, experts: c.experts, topK: c.topK) ?? Int(Int32.max)
        let split = options.gateSplit ?? kernel.gateSplit(tokens: s, blocks: gridBlocks)
        guard ws.holdsGateSplit(split, tokens: s) else {
            throw MoEError(
                .unsupported,
                "gate split \(split) over \(s) tokens needs more partial-logit rows than the workspace holds "
                    + "(\(ws.partRows) rows): use a smaller FusedOptions.gateSplit")
        }
        let pointers = ws.pointers(
            base: arena.address, x: call.input, weights: weights, control: control.address,
            errorRecord: control.address + UInt64(Self.errorRecordOffset), peers: 0, y: call.output,
            ids: call.topKIDs, routingWeights: call.topKWeights, errorMirror: mirror.deviceAddress)
        let bytes = FusedParams.encode(
            pointers: pointers,
            FusedParams.Scalars(
                tokens: s, capacity: capacity, rank: 0, gateSplit: split, rowBlocks: ws.rowBlocks,
                maxTokens: ws.maxTokens, partRows: ws.partRows, yStorage: call.outputType == .storage,
                injectFault: call.injectFault, epoch: 0, budgetNanoseconds: FusedParams.nanoseconds(options.waitBudget),
                epochWrap: options.epochWrap))
        // The prefill kernel for large launches (fp8 on sm_90a): same Params, workspace and bits as the first kernel.
        let launched = kernel(forTokens: s)
        var arguments = [KernelArgument(rawBytes: bytes, alignment: 8)]
        if launched.tensorMapBytes > 0, let maps = st.tensorMaps {
            arguments.append(KernelArgument(rawBytes: maps, alignment: 64))
        }
        try launched.function.launchCooperative(
            grid: Dim3(gridBlocks), block: Dim3(launched.blockThreads), sharedBytes: launched.dynamicSharedBytes,
            streamHandle: call.stream, arguments: arguments, gridSizedByCaller: true)
        st.lastRanPrefill = prefill(forTokens: s) != nil
        if options.synchronousErrors {
            try device.driver.check(device.driver.streamSynchronize(call.stream), "cuStreamSynchronize")
            try takeMirroredError(&st)
        }
    }

    /// Checks a call's arguments against the operator; every failure names the argument and what it expects.
    func validate(_ call: DeviceForward) throws {
        try call.check(
            device: device, hiddenSize: config.hiddenSize, maxTokens: maxTokens, faultBuild: options.injectFault,
            owner: "operator")
    }

    // MARK: - Machinery

    /// The arena for `tokens` tokens: the one allocated at creation, or (sized lazily) the current one, regrown
    /// for a larger count.
    func prepare(_ st: inout State, tokens s: Int) throws -> (FusedWorkspace, DeviceBuffer<UInt8>) {
        if let ws = st.workspace, let arena = st.arena, ws.maxTokens >= s { return (ws, arena) }
        st.arena = nil  // free the old arena before allocating the larger one
        st.workspace = nil
        st.tensorMaps = nil
        let ws = FusedWorkspace(
            spec: specialization, tokens: s, rowCapacity: s * config.topK,
            partRows: FusedWorkspace.partialLogitsRows(
                tokens: s, splitBlocks: gridBlocks, fixedSplit: options.gateSplit != nil))
        try FusedMemoryCheck.checkArenas([ws], on: [device], tokens: s)
        let arena = try DeviceBuffer<UInt8>(device: device, count: ws.byteCount)
        try arena.fill(byte: 0)
        try device.synchronize()  // the legacy-stream memset lands before a launch on a non-blocking stream
        // The maps of whichever kernel takes them (the first, in FLASHMOE_TMA=1 builds, or the prefill kernel).
        if let tma = kernel.tensorMapBytes > 0 ? specialization : prefill?.specialization {
            st.tensorMaps = try FusedTensorMaps.encode(
                device: device, spec: tma, weights: weights, workspace: ws, arenaBase: arena.address)
        }
        st.workspace = ws
        st.arena = arena
        return (ws, arena)
    }

    /// The error record a launch mirrored to the host, if any: then waits for the device (queued launches exit at
    /// once: the abort flag is raised), zeroes the counters, the arena and the mirror (the epoch restarts at 1)
    /// and throws the decoded record.
    func takeMirroredError(_ st: inout State) throws {
        guard mirror.code != 0 else { return }
        try device.synchronize()
        let record = mirror.bytes(count: Self.errorRecordBytes)
        try control.fill(byte: 0)
        if let arena = st.arena { try arena.fill(byte: 0) }
        try device.synchronize()  // cleared before the next launch, whatever stream it is queued on
        mirror.zero()
        if let error = FusedKernelError.decode(record) { throw error }
    }
}
