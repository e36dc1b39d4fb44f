import CCUDA
import Synchronization

/// Expert parallelism inside the one persistent kernel: the layer's experts are spread over R ranks, each rank
/// has its own tokens, and the kernel moves tokens to their experts' owners and results back by itself.
///
/// The ranks run in one launch per entry of the launch plan: all of them in one cooperative launch on one GPU, one
/// launch per GPU with peer-mapped memory (`devices: [0, 1, …]`; GPUs that cannot reach each other with native
/// atomics are refused with a `PeerAccessError`), or several launches side by side on one GPU (`[0, 0]`), which
/// runs the per-GPU path there (CUDA does not promise that launches sharing a GPU run at once; every device wait is
/// bounded, so launches that are not co-resident end in a typed timeout, never a hang). Each rank routes its tokens, the ranks all-gather their per-expert counts
/// (capacity drops follow the global token order, exactly the oracle's rule), each source stores its routed rows
/// straight into the owner's receive buffer and, after its last row for an expert, publishes one 8-byte flag
/// (epoch, rows) in the owner's memory; an owner starts a row block's GEMMs as soon as the sources in that block
/// have flagged; results go straight back into the source's return buffer and the source combines its tokens in
/// top-k rank order. With the same global tokens the outputs are bitwise those of one rank.
public final class DistributedMoE: @unchecked Sendable {
    // @unchecked: immutable handles plus `state`, a Mutex.

    /// The layer (all experts; each rank uploads its share).
    public let layer: MoELayer
    /// Where each expert lives.
    public let placement: ExpertPlacement
    /// Which launch (GPU) runs which ranks.
    public let plan: RankLaunchPlan
    /// The operator's options (`deviceOrdinal` is the GPU when no device list is given).
    public let options: FusedOptions
    /// Blocks of each rank in its launch.
    public let blocksPerRank: Int
    /// The GPU of the first launch (it holds the shared error record).
    public var device: CUDADevice { launches[0].kernel.device }

    /// One kernel launch: its GPU, kernel, stream and the control words of its ranks.
    private struct Launch {
        let kernel: FusedKernel
        let ranks: Range<Int>
        /// Blocking (legacy-synchronising) stream: uploads and memsets on the default stream stay ordered with the
        /// launch, while launches sharing a GPU run side by side.
        let stream: CUDAStream
        /// Per rank a 256-byte `Sync`, then 256 bytes for the error record (used on launch 0 only).
        let control: DeviceBuffer<UInt8>
        /// Alone on its GPU: a cooperative launch guarantees co-residency. Sharing a GPU: plain launches whose grids
        /// fit on it together.
        let cooperative: Bool
        let start: CUDAEvent
        let stop: CUDAEvent
        /// The kernel's `Params` of this launch's ranks, then the `Peer` table (a copy on every GPU).
        let table: DeviceBuffer<UInt8>
        let peers: DeviceBuffer<UInt8>
        func syncAddress(rank r: Int) -> UInt64 { control.address + UInt64(256 * (r - ranks.lowerBound)) }
        var errorRecordAddress: UInt64 { control.address + UInt64(256 * ranks.count) }
    }

    private let specialization: FusedSpecialization
    private let launches: [Launch]
    /// Per rank, its experts' weights on its launch's GPU.
    private let weights: [FusedDeviceWeights]

    private struct State {
        var tokens: [Int] = []
        var workspaces: [FusedWorkspace] = []
        var arenas: [DeviceBuffer<UInt8>] = []
        /// Forwards queued since the last reset: the host mirror of every rank's device epoch (`done_epoch`; the
        /// launches carry none), exact because this type queues every launch itself. It decides the wrap.
        var epoch: UInt64 = 0
    }
    private let state = Mutex(State())

    /// - Parameters:
    ///   - ranks: R; the experts are placed in contiguous blocks.
    ///   - devices: the GPU of each launch (nil: one launch on `options.deviceOrdinal`); see `RankLaunchPlan`.
    ///   - options: as for `FusedMoE` (`injectFault`: from the second call on, the last rank never flags its rows
    ///     for expert 0).
    public init(layer: MoELayer, ranks: Int, devices: [Int]? = nil, options: FusedOptions = FusedOptions()) throws {
        _ = try Router.checkedBias(layer.weights.selectionBias?.floats(), config: layer.config)  // docs/nonfinite.md
        try FusedMemoryCheck.check(layer: layer, options: options, ranks: ranks, devices: devices)
        self.layer = layer
        self.options = options
        placement = try ExpertPlacement(experts: layer.config.experts, ranks: ranks)
        let p = try RankLaunchPlan(ranks: ranks, devices: devices ?? [options.deviceOrdinal])
        plan = p
        let target = try FusedDeviceTarget(ordinals: p.devices)
        let spec = try FusedSpecialization(
            config: layer.config, arch: target.arch, sharedMemoryPerBlock: target.sharedMemoryPerBlock,
            stages: options.stages, ranks: ranks, injectFault: options.injectFault ? 2 : 0,
            phaseTimes: options.recordPhaseTimes, returnStorage: options.storageReturns,
            tmaEngine: false)  // fmoe_forward_ranks: never FMOE_TMA
        specialization = spec
        let kernels = try p.devices.map {
            try FusedKernel(specialization: spec, entry: FusedSpecialization.ranksKernelName, deviceOrdinal: $0)
        }
        // Ranks on different GPUs store into each other's buffers and count with system-scope atomics.
        try PeerAccess.connect(kernels.map(\.device))
        // Launches that share a GPU share its SMs: every rank gets the same block count, so the gate's split and
        // the work per rank do not depend on where a rank runs.
        var perRank = Int.max
        for (l, k) in kernels.enumerated() { perRank = min(perRank, k.gridLimit / p.ranks(onDevice: p.devices[l])) }
        guard perRank >= 1 else {
            throw MoEError(.unsupported, "\(ranks) ranks need \(ranks) co-resident blocks; a GPU of the plan holds fewer")
        }
        blocksPerRank = perRank
        let place = placement
        launches = try kernels.enumerated().map { l, k in
            let mine = p.ranks(of: l)
            let control = try DeviceBuffer<UInt8>(device: k.device, count: 256 * mine.count + 256)
            try control.fill(byte: 0)
            return Launch(
                kernel: k, ranks: mine, stream: try CUDAStream(device: k.device, nonBlocking: false), control: control,
                cooperative: !p.sharesDevice(l), start: try CUDAEvent(device: k.device), stop: try CUDAEvent(device: k.device),
                table: try DeviceBuffer<UInt8>(device: k.device, count: FusedParams.byteCount * mine.count),
                peers: try DeviceBuffer<UInt8>(device: k.device, count: FusedParams.peerByteCount * ranks))
        }
        let ls = launches
        weights = try (0..<ranks).map { r in
            let k = ls[p.launch(of: r)].kernel
            return try FusedDeviceWeights(layer: layer, experts: place.experts(of: r), device: k.device, packRows: k.packRows)
        }
    }

    /// The gate's K split for `tokens` global tokens (pass it to a single-rank `FusedMoE` for a bitwise comparison).
    public func gateSplit(totalTokens: Int) -> Int {
        options.gateSplit ?? launches[0].kernel.gateSplit(tokens: totalTokens, blocks: blocksPerRank * placement.ranks)
    }

    /// One forward on every rank: `inputs[r]` is rank r's tokens [S_r, H] (S_r may be 0). Returns each rank's
    /// output and routing; a pair's slot is its global slot in its expert (over all ranks' tokens in rank order).
    public func forward(_ inputs: [HostTensor]) throws -> [MoEOutput] {
        try check(inputs)
        // No token on any rank: nothing to route, so no launch (the kernel's scan is published by the block that
        // routes the last token tile, and there is none; a launch would wait out its budget).
        if inputs.allSatisfy({ $0.shape[0] == 0 }) {
            return inputs.map { _ in .noTokens(layer.config) }
        }
        return try state.withLock { st in
            try prepare(&st, inputs)
            try launchAll(&st)
            try synchronizeAll()
            try checkError(&st)
            return try (0..<placement.ranks).map { try readOutput(st, rank: $0) }
        }
    }

    /// Times `iterations` forwards (after `warmup`) on the same inputs: CUDA events around each launch on its own
    /// stream; a sample is the slowest launch's interval (the launches start within microseconds of each other).
    public func benchmark(inputs: [HostTensor], warmup: Int, iterations: Int) throws -> BenchmarkResult {
        try check(inputs)
        return try state.withLock { st in
            try prepare(&st, inputs)
            for _ in 0..<max(warmup, 0) {
                try launchAll(&st)
                try synchronizeAll()
            }
            var samples: [Double] = []
            for _ in 0..<max(iterations, 1) {
                try launchAll(&st, timed: true)
                var slowest = 0.0
                for l in launches {
                    try l.stop.synchronize()
                    slowest = max(slowest, try l.stop.elapsedMilliseconds(since: l.start))
                }
                samples.append(slowest)
            }
            try checkError(&st)
            let how = plan.launches == 1
                ? "one cooperative launch (\(placement.ranks) ranks × \(blocksPerRank) blocks)"
                : "\(plan.launches) launches on GPUs \(plan.devices) (\(blocksPerRank) blocks per rank), the slowest one"
            return BenchmarkResult(
                samples: samples, method: "CUDA events around \(how)",
                workspaceBytes: st.workspaces.reduce(0) { $0 + $1.byteCount })
        }
    }

    /// The bytes each rank moved in a forward with these routings (from `forward`'s outputs).
    public func traffic(of outputs: [MoEOutput]) -> [RankTraffic] {
        let c = layer.config
        // A dispatched row: x in the storage type, or (fp8) one token's E4M3 codes and scales as the workspace holds them.
        let rowBytes = c.precision == .fp8
            ? [.xq, .xqScale].reduce(0) { $0 + FusedWorkspace.fp8Bytes($1, config: c, tokens: 1, rows: 0) }
            : c.hiddenSize * c.precision.storage.byteSize
        return outputs.enumerated().map { r, out in
            var remote = 0
            for (e, slot) in zip(out.routing.expertIDs, out.routing.slots) where e >= 0 && slot >= 0 {
                if placement.owner(of: Int(e)) != r { remote += 1 }
            }
            let remoteExperts = c.experts - placement.experts(of: r).count
            let gather = (placement.ranks - 1) * (c.experts * 4 + 8)
            return RankTraffic(
                rank: r, remoteRows: remote, dispatchBytes: remote * rowBytes,
                returnBytes: remote * c.hiddenSize * specialization.returnElementBytes,
                signalBytes: remoteExperts * 8 + gather + remote * 4)
        }
    }

    /// Where the last launch spent its time, per rank (needs `FusedOptions.recordPhaseTimes`): microseconds since
    /// the earliest start among the ranks on the same GPU (%globaltimer, one clock per GPU).
    public func phaseTimes() throws -> [RankPhaseTimes] {
        guard options.recordPhaseTimes else {
            throw MoEError(.invalidConfig, "phase times need an operator built with FusedOptions(recordPhaseTimes: true)")
        }
        return try state.withLock { _ in
            try synchronizeAll()
            var stamps: [[UInt64]] = []
            for l in launches {
                for r in l.ranks {
                    // Sync: a u64 barrier word, then stamps[16].
                    stamps.append(try FusedIO.read(l.control, 256 * (r - l.ranks.lowerBound) + 8, count: 16))
                }
            }
            return (0..<placement.ranks).map { r in
                let gpu = plan.devices[plan.launch(of: r)]
                let peers = (0..<placement.ranks).filter { plan.devices[plan.launch(of: $0)] == gpu }
                let t0 = peers.map { stamps[$0][0] }.min() ?? 0
                func us(_ i: Int) -> Double { stamps[r][i] >= t0 ? Double(stamps[r][i] - t0) / 1000 : .nan }
                return RankPhaseTimes(
                    rank: r, start: us(0), gateDone: us(1), countsSent: us(7), countsIn: us(10), dispatchDone: us(11),
                    firstExpertTask: us(12), end: us(13))
            }
        }
    }

    // MARK: - Machinery

    private func check(_ inputs: [HostTensor]) throws {
        guard inputs.count == placement.ranks else {
            throw MoEError(.invalidInput, "give one input per rank: \(placement.ranks) ranks, \(inputs.count) inputs")
        }
        for x in inputs { try layer.checkInput(x) }
        try Self.checkPairs(tokens: inputs.map { $0.shape[0] }, topK: layer.config.topK, ranks: placement.ranks)
    }

    /// The (token, k) pairs one rank may hold: a received row's origin packs the source rank above the source's
    /// pair index in a non-negative 32-bit int (`PAIR_BITS` in moe.cu), the rank taking the bits R − 1 needs.
    public static func pairLimit(ranks: Int) -> Int {
        var rankBits = 0
        while (1 << rankBits) < ranks { rankBits += 1 }
        return 1 << (31 - rankBits)
    }

    /// Refuses token counts whose pairs a rank cannot address (`pairLimit`), naming the rank.
    static func checkPairs(tokens: [Int], topK: Int, ranks: Int) throws {
        let limit = pairLimit(ranks: ranks)
        for (r, s) in tokens.enumerated() where s.multipliedReportingOverflow(by: topK).partialValue >= limit
            || s.multipliedReportingOverflow(by: topK).overflow
        {
            throw MoEError(
                .unsupported,
                "rank \(r) has \(s) tokens × top-k \(topK) pairs; with \(ranks) ranks a rank addresses fewer than "
                    + "\(limit) pairs: spread the tokens over the ranks or split the call")
        }
    }

    private func device(ofRank r: Int) -> CUDADevice { launches[plan.launch(of: r)].kernel.device }

    private func synchronizeAll() throws {
        for l in launches { try l.stream.synchronize() }
    }

    /// Sizes the arenas (regrown for more tokens), writes every launch's parameter table and uploads the inputs.
    private func prepare(_ st: inout State, _ inputs: [HostTensor]) throws {
        try synchronizeAll()
        let c = layer.config
        let tokens = inputs.map { $0.shape[0] }
        let total = tokens.reduce(0, +)
        var grew = st.workspaces.count != placement.ranks
        for r in 0..<placement.ranks where !grew {
            grew = st.workspaces[r].maxTokens < tokens[r]
                || st.workspaces[r].rowCapacity < total * min(c.topK, placement.experts(of: r).count)
        }
        if grew {
            st.arenas = []
            st.workspaces = (0..<placement.ranks).map { r in
                RankParts.workspace(
                    specialization, placement: placement, rank: r, tokens: tokens[r], totalTokens: total,
                    blocksPerRank: blocksPerRank, fixedSplit: options.gateSplit != nil)
            }
            try FusedMemoryCheck.checkArenas(st.workspaces, on: (0..<placement.ranks).map(device(ofRank:)), tokens: total)
            st.arenas = try (0..<placement.ranks).map { r in
                let a = try DeviceBuffer<UInt8>(device: device(ofRank: r), count: st.workspaces[r].byteCount)
                try a.fill(byte: 0)
                return a
            }
            // Every rank's exchange buffers, as the kernel's Peer table (the same addresses on every GPU: UVA).
            var peerBytes: [UInt8] = []
            for r in 0..<placement.ranks {
                peerBytes += RankParts.peerEntry(
                    base: st.arenas[r].address, offsets: RankParts.peerOffsets(st.workspaces[r]),
                    sync: launches[plan.launch(of: r)].syncAddress(rank: r))
            }
            for l in launches {
                try l.peers.upload(peerBytes)
                try l.control.fill(byte: 0)
            }
            st.epoch = 0
        }
        try writeTables(st, tokens: tokens)
        for (r, x) in inputs.enumerated() where tokens[r] > 0 {
            let converted = x.converted(to: c.precision.storage)
            try converted.withUnsafeBytes { try st.arenas[r].upload($0, at: st.workspaces[r].offset(.x)) }
            if options.poisonOutput {
                try FusedIO.poison(st.arenas[r], offset: st.workspaces[r].offset(.y), floats: tokens[r] * c.hiddenSize,
                                   device: device(ofRank: r))
            }
        }
        st.tokens = tokens
    }

    /// Each launch's `Params` table for these token counts. The kernel reads the epoch from the device, so the
    /// tables stay valid for every launch until the token counts change.
    private func writeTables(_ st: State, tokens: [Int]) throws {
        let c = layer.config
        let total = tokens.reduce(0, +)
        let capacity = RankParts.capacity(c, totalTokens: total)
        let split = gateSplit(totalTokens: total)
        for r in 0..<placement.ranks where !st.workspaces[r].holdsGateSplit(split, tokens: tokens[r]) {
            throw MoEError(
                .unsupported,
                "gate split \(split) over rank \(r)'s \(tokens[r]) tokens needs more partial-logit rows than its "
                    + "workspace holds: use a smaller FusedOptions.gateSplit")
        }
        let errorRecord = launches[0].errorRecordAddress
        for l in launches {
            var bytes: [UInt8] = []
            for r in l.ranks {
                bytes += RankParts.params(
                    workspace: st.workspaces[r], base: st.arenas[r].address, weights: weights[r],
                    sync: l.syncAddress(rank: r), errorRecord: errorRecord, peers: l.peers.address, tokens: tokens[r],
                    capacity: capacity, rank: r, gateSplit: split, budget: options.waitBudget,
                    injectFault: options.injectFault, epochWrap: options.epochWrap)
            }
            try l.table.upload(bytes)
        }
    }

    /// Queues one forward: every launch with the next epoch. No host round trip between launches: a rank waits
    /// on the device for its peers to finish the previous epoch before it writes into them.
    private func launchAll(_ st: inout State, timed: Bool = false) throws {
        if st.epoch >= options.epochWrap {
            // The flags hold a 32-bit epoch: restart from zeroed counters and flags rather than overflow it (the
            // zeroed control blocks reset every rank's device epoch, done_epoch, to 0 with the mirror).
            try synchronizeAll()
            for l in launches { try l.control.fill(byte: 0) }
            for (ws, arena) in zip(st.workspaces, st.arenas) { try ws.clearState(of: arena) }
            st.epoch = 0
        }
        st.epoch += 1
        for l in launches {
            if timed { try l.start.record(on: l.stream) }
            try RankParts.launch(
                l.kernel, table: l.table.address, ranks: l.ranks.count, blocksPerRank: blocksPerRank,
                cooperative: l.cooperative, stream: l.stream)
            if timed { try l.stop.record(on: l.stream) }
        }
    }

    private func checkError(_ st: inout State) throws {
        let first = launches[0]
        guard let error = try FusedIO.takeError(
            control: first.control, offset: 256 * first.ranks.count, arenas: st.arenas)
        else { return }
        for l in launches.dropFirst() { try l.control.fill(byte: 0) }
        st.epoch = 0
        throw DistributedError(kernel: error, placement: placement)
    }

    private func readOutput(_ st: State, rank r: Int) throws -> MoEOutput {
        try RankParts.readOutput(
            layer.config, arena: st.arenas[r], workspace: st.workspaces[r], tokens: st.tokens[r],
            singleRank: placement.ranks == 1)
    }
}

/// One rank's phase boundaries in a launch, in microseconds since the earliest rank start on its GPU.
public struct RankPhaseTimes: Sendable, Hashable {
    /// The rank.
    public let rank: Int
    /// Its block 0 started.
    public let start: Double
    /// Its block 0 ran out of gate tasks.
    public let gateDone: Double
    /// Its routing scan was done and its counts sent to every rank (after the peers' previous launch ended).
    public let countsSent: Double
    /// Every rank's counts were in (block 0).
    public let countsIn: Double
    /// Block 0 finished dispatching its token tiles.
    public let dispatchDone: Double
    /// Its first GEMM0 task started: the rows of its first row block had all arrived.
    public let firstExpertTask: Double
    /// Its last block left (results combined, flags checked).
    public let end: Double
}

/// A rank gave up: a bounded wait expired (or a flag was wrong), naming the waiting rank, and for the rows
/// protocol the source rank, the expert and the epoch.
public struct DistributedError: Error, Sendable, CustomStringConvertible {
    /// The kernel's record.
    public let kernel: FusedKernelError
    let placement: ExpertPlacement

    /// The rank whose wait expired.
    public var waitingRank: Int { kernel.rank }
    /// For a wait on a (source, expert) row flag: the source rank that did not flag, and the expert.
    public var missingSource: (rank: Int, expert: Int)? {
        guard kernel.phase == .dispatch else { return nil }
        let e = placement.experts
        return (kernel.index / e, kernel.index % e)
    }
    /// The launch epoch the waiting rank was in (row-flag waits).
    public var epoch: UInt64 { kernel.expected >> 32 }
    /// `FMOE_ERR_EPOCH_LIMIT` in sync.cuh: a launch past `FusedOptions.epochWrap` that the host never saw (a
    /// CUDA graph replayed that often) refused to run on every rank.
    public static let epochLimitCode: UInt32 = 5
    /// Whether this is the epoch limit rather than a fault.
    public var epochLimit: Bool { kernel.code == Self.epochLimitCode }

    /// Which rank gave up and on what: the epoch limit, a wrong row flag or an expired row wait (with the source
    /// rank, expert and epoch), else the kernel's own record.
    public var description: String {
        if epochLimit {
            return "rank \(waitingRank) refused launch epoch \(kernel.seen): the flags' 32-bit epoch allows "
                + "\(kernel.expected) launches between host wraps, and graph replays the host never saw reached it; "
                + "create the group again (eager forwards wrap by themselves)"
        }
        if let m = missingSource {
            let (wantRows, seenEpoch, seenRows) = (kernel.expected & 0xFFFF_FFFF, kernel.seen >> 32, kernel.seen & 0xFFFF_FFFF)
            if kernel.code == FusedKernelError.badFlagCode {
                return "rank \(waitingRank) received rank \(m.rank)'s flag for expert \(m.expert) in epoch \(epoch) "
                    + "with \(seenRows) rows where \(wantRows) were announced: a protocol bug"
            }
            return "rank \(waitingRank) gave up waiting for rank \(m.rank)'s rows for expert \(m.expert) in epoch "
                + "\(epoch) (expected \(wantRows) rows; the flag still held epoch \(seenEpoch) with \(seenRows) rows); "
                + "the GPU was not left hanging"
        }
        return "rank \(waitingRank): \(kernel)"
    }
}
