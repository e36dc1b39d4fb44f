import CCUDA

/// The whole MoE layer in one persistent, cooperative kernel launch per forward (the fused operator), as a
/// host-array `MoEBackend` over the device-resident core `FusedOperator`.
///
/// `forward(_ input: HostTensor)` is a convenience: it uploads the input into the workspace, runs the device
/// forward on the legacy default stream, synchronises and reads back the output and the routing. Frameworks call
/// `forward(_ call: DeviceForward)` instead, on their own device memory and stream (see `FusedOperator`):
///
/// ```swift
/// let moe = try FusedMoE(layer: layer, maxTokens: 4096)
/// try moe.forward(DeviceForward(input: x, output: y, tokens: s, stream: stream))  // enqueued, no sync
/// try moe.checkErrors()                                                             // faults of earlier launches
/// ```
///
/// The kernel's semantics are the CPU oracle's (`Router`, `CPUBackend`).
public final class FusedMoE: BenchmarkableBackend, @unchecked Sendable {
    // @unchecked: immutable; the core serialises its calls.

    /// The backend's name for logs and the CLI: always `cuda`.
    public let name = "cuda"
    /// The layer this backend was built for.
    public let layer: MoELayer
    /// The device-resident operator this backend runs.
    public let core: FusedOperator
    /// The kernel's compile-time constants.
    public var specialization: FusedSpecialization { core.specialization }
    /// The options the operator was built with.
    public var options: FusedOptions { core.options }
    /// The device the operator runs on.
    public var device: CUDADevice { core.device }
    /// The compiled kernel (cubin, resources, whether it came from the cache, compile time).
    public var compiledKernel: CompiledKernel { core.compiledKernel }
    /// Blocks of the persistent grid (blocks per SM from the occupancy API × SMs).
    public var gridBlocks: Int { core.gridBlocks }
    /// Dynamic shared memory per block.
    public var dynamicSharedBytes: Int { core.dynamicSharedBytes }
    /// Device bytes held by the weights.
    public var weightBytes: Int { core.weightBytes }
    /// Device bytes of the workspace currently allocated.
    public var workspaceBytes: Int { core.workspaceBytes }
    /// The most tokens one forward may pass, when fixed at creation (nil: the workspace grows on demand).
    public var maxTokens: Int? { core.maxTokens }

    /// Builds the operator for `layer` on the device `options.deviceOrdinal`: compiles (or loads from the cubin
    /// cache) the kernel specialised for the layer, uploads and packs the weights once, sizes the persistent grid.
    ///
    /// - Parameter maxTokens: the most tokens one forward may pass; the workspace is allocated for it now, and a
    ///   forward never allocates. nil sizes it on the first forward and regrows it for a larger one.
    /// Throws `MoEError` for shapes the kernel does not support, `CUDAError` when the driver, NVRTC or the device
    /// fails (no GPU, no NVRTC, out of memory, a compile error with its log).
    public init(layer: MoELayer, options: FusedOptions = FusedOptions(), maxTokens: Int? = nil) throws {
        // The non-finite rules of docs/nonfinite.md: a NaN or infinite selection bias is refused, as on the CPU.
        _ = try Router.checkedBias(layer.weights.selectionBias?.floats(), config: layer.config)
        self.layer = layer
        core = try FusedOperator(layer: layer, options: options, maxTokens: maxTokens)
    }

    /// Enqueues one forward over device memory on the caller's stream (`FusedOperator.forward(_:)`).
    public func forward(_ call: DeviceForward) throws { try core.forward(call) }

    /// Throws a kernel error an earlier launch recorded (`FusedOperator.checkErrors()`), without synchronising.
    public func checkErrors() throws { try core.checkErrors() }

    /// Runs the layer on `input` [S, H] (rounded to the layer's storage type): the device forward on the workspace,
    /// then a synchronisation and the read-back.
    public func forward(_ input: HostTensor) throws -> MoEOutput {
        try layer.checkInput(input)
        let s = input.shape[0], h = layer.config.hiddenSize
        if s == 0 {
            try core.checkErrors()
            return .noTokens(layer.config)
        }
        return try core.state.withLock { st in
            let (ws, arena) = try core.prepare(&st, tokens: s)
            try upload(input, to: arena, ws)
            if options.poisonOutput { try FusedIO.poison(arena, offset: ws.offset(.y), floats: s * h, device: device) }
            try core.forward(workspaceCall(ws, arena, tokens: s, x: arena.address + UInt64(ws.offset(.x))), &st)
            try device.synchronize()
            try core.takeMirroredError(&st)
            return try readOutput(arena, ws, tokens: s)
        }
    }

    /// Times `iterations` launches with CUDA events around each one, after `warmup` untimed launches. Two input
    /// sets (the input and its rows reversed) alternate so the input is not served from L2 by the previous run.
    public func benchmark(input: HostTensor, warmup: Int, iterations: Int) throws -> BenchmarkResult {
        try layer.checkInput(input)
        let s = input.shape[0]
        guard s > 0 else { return BenchmarkResult(samples: [], method: "no tokens", workspaceBytes: 0) }
        return try core.state.withLock { st in
            let (ws, arena) = try core.prepare(&st, tokens: s)
            try upload(input, to: arena, ws)
            let second = try FusedIO.upload(FusedIO.reversedRows(input, as: layer.config.precision.storage), device: device)
            let inputs = [arena.address + UInt64(ws.offset(.x)), second.address]
            let samples = try FusedIO.time(device: device, warmup: warmup, iterations: iterations) { i in
                try core.forward(workspaceCall(ws, arena, tokens: s, x: inputs[i % 2]), &st)
            }
            try device.synchronize()
            try core.takeMirroredError(&st)
            return BenchmarkResult(
                samples: samples,
                method: "CUDA events around each cooperative launch (\(gridBlocks) blocks × "
                    + "\(core.kernel(forTokens: s).blockThreads) threads, "
                    + "\(formatByteCount(core.kernel(forTokens: s).dynamicSharedBytes)) shared memory each)",
                workspaceBytes: ws.byteCount)
        }
    }

    // MARK: - Host-array plumbing

    /// A device forward whose output and routing stay in the workspace (FP32 y), on the legacy default stream. The
    /// host-array path of a test build faults every call, as `FusedOptions.injectFault` documents.
    private func workspaceCall(_ ws: FusedWorkspace, _ arena: DeviceBuffer<UInt8>, tokens s: Int, x: CUdeviceptr)
        -> DeviceForward
    {
        DeviceForward(
            input: x, output: arena.address + UInt64(ws.offset(.y)), tokens: s, stream: nil, outputType: .float32,
            injectFault: options.injectFault)
    }

    private func upload(_ input: HostTensor, to arena: DeviceBuffer<UInt8>, _ ws: FusedWorkspace) throws {
        let x = input.converted(to: layer.config.precision.storage)
        try x.withUnsafeBytes { try arena.upload($0, at: ws.offset(.x)) }
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
