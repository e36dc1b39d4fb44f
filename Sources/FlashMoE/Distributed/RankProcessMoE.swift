import CCUDA
import Synchronization

/// One rank of an expert-parallel layer whose ranks run in separate processes on one node, one process per GPU
/// (or several processes sharing a GPU, whose contexts then time-slice): the way torchrun, vLLM or Megatron run.
///
/// Each process owns its rank: its GPU, its experts' weights, its receive and return buffers, flags and counters.
/// `create` meets the other ranks through a `Rendezvous`, checks that every rank has the same layer, driver, node
/// and token limit (`RankGroupCheck`), allocates this rank's buffers for `maxTokens` tokens per rank, and maps
/// every peer's with CUDA IPC (`IPCPeerTable`); any mismatch or mapping failure is a typed error on every rank
/// before any launch. `forward` then launches this rank's share of the same kernel `DistributedMoE` runs (one rank
/// per launch, the peer table built from the mapped addresses); ranks meet on the device through the epoch-tagged
/// flags, so every process calls `forward` once per step with its own tokens. With the same global tokens the
/// outputs are bitwise those of a single-rank `FusedMoE` given `gateSplit(totalTokens:)`.
///
/// The transport (`RankTransport`) says how peers' buffers are reached: CUDA IPC (one node), or NVSHMEM's symmetric
/// heap (`NVSHMEMPeerTable`: mapped peers keep the plain stores, others get NVSHMEM puts and atomics from the
/// kernel built by `NVSHMEMKernelBuilder`).
///
/// After a kernel error (a peer died or stopped calling), this rank is unusable: the shared error record and the
/// flags are mid-protocol on every rank, so the group must be created again.
public final class RankProcessMoE: @unchecked Sendable {
    // @unchecked: immutable handles plus `state`, a Mutex.

    /// The layer's configuration.
    public let config: MoEConfig
    /// The layer, for a group made from host weights (all experts are described; this rank uploads its own); nil
    /// for one made from device weights.
    public let layer: MoELayer?
    /// How this process meets the others (a `Rendezvous`, or a framework's all-gather).
    public let rendezvous: any RankExchange
    /// Where each expert lives.
    public let placement: ExpertPlacement
    /// The operator's options (`deviceOrdinal` is this rank's GPU).
    public let options: FusedOptions
    /// The most tokens any rank may pass to one call.
    public let maxTokens: Int
    /// Blocks of this rank's launch (the smallest cooperative grid among the ranks, so all ranks split alike).
    public let blocksPerRank: Int
    /// How peers' buffers are reached.
    public let transport: RankTransport
    /// This rank.
    public var rank: Int { rendezvous.rank }
    /// The GPU of this rank.
    public var device: CUDADevice { kernel.device }

    /// Device bytes of this rank's weights (its experts, the router and the shared expert).
    public var weightBytes: Int { weights.byteCount }
    /// Device bytes of this rank's arena (workspace, receive and return buffers, control block).
    public var arenaBytes: Int { arena.byteCount }

    let specialization: FusedSpecialization
    let kernel: FusedKernel
    let stream: CUDAStream
    /// A non-blocking stream for reading the group's error record without waiting for the caller's work.
    let probe: CUDAStream
    let weights: FusedDeviceWeights
    let workspace: FusedWorkspace
    /// The workspace, then (at `controlOffset`) this rank's `Sync` (256 bytes) and 256 bytes of error record (the
    /// group's, on rank 0): one allocation, so a peer maps one handle.
    let arena: DeviceBuffer<UInt8>
    var controlOffset: Int { workspace.byteCount }
    var controlAddress: UInt64 { arena.address + UInt64(controlOffset) }
    let table: DeviceBuffer<UInt8>
    let peers: DeviceBuffer<UInt8>
    let memory: Memory

    /// Where the peers' buffers come from.
    enum Memory {
        /// CUDA IPC mappings.
        case ipc(IPCPeerTable)
        /// NVSHMEM: the library, the table, and the symmetric arena (freed at `close`).
        case nvshmem(NVSHMEMLibrary, NVSHMEMPeerTable, UInt64)

        var errorRecordAddress: UInt64 {
            switch self {
            case .ipc(let table): table.errorRecordAddress
            case .nvshmem(_, let table, _): table.errorRecordAddress
            }
        }
    }

    struct State {
        /// The token counts, and (device forwards) the caller's pointers, the table (host forwards) or `params`
        /// (device forwards) were last encoded for; host forwards leave `pointers` empty.
        var tokens: [Int] = []
        var pointers: [UInt64] = []
        /// The device forward's `Params`, passed by value in each launch.
        var params: [UInt8] = []
        /// Launches this object queued since the group was created or last wrapped: a host mirror of the device's
        /// epoch (this rank's `done_epoch`) as long as every launch went through `forward`. The launch itself
        /// needs no epoch (the kernel reads the device's); the mirror only decides when to wrap. Launches the host
        /// never sees (CUDA graph replays) leave it behind the device, and a capture leaves it ahead: the kernel
        /// refuses a launch past `epochWrap` (`DistributedError.epochLimit`), so neither can break the flags.
        var epoch: UInt64 = 0
        var failure: String?
        var closed = false
    }
    let state = Mutex(State())

    /// Where a rank's weights come from.
    public enum Weights {
        /// Host weights of every expert (this rank uploads its own).
        case host(MoELayer)
        /// Device weights on the rank's GPU, in a layout `WeightPointers` describes: the router (and selection bias,
        /// shared expert) whole; the per-expert tensors of every expert (`allExperts`) or of this rank's experts
        /// only. Copied into memory the rank owns at creation.
        case device(WeightPointers, allExperts: Bool)
    }

    /// Creates this process's rank of the group that `rendezvous` joined.
    ///
    /// - Parameters:
    ///   - maxTokens: the most tokens one call may pass on any rank (the receive buffers are sized for every rank
    ///     sending this many); the same on every rank.
    ///   - options: `deviceOrdinal` is this rank's GPU; `waitBudget` bounds every device wait (raise it when
    ///     processes share a GPU); `injectFault` builds the test kernel in which, from the second call on, the last
    ///     rank never flags its rows for expert 0.
    ///   - transport: `.ipc` (CUDA IPC, one node) or `.nvshmem` (NVSHMEM bootstrapped through `rendezvous`; one
    ///     NVSHMEM group per process, finalized by `close`).
    /// - Throws: `RendezvousError` (a rank out of range, duplicate, missing, another world size, layer, driver or
    ///   node, E < ranks), `PeerMappingError`, `MoEError`, `CUDAError`. When this rank fails before the others
    ///   know, it posts why, so they fail with its reason instead of waiting out the rendezvous timeout.
    public static func create(
        rendezvous: any RankExchange, layer: MoELayer, maxTokens: Int, options: FusedOptions = FusedOptions(),
        transport: RankTransport = .ipc
    ) throws -> RankProcessMoE {
        try create(rendezvous: rendezvous, config: layer.config, weights: .host(layer), maxTokens: maxTokens,
                   options: options, transport: transport)
    }

    /// Creates this process's rank from `weights` (host or device), as `create(rendezvous:layer:maxTokens:options:)`.
    /// With device weights the group check hashes the router as read from the device, and a rank without a usable
    /// driver makes every rank fail alike (`RendezvousError.noDriver`) after the config check.
    public static func create(
        rendezvous: any RankExchange, config: MoEConfig, weights: Weights, maxTokens: Int,
        options: FusedOptions = FusedOptions(), transport: RankTransport = .ipc
    ) throws -> RankProcessMoE {
        do {
            return try RankProcessMoE(
                rendezvous: rendezvous, config: config, weights: weights, maxTokens: maxTokens, options: options,
                transport: transport)
        } catch let error as RendezvousError {
            if case .aborted = error.kind {} else { rendezvous.abort(error.message) }
            throw error
        } catch {
            rendezvous.abort("rank \(rendezvous.rank) could not start: \(error)")
            throw error
        }
    }

    private init(
        rendezvous: any RankExchange, config: MoEConfig, weights source: Weights, maxTokens: Int, options: FusedOptions,
        transport: RankTransport
    ) throws {
        let world = rendezvous.worldSize, me = rendezvous.rank
        guard maxTokens >= 1 else { throw MoEError(.invalidConfig, "maxTokens must be at least 1 (got \(maxTokens))") }
        if case .host(let layer) = source {  // docs/nonfinite.md (device weights: checked as they are copied)
            _ = try Router.checkedBias(layer.weights.selectionBias?.floats(), config: config)
        }
        guard config.experts >= world else {
            throw RendezvousError(
                .invalidWorld,
                "\(world) ranks need at least \(world) experts to place, the layer has \(config.experts): "
                    + "use at most \(config.experts) ranks")
        }
        self.config = config
        if case .host(let layer) = source { self.layer = layer } else { layer = nil }
        self.rendezvous = rendezvous
        self.options = options
        self.maxTokens = maxTokens
        self.transport = transport
        let placement = try ExpertPlacement(experts: config.experts, ranks: world)
        self.placement = placement
        // Cheap checks first: a mismatched rank costs nobody a kernel compile.
        _ = try RankGroupCheck.local(config: config, weights: source, maxTokens: maxTokens, options: options)
            .exchange(rendezvous)

        let target = try FusedDeviceTarget(ordinals: [options.deviceOrdinal])
        let spec = try FusedSpecialization(
            config: config, arch: target.arch, sharedMemoryPerBlock: target.sharedMemoryPerBlock, stages: options.stages,
            ranks: world, injectFault: options.injectFault ? 2 : 0, phaseTimes: options.recordPhaseTimes,
            returnStorage: options.storageReturns, tmaEngine: false)  // fmoe_forward_ranks: never FMOE_TMA
        specialization = spec
        let shmem: NVSHMEMLibrary?
        let k: FusedKernel
        // A creation that fails after NVSHMEM's init finalizes it before the error leaves: a PE left initialized
        // crashed the process at exit (its proxy thread outlived the CUDA teardown). Every rank fails creation
        // alike (a rank that stops answering fails the others' next rendezvous step), so the collective finalize
        // meets its peers.
        var finalizeOnFailure: NVSHMEMLibrary?
        defer { finalizeOnFailure?.finalize() }
        switch transport {
        case .ipc:
            shmem = nil
            k = try FusedKernel(
                specialization: spec, entry: FusedSpecialization.ranksKernelName, deviceOrdinal: options.deviceOrdinal)
        case .nvshmem:
            guard !options.storageReturns else {
                throw MoEError(.unsupported, "the NVSHMEM transport returns FP32 rows only: drop storageReturns")
            }
            let (library, built) = try Self.nvshmemKernel(
                spec, rendezvous: rendezvous, driver: try CUDADriver.shared.get(), options: options)
            (shmem, k) = (library, built)
            finalizeOnFailure = library
        }
        kernel = k
        // Every rank sizes its grid to the smallest rank's, so the gate splits alike everywhere.
        let grids = try rendezvous.allGather("grid", int: k.gridLimit).map { $0 ?? 0 }
        blocksPerRank = grids.min() ?? 0
        guard blocksPerRank >= 1 else { throw MoEError(.unsupported, "a rank's GPU cannot hold one block of the kernel") }

        stream = try CUDAStream(device: k.device, nonBlocking: false)
        probe = try CUDAStream(device: k.device, nonBlocking: true)
        let mine = placement.experts(of: me)
        switch source {
        case .host(let layer):
            weights = try FusedDeviceWeights(layer: layer, experts: mine, device: k.device, packRows: k.packRows)
        case .device(let pointers, let all):
            weights = try FusedDeviceWeights(
                config: config, pointers: pointers, device: k.device, packRows: k.packRows, experts: mine,
                pointersStart: all ? 0 : mine.lowerBound)
        }
        workspace = RankParts.workspace(
            spec, placement: placement, rank: me, tokens: maxTokens, totalTokens: maxTokens * world,
            blocksPerRank: k.gridLimit, fixedSplit: options.gateSplit != nil)
        if let shmem {
            let (buffer, memory) = try Self.symmetricArena(
                shmem, rendezvous: rendezvous, device: k.device, workspace: workspace)
            arena = buffer
            self.memory = memory
        } else {
            arena = try DeviceBuffer<UInt8>(device: k.device, count: workspace.byteCount + 512)
            try arena.fill(byte: 0)
            try k.device.synchronize()  // zeroed before any peer can map and write into it
            memory = .ipc(try IPCPeerTable(
                rendezvous: rendezvous, device: k.device, arena: arena, controlOffset: workspace.byteCount,
                offsets: RankParts.peerOffsets(workspace)))
        }
        let peerBytes: [UInt8]
        switch memory {
        case .ipc(let t): peerBytes = t.peerTable
        case .nvshmem(_, let t, _): peerBytes = t.peerTable
        }
        table = try DeviceBuffer<UInt8>(device: k.device, count: FusedParams.byteCount)
        peers = try DeviceBuffer<UInt8>(device: k.device, count: FusedParams.peerByteCount * world)
        try peers.upload(peerBytes)
        // The last step of creation: a rank that failed after the mappings aborts here, so no rank leaves create
        // believing in a group another rank has left.
        try rendezvous.barrier("created")
        finalizeOnFailure = nil  // created: `close` finalizes
    }

    /// NVSHMEM: this rank's GPU current, the library bootstrapped through `rendezvous` (PE = rank), and the
    /// NVSHMEM build of the kernel loaded and initialised for the library (`nvshmemx_cumodule_init`).
    private static func nvshmemKernel(
        _ spec: FusedSpecialization, rendezvous: any RankExchange, driver: CUDADriver, options: FusedOptions
    ) throws -> (NVSHMEMLibrary, FusedKernel) {
        let device = try CUDADevice(ordinal: options.deviceOrdinal, driver: driver)
        try device.makeCurrent()
        let environment = ProcessEnvironment.current()
        let builder = try NVSHMEMKernelBuilder.fromEnvironment(environment)  // before the collective init
        let shmem = try NVSHMEMLibrary.load(environment: environment)
        try shmem.bootstrap(rendezvous)
        do {
            let kernel = try FusedKernel(
                specialization: spec, entry: FusedSpecialization.ranksKernelName, device: device,
                build: { s, arch in try builder.build(s, arch: arch, sources: KernelSources.current(environment: environment)) },
                prepare: { module in try shmem.initializeModule(module.handle) })
            return (shmem, kernel)
        } catch {
            shmem.finalize()  // on this thread, with this PE's context current (see init)
            throw error
        }
    }

    /// NVSHMEM: one symmetric arena of the largest size any rank needs (`nvshmem_malloc` is collective and the
    /// same on every PE), zeroed on every PE before any PE can write into another's, and the peer table.
    private static func symmetricArena(
        _ shmem: NVSHMEMLibrary, rendezvous: any RankExchange, device: CUDADevice, workspace: FusedWorkspace
    ) throws -> (DeviceBuffer<UInt8>, Memory) {
        let sizes = try rendezvous.allGather("nvshmem arena bytes", int: workspace.byteCount + 512).map { $0 ?? 0 }
        let bytes = sizes.max() ?? 0
        guard let symmetric = shmem.allocate(bytes: bytes) else {
            throw MoEError(
                .unsupported,
                "nvshmem_malloc(\(bytes) bytes) failed on rank \(rendezvous.rank): the symmetric heap is too small; "
                    + "set NVSHMEM_SYMMETRIC_SIZE above \(bytes) on every rank")
        }
        let arena = DeviceBuffer<UInt8>(device: device, borrowing: symmetric, count: bytes)
        try arena.fill(byte: 0)
        try device.synchronize()
        shmem.barrierAll()  // every PE's arena zeroed before any kernel writes into it
        let table = try NVSHMEMPeerTable(
            rendezvous: rendezvous, shmem: shmem, arena: symmetric, controlOffset: workspace.byteCount,
            offsets: RankParts.peerOffsets(workspace))
        return (arena, .nvshmem(shmem, table, symmetric))
    }

    /// The gate's K split for `totalTokens` global tokens (pass it to a single-rank `FusedMoE` for a bitwise
    /// comparison).
    public func gateSplit(totalTokens: Int) -> Int {
        options.gateSplit ?? kernel.gateSplit(tokens: totalTokens, blocks: blocksPerRank * placement.ranks)
    }

    /// One forward of this rank's tokens `x` [S_r, H] (S_r may be 0); every rank must call it once per step.
    ///
    /// - Parameter tokensPerRank: every rank's token count this step, when the caller knows them (the global
    ///   capacity and gate split depend on the total); nil all-gathers them through the rendezvous store (one
    ///   host round trip per call).
    /// - Returns: this rank's output and routing (slots are global, over all ranks' tokens in rank order).
    /// - Throws: `DistributedError` when a device wait expired (a peer died or stopped calling); the rank is then
    ///   unusable. `MoEError` for bad input, `RendezvousError` from the count all-gather.
    public func forward(_ x: HostTensor, tokensPerRank: [Int]? = nil) throws -> MoEOutput {
        guard x.shape.count == 2, x.shape[1] == config.hiddenSize else {
            throw MoEError(
                .shapeMismatch, "the input must have shape [tokens, \(config.hiddenSize)] (H of the layer), got \(x.shape)")
        }
        let s = x.shape[0]
        guard s <= maxTokens else {
            throw MoEError(.invalidInput, "rank \(rank) got \(s) tokens; this group was created for at most \(maxTokens)")
        }
        return try state.withLock { st in
            try checkUsable(st)
            let counts = try tokensPerRank ?? gatherCounts(s)
            try check(counts, own: s)
            // No token on any rank (every rank sees the same counts, so all skip alike): no launch, no epoch.
            if counts.allSatisfy({ $0 == 0 }) { return .noTokens(config) }
            let c = config
            if counts != st.tokens || !st.pointers.isEmpty {
                let total = counts.reduce(0, +)
                try table.upload(RankParts.params(
                    workspace: workspace, base: arena.address, weights: weights, sync: controlAddress,
                    errorRecord: memory.errorRecordAddress, peers: peers.address, tokens: s,
                    capacity: RankParts.capacity(c, totalTokens: total), rank: rank,
                    gateSplit: gateSplit(totalTokens: total), budget: options.waitBudget, epochWrap: options.epochWrap))
                st.tokens = counts
                st.pointers = []
            }
            if st.epoch >= options.epochWrap {  // before the upload: the wrap clears the arena past x
                try wrapEpoch()
                st.epoch = 0
            }
            if s > 0 {
                try x.converted(to: c.precision.storage).withUnsafeBytes { try arena.upload($0, at: workspace.offset(.x)) }
                if options.poisonOutput {
                    try FusedIO.poison(arena, offset: workspace.offset(.y), floats: s * c.hiddenSize, device: device)
                }
            }
            st.epoch += 1
            try RankParts.launch(
                kernel, table: table.address, ranks: 1, blocksPerRank: blocksPerRank, cooperative: true, stream: stream)
            try stream.synchronize()
            if let error = try readErrorRecord() {
                let failure = DistributedError(kernel: error, placement: placement)
                st.failure = "\(failure)"
                throw failure
            }
            // A group of one runs the one-GPU kernel, which reports rows rather than slots (as DistributedMoE).
            return try RankParts.readOutput(
                c, arena: arena, workspace: workspace, tokens: s, singleRank: placement.ranks == 1)
        }
    }

    /// Leaves the group: waits (within the rendezvous timeout) until every rank is idle, unmaps the peers, and
    /// waits until every rank has unmapped, so no rank frees memory another still maps (this rank's buffers are
    /// freed when the object goes away). After a failure it only unmaps and closes the store: the peers may be
    /// gone. A second call does nothing.
    public func close() throws {
        let (failed, closed) = state.withLock { st in
            defer { st.closed = true }
            return (st.failure != nil, st.closed)
        }
        guard !closed else { return }
        defer {
            if case .ipc(let table) = memory { table.unmap() }
            rendezvous.close()
        }
        guard !failed else { return }
        try device.synchronize()  // the caller's streams too (device forwards)
        // Every rank reads the same record (rank 0's): after a kernel error all of them skip the barriers.
        let clean: Bool
        do { clean = try readErrorRecord() == nil } catch { clean = false }
        guard clean else { return }
        try rendezvous.barrier("close: every rank idle")
        switch memory {
        case .ipc(let table):
            table.unmap()
            try rendezvous.barrier("close: every rank unmapped")
        case .nvshmem(let shmem, _, let symmetric):
            shmem.free(symmetric)  // collective, like the finalize
            shmem.finalize()
        }
    }

    // MARK: - Machinery

    func checkUsable(_ st: State) throws {
        if st.closed { throw MoEError(.invalidConfig, "rank \(rank) was closed") }
        if let failure = st.failure {
            throw MoEError(.invalidConfig, "rank \(rank) is unusable after an earlier failure (\(failure)): create the group again")
        }
    }

    func gatherCounts(_ s: Int) throws -> [Int] {
        try rendezvous.allGather("token counts", int: s).map { $0 ?? -1 }
    }

    func check(_ counts: [Int], own s: Int) throws {
        guard counts.count == placement.ranks else {
            throw MoEError(.invalidInput, "give one token count per rank: \(placement.ranks) ranks, \(counts.count) counts")
        }
        guard counts[rank] == s else {
            throw MoEError(.invalidInput, "tokensPerRank[\(rank)] is \(counts[rank]) but this rank's input has \(s) tokens")
        }
        if let (q, n) = counts.enumerated().first(where: { $0.element < 0 || $0.element > maxTokens }) {
            throw MoEError(.invalidInput, "rank \(q) has \(n) tokens; this group allows 0...\(maxTokens) per rank")
        }
        // The kernel's (rank, pair) packing, as for every ranks launch (issue 12, defect 5).
        try DistributedMoE.checkPairs(tokens: counts, topK: config.topK, ranks: placement.ranks)
    }

    /// The flags carry a 32-bit epoch: before it would overflow, every rank stops, zeroes its counters and flags
    /// and starts again from 1, with barriers on both sides so no peer writes into memory being cleared. The
    /// control block's zeroes include `done_epoch`, the device epoch the next launch starts from. (The device
    /// cannot do this for ranks: see `fmoe_forward_ranks` in moe.cu.)
    func wrapEpoch() throws {
        try stream.synchronize()
        try rendezvous.barrier("epoch wrap: all idle")
        try arena.fill(byte: 0, at: controlOffset, count: 512)
        try workspace.clearState(of: arena)
        try device.synchronize()
        try rendezvous.barrier("epoch wrap: all cleared")
    }

    /// The group's error record (rank 0's, mapped here), or nil when no rank reported an error.
    func readErrorRecord() throws -> FusedKernelError? {
        var bytes = [UInt8](repeating: 0, count: 40)
        try device.makeCurrent()
        let driver = device.driver, address = memory.errorRecordAddress
        // On the non-blocking probe stream: the read does not wait for launches still queued on other streams.
        let result = bytes.withUnsafeMutableBytes { driver.memcpyDtoH($0.baseAddress!, address, 40, probe.handle) }
        try driver.check(result, "cuMemcpyDtoHAsync_v2(error record of rank 0)")
        try probe.synchronize()
        return FusedKernelError.decode(bytes)
    }
}

extension RankProcessMoE {
    /// Whether two outputs have the same bits: y, expert ids, weights and slots (the ranks' contract with one rank).
    public static func sameBits(_ a: MoEOutput, _ b: MoEOutput) -> Bool { Verifier.sameBits(a, b) }

    /// Tokens `range` of `output` (a single-rank run over the global tokens), to compare with one rank's part.
    public static func rows(of output: MoEOutput, _ range: Range<Int>) throws -> MoEOutput {
        let (k, r) = (output.routing.topK, output.routing)
        let pairs = range.lowerBound * k..<range.upperBound * k
        return MoEOutput(
            output: try output.output.slice(range),
            routing: Routing(
                tokens: range.count, topK: k, expertIDs: Array(r.expertIDs[pairs]), weights: Array(r.weights[pairs]),
                slots: Array(r.slots[pairs]), expertLoad: r.expertLoad))
    }
}

/// How the ranks of a `RankProcessMoE` reach each other's buffers.
public enum RankTransport: String, Sendable, CaseIterable, CustomStringConvertible {
    /// CUDA IPC (`cuIpcGetMemHandle` / `cuIpcOpenMemHandle`): the ranks of one node.
    case ipc
    /// NVSHMEM's symmetric heap: plain stores where `nvshmem_ptr` maps a peer, NVSHMEM puts, signals and atomics
    /// where it does not (other nodes). Needs the NVSHMEM build of the kernel (`NVSHMEMKernelBuilder`).
    case nvshmem

    /// The raw value: `ipc` or `nvshmem`.
    public var description: String { rawValue }
}
