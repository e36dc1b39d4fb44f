import CCUDA

/// The pieces a rank's launch is made of, shared by `DistributedMoE` (every rank in one process) and
/// `RankProcessMoE` (one rank per process): its workspace, its entry of the kernel's `Peer` table, its `Params`,
/// the launch, and reading its output back.
enum RankParts {
    /// The workspace of rank `r` for `tokens` own tokens and `totalTokens` over all ranks.
    static func workspace(
        _ spec: FusedSpecialization, placement: ExpertPlacement, rank r: Int, tokens: Int, totalTokens: Int,
        blocksPerRank: Int, fixedSplit: Bool
    ) -> FusedWorkspace {
        rankWorkspace(
            spec: spec, tokens: max(tokens, 1), totalTokens: max(totalTokens, 1),
            localExperts: placement.experts(of: r).count, blocksPerRank: blocksPerRank, ranks: placement.ranks,
            fixedSplit: fixedSplit)
    }

    /// Rank r's workspace. The gate's split is chosen over all ranks' tokens and blocks (`gateSplit(totalTokens:)`),
    /// so the partial logits are sized over all ranks' blocks too: sizing them for one rank's blocks let a rank with
    /// more tokens than 128 per block of its own write past them (issue 12, defect 1).
    static func rankWorkspace(
        spec: FusedSpecialization, tokens: Int, totalTokens: Int, localExperts: Int, blocksPerRank: Int, ranks: Int,
        fixedSplit: Bool
    ) -> FusedWorkspace {
        FusedWorkspace(
            spec: spec, tokens: tokens, rowCapacity: totalTokens * min(spec.config.topK, localExperts),
            partRows: FusedWorkspace.partialLogitsRows(
                tokens: tokens, splitBlocks: blocksPerRank * ranks, fixedSplit: fixedSplit),
            ranks: ranks, localExperts: localExperts)
    }

    /// The arena regions a rank's peers access, in the order of the kernel's `Peer` struct (its `sync` follows).
    static let peerRegions: [FusedWorkspace.Region] = [
        .recv, .rowOrigin, .rowFlags, .allCounts, .countFlags, .ret, .pending, .target, .combineList,
    ]

    /// The byte offsets of `peerRegions` in `workspace`.
    static func peerOffsets(_ workspace: FusedWorkspace) -> [Int] { peerRegions.map(workspace.offset) }

    /// A rank's `Peer` entry: its arena at `base` (region offsets `offsets`), its `Sync` at `sync`.
    static func peerEntry(base: UInt64, offsets: [Int], sync: UInt64) -> [UInt8] {
        FusedParams.encodePeer(offsets.map { base + UInt64($0) } + [sync])
    }

    /// The kernel's `Peer` table: every rank's entry, in rank order (index = rank in each array).
    static func peerTable(arenaBases: [UInt64], offsets: [[Int]], controlBases: [UInt64]) -> [UInt8] {
        arenaBases.indices.flatMap { peerEntry(base: arenaBases[$0], offsets: offsets[$0], sync: controlBases[$0]) }
    }

    /// A rank's `Params`. The kernel reads the epoch from the rank's `Sync` (its `done_epoch`), so `Params` holds
    /// none; `epochWrap` (`FusedOptions.epochWrap`) is the last epoch a launch may run before the host wraps: past
    /// it the kernel refuses (`DistributedError.epochLimit`). `io`: the caller's device memory for x, y and the
    /// routing (a device forward); nil keeps them in the arena.
    static func params(
        workspace ws: FusedWorkspace, base: UInt64, weights: FusedDeviceWeights, sync: UInt64, errorRecord: UInt64,
        peers: UInt64, tokens: Int, capacity: Int, rank: Int, gateSplit: Int, budget: Duration, injectFault: Bool = false,
        epochWrap: UInt64, io: DeviceForward? = nil
    ) -> [UInt8] {
        let pointers = ws.pointers(
            base: base, x: io?.input ?? base + UInt64(ws.offset(.x)), weights: weights, control: sync,
            errorRecord: errorRecord, peers: peers, y: io?.output, ids: io?.topKIDs, routingWeights: io?.topKWeights)
        return FusedParams.encode(
            pointers: pointers,
            FusedParams.Scalars(
                tokens: tokens, capacity: capacity, rank: rank, gateSplit: gateSplit, rowBlocks: ws.rowBlocks,
                maxTokens: ws.maxTokens, partRows: ws.partRows, yStorage: io?.outputType == .storage,
                injectFault: injectFault, epoch: 0, budgetNanoseconds: FusedParams.nanoseconds(budget), epochWrap: epochWrap))
    }

    /// The per-expert capacity over `totalTokens` global tokens (Int32.max when dropless).
    static func capacity(_ c: MoEConfig, totalTokens: Int) -> Int {
        c.capacity.perExpert(tokens: totalTokens, experts: c.experts, topK: c.topK) ?? Int(Int32.max)
    }

    /// Queues `fmoe_forward_ranks` for the `ranks` ranks of `table`. No epoch: each rank's blocks read it from the
    /// device, so the launch is the same every time.
    static func launch(
        _ kernel: FusedKernel, table: UInt64, ranks: Int, blocksPerRank: Int, cooperative: Bool, stream: CUDAStream
    ) throws {
        let arguments = [KernelArgument.pointer(table), .int32(Int32(blocksPerRank)), unusedParams]
        let (grid, block) = (Dim3(blocksPerRank * ranks), Dim3(kernel.blockThreads))
        if cooperative {
            try kernel.function.launchCooperative(
                grid: grid, block: block, sharedBytes: kernel.dynamicSharedBytes, streamHandle: stream.handle,
                arguments: arguments, gridSizedByCaller: true)
        } else {
            try kernel.function.launch(
                grid: grid, block: block, sharedBytes: kernel.dynamicSharedBytes, stream: stream, arguments: arguments)
        }
    }

    /// Queues `fmoe_forward_ranks` for one rank whose `Params` (`params`, from `params(…)`) travel in the launch
    /// itself, as the single-GPU operator's do, on a raw `CUstream` (a framework's; nil: the legacy default
    /// stream); cooperative. Nothing is copied before the launch and no epoch is passed, so a CUDA graph that
    /// captures it replays the same launch correctly.
    static func launch(
        _ kernel: FusedKernel, params: [UInt8], blocksPerRank: Int, streamHandle: CUstream?
    ) throws {
        try kernel.function.launchCooperative(
            grid: Dim3(blocksPerRank), block: Dim3(kernel.blockThreads),
            sharedBytes: kernel.dynamicSharedBytes, streamHandle: streamHandle,
            arguments: [.pointer(0), .int32(Int32(blocksPerRank)), KernelArgument(rawBytes: params, alignment: 8)],
            gridSizedByCaller: true)
    }

    /// The by-value `Params` argument of a launch that reads its ranks from a table (the kernel ignores it).
    private static let unusedParams = KernelArgument(
        rawBytes: [UInt8](repeating: 0, count: FusedParams.byteCount), alignment: 8)

    /// Rank output of `tokens` tokens from its arena. `singleRank`: the one-rank path reports a pair's row, which
    /// becomes its slot here (with ranks the kernel reports the global slot itself).
    static func readOutput(
        _ c: MoEConfig, arena: DeviceBuffer<UInt8>, workspace ws: FusedWorkspace, tokens s: Int, singleRank: Bool
    ) throws -> MoEOutput {
        let (h, k, e) = (c.hiddenSize, c.topK, c.experts)
        guard s > 0 else { return .noTokens(c) }
        let y: [Float] = try FusedIO.read(arena, ws.offset(.y), count: s * h)
        let ids: [Int32] = try FusedIO.read(arena, ws.offset(.ids), count: s * k)
        let w: [Float] = try FusedIO.read(arena, ws.offset(.weights), count: s * k)
        var slots: [Int32] = try FusedIO.read(arena, ws.offset(.slotRow), count: s * k)
        let load: [Int32] = try FusedIO.read(arena, ws.offset(.expertLoad), count: e)
        if singleRank {
            let rowStart: [Int32] = try FusedIO.read(arena, ws.offset(.rowStart), count: e + 1)
            for i in slots.indices where slots[i] >= 0 && ids[i] >= 0 { slots[i] -= rowStart[Int(ids[i])] }
        }
        return MoEOutput(
            output: try HostTensor(shape: [s, h], float32: y),
            routing: Routing(tokens: s, topK: k, expertIDs: ids, weights: w, slots: slots, expertLoad: load.map(Int.init)))
    }
}
