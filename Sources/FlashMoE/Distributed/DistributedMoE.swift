import CCUDA
import Synchronization

/// Expert parallelism inside the one persistent kernel: the layer's experts are spread over R ranks, each rank
/// has its own tokens, and one launch moves tokens to their experts' owners and results back by itself.
///
/// Today the ranks share one GPU (all blocks of one cooperative launch, split into R groups): the protocol, the
/// buffers and the device code are those of R GPUs with peer-mapped memory, only the pointers are local. Each rank
/// routes its tokens, the ranks all-gather their per-expert counts (capacity drops follow the global token order,
/// exactly the oracle's rule), each source stores its routed rows straight into the owner's receive buffer and
/// advances the owner's (source, expert) counter; an owner starts a row block's GEMMs as soon as the sources in
/// that block have delivered; results go straight back into the source's return buffer and the source combines
/// its tokens in top-k rank order. With the same global tokens the outputs are bitwise those of one rank.
public final class DistributedMoE: @unchecked Sendable {
    // @unchecked: immutable handles plus `state`, a Mutex.

    /// The layer (all experts; each rank uploads its share).
    public let layer: MoELayer
    /// Where each expert lives.
    public let placement: ExpertPlacement
    public let options: FusedOptions
    /// Blocks of each rank in the launch.
    public let blocksPerRank: Int
    /// The device all ranks run on.
    public var device: CUDADevice { kernel.device }

    private let kernel: FusedKernel
    private let specialization: FusedSpecialization
    private let weights: [FusedDeviceWeights]
    /// Per rank a 256-byte `Sync`, then one shared error record.
    private let control: DeviceBuffer<UInt8>

    private struct State {
        var tokens: [Int] = []
        var workspaces: [FusedWorkspace] = []
        var arenas: [DeviceBuffer<UInt8>] = []
        var peers: DeviceBuffer<UInt8>?
        var table: DeviceBuffer<UInt8>?
        var epoch: UInt64 = 0
    }
    private let state = Mutex(State())

    /// - Parameters:
    ///   - ranks: R; the experts are placed in contiguous blocks.
    ///   - options: as for `FusedMoE` (`injectFault` makes the last rank never deliver its rows for expert 0).
    public init(layer: MoELayer, ranks: Int, options: FusedOptions = FusedOptions()) throws {
        self.layer = layer
        self.options = options
        placement = try ExpertPlacement(experts: layer.config.experts, ranks: ranks)
        specialization = try FusedSpecialization(
            config: layer.config, stages: options.stages, ranks: ranks, injectFault: options.injectFault ? 2 : 0)
        kernel = try FusedKernel(
            specialization: specialization, entry: FusedSpecialization.ranksKernelName,
            deviceOrdinal: options.deviceOrdinal)
        blocksPerRank = kernel.gridLimit / ranks
        guard blocksPerRank >= 1 else {
            throw MoEError(.unsupported, "\(ranks) ranks need \(ranks) co-resident blocks; the GPU holds \(kernel.gridLimit)")
        }
        let (place, k) = (placement, kernel)
        weights = try (0..<ranks).map { r in
            try FusedDeviceWeights(layer: layer, experts: place.experts(of: r), device: k.device, packRows: k.packRows)
        }
        control = try DeviceBuffer<UInt8>(device: kernel.device, count: 256 * ranks + 256)
        try control.fill(byte: 0)
    }

    /// The gate's K split for `tokens` global tokens (pass it to a single-rank `FusedMoE` for a bitwise comparison).
    public func gateSplit(totalTokens: Int) -> Int {
        options.gateSplit ?? kernel.gateSplit(tokens: totalTokens, blocks: blocksPerRank * placement.ranks)
    }

    /// One forward on every rank: `inputs[r]` is rank r's tokens [S_r, H] (S_r may be 0). Returns each rank's
    /// output and routing; a pair's slot is its global slot in its expert (over all ranks' tokens in rank order).
    public func forward(_ inputs: [HostTensor]) throws -> [MoEOutput] {
        try check(inputs)
        return try state.withLock { st in
            try prepare(&st, inputs)
            try launch(&st)
            try device.synchronize()
            try checkError(&st)
            return try (0..<placement.ranks).map { try readOutput(st, rank: $0) }
        }
    }

    /// Times `iterations` launches (CUDA events around each, after `warmup`) on the same inputs.
    public func benchmark(inputs: [HostTensor], warmup: Int, iterations: Int) throws -> BenchmarkResult {
        try check(inputs)
        return try state.withLock { st in
            try prepare(&st, inputs)
            let samples = try FusedIO.time(device: device, warmup: warmup, iterations: iterations) { _ in
                try launch(&st)
            }
            try checkError(&st)
            return BenchmarkResult(
                samples: samples,
                method: "CUDA events around each cooperative launch (\(placement.ranks) ranks × \(blocksPerRank) blocks)",
                workspaceBytes: st.workspaces.reduce(0) { $0 + $1.byteCount })
        }
    }

    /// The bytes each rank moved in a forward with these routings (from `forward`'s outputs).
    public func traffic(of outputs: [MoEOutput]) -> [RankTraffic] {
        let c = layer.config
        let element = c.precision.storage.byteSize
        return outputs.enumerated().map { r, out in
            var remote = 0
            for (e, slot) in zip(out.routing.expertIDs, out.routing.slots) where e >= 0 && slot >= 0 {
                if placement.owner(of: Int(e)) != r { remote += 1 }
            }
            let gather = (placement.ranks - 1) * (c.experts * 4 + 8)
            return RankTraffic(
                rank: r, remoteRows: remote, dispatchBytes: remote * c.hiddenSize * element,
                returnBytes: remote * c.hiddenSize * 4, signalBytes: remote * 8 + gather)
        }
    }

    // MARK: - Machinery

    private func check(_ inputs: [HostTensor]) throws {
        guard inputs.count == placement.ranks else {
            throw MoEError(.invalidInput, "give one input per rank: \(placement.ranks) ranks, \(inputs.count) inputs")
        }
        for x in inputs { try layer.checkInput(x) }
        let total = inputs.reduce(0) { $0 + $1.shape[0] }
        guard total * layer.config.topK < 1 << 24 else {
            throw MoEError(.unsupported, "the ranks' kernel addresses at most 2^24 (token, expert) pairs per rank")
        }
    }

    private func prepare(_ st: inout State, _ inputs: [HostTensor]) throws {
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
                FusedWorkspace(
                    spec: specialization, tokens: max(tokens[r], 1),
                    rowCapacity: max(total, 1) * min(c.topK, placement.experts(of: r).count),
                    gridBlocks: blocksPerRank, ranks: placement.ranks, localExperts: placement.experts(of: r).count)
            }
            st.arenas = try st.workspaces.map { ws in
                let a = try DeviceBuffer<UInt8>(device: device, count: ws.byteCount)
                try a.fill(byte: 0)
                return a
            }
            // Every rank's exchange buffers, as the kernel's Peer table.
            var peerBytes: [UInt8] = []
            for r in 0..<placement.ranks {
                let ws = st.workspaces[r], base = st.arenas[r].address
                func at(_ region: FusedWorkspace.Region) -> UInt64 { base + UInt64(ws.offset(region)) }
                peerBytes += FusedParams.encodePeer([
                    at(.recv), at(.rowOrigin), at(.rowsWritten), at(.allCounts), at(.countFlags), at(.ret),
                    at(.pending), at(.target), at(.combineList), control.address + UInt64(256 * r),
                ])
            }
            let peers = try DeviceBuffer<UInt8>(device: device, count: peerBytes.count)
            try peers.upload(peerBytes)
            st.peers = peers
            st.table = try DeviceBuffer<UInt8>(device: device, count: FusedParams.byteCount * placement.ranks)
            try control.fill(byte: 0)
            st.epoch = 0
        }
        for (r, x) in inputs.enumerated() where tokens[r] > 0 {
            let converted = x.converted(to: c.precision.storage)
            try converted.withUnsafeBytes { try st.arenas[r].upload($0, at: st.workspaces[r].offset(.x)) }
            if options.poisonOutput {
                try FusedIO.poison(st.arenas[r], offset: st.workspaces[r].offset(.y), floats: tokens[r] * c.hiddenSize,
                                   device: device)
            }
        }
        st.tokens = tokens
    }

    private func launch(_ st: inout State) throws {
        st.epoch += 1
        let c = layer.config
        let total = st.tokens.reduce(0, +)
        let capacity = c.capacity.perExpert(tokens: total, experts: c.experts, topK: c.topK) ?? Int(Int32.max)
        let split = gateSplit(totalTokens: total)
        guard let peers = st.peers, let table = st.table else { return }
        var bytes: [UInt8] = []
        for r in 0..<placement.ranks {
            let ws = st.workspaces[r], base = st.arenas[r].address
            let pointers = ws.pointers(
                base: base, x: base + UInt64(ws.offset(.x)), weights: weights[r],
                control: control.address + UInt64(256 * r), errorRecord: control.address + UInt64(256 * placement.ranks),
                peers: peers.address)
            bytes += FusedParams.encode(
                pointers: pointers,
                FusedParams.Scalars(
                    tokens: st.tokens[r], capacity: capacity, rank: r, gateSplit: split, rowBlocks: ws.rowBlocks,
                    epoch: st.epoch, budgetNanoseconds: FusedParams.nanoseconds(options.waitBudget)))
        }
        try table.upload(bytes)
        try kernel.function.launchCooperative(
            grid: Dim3(blocksPerRank * placement.ranks), block: Dim3(FusedKernel.threadsPerBlock),
            sharedBytes: kernel.dynamicSharedBytes,
            arguments: [.pointer(table.address), .int32(Int32(blocksPerRank))], gridSizedByCaller: true)
    }

    private func checkError(_ st: inout State) throws {
        guard let error = try FusedIO.takeError(control: control, offset: 256 * placement.ranks, arenas: st.arenas)
        else { return }
        st.epoch = 0
        throw DistributedError(kernel: error, placement: placement)
    }

    private func readOutput(_ st: State, rank r: Int) throws -> MoEOutput {
        let c = layer.config
        let (s, h, k, e) = (st.tokens[r], c.hiddenSize, c.topK, c.experts)
        guard s > 0 else {
            return MoEOutput(
                output: .zeros(shape: [0, h]),
                routing: Routing(tokens: 0, topK: k, expertIDs: [], weights: [], slots: [],
                                 expertLoad: [Int](repeating: 0, count: e)))
        }
        let ws = st.workspaces[r], arena = st.arenas[r]
        let y: [Float] = try FusedIO.read(arena, ws.offset(.y), count: s * h)
        let ids: [Int32] = try FusedIO.read(arena, ws.offset(.ids), count: s * k)
        let w: [Float] = try FusedIO.read(arena, ws.offset(.weights), count: s * k)
        var slots: [Int32] = try FusedIO.read(arena, ws.offset(.slotRow), count: s * k)
        let load: [Int32] = try FusedIO.read(arena, ws.offset(.expertLoad), count: e)
        if placement.ranks == 1 {
            // One rank runs the single-GPU path, which reports a pair's row; its slot is the row minus the
            // expert's first row (with ranks the kernel reports the global slot itself).
            let rowStart: [Int32] = try FusedIO.read(arena, ws.offset(.rowStart), count: e + 1)
            for i in slots.indices where slots[i] >= 0 && ids[i] >= 0 { slots[i] -= rowStart[Int(ids[i])] }
        }
        return MoEOutput(
            output: try HostTensor(shape: [s, h], float32: y),
            routing: Routing(tokens: s, topK: k, expertIDs: ids, weights: w, slots: slots, expertLoad: load.map(Int.init)))
    }
}

/// A rank's bounded wait expired: which rank waited, for which source and expert, in which epoch.
public struct DistributedError: Error, Sendable, CustomStringConvertible {
    /// The kernel's record.
    public let kernel: FusedKernelError
    let placement: ExpertPlacement

    /// The rank whose wait expired.
    public var waitingRank: Int { kernel.rank }
    /// For a dispatch wait: the source rank that never delivered, and the expert.
    public var missingSource: (rank: Int, expert: Int)? {
        guard kernel.phase == .dispatch, kernel.index >= 0 else { return nil }
        let e = placement.experts
        return (kernel.index / e, kernel.index % e)
    }

    public var description: String {
        if let m = missingSource {
            return "rank \(waitingRank) gave up waiting for rank \(m.rank)'s rows for expert \(m.expert) "
                + "(expected \(kernel.expected) rows, saw \(kernel.seen)); the GPU was not left hanging"
        }
        return "rank \(waitingRank): \(kernel)"
    }
}
