/// The device memory the fused operators need, estimated from the layer's shape before anything is allocated.
///
/// Weights follow `FusedDeviceWeights` (gated W1/W3 packed in blocks of the kernel's pack rows, taken at their
/// largest, 128, since the kernel is not loaded yet; the router with the shared gate's row; FP32 biases); the
/// per-call arenas follow `FusedWorkspace` itself, with the gate's partial-logit region at its bound for the token
/// count. Every buffer is rounded up to the driver's 2 MiB allocation granularity. So the estimate is an upper
/// bound within a few MiB of what the operator allocates.
public struct FusedMemoryEstimate: Sendable, Hashable {
    /// Device bytes of the weights (with ranks: every rank's experts plus one router and shared expert per rank).
    public let weightBytes: Int
    /// Device bytes of the per-call arenas at `tokens` tokens.
    public let workspaceBytes: Int
    /// The kernel's counters, error record and parameter tables, and on one GPU the second input buffer that
    /// `FusedMoE.benchmark` alternates with (S·H elements).
    public let controlBytes: Int
    /// The token count the workspace is sized for (with ranks: over all ranks).
    public let tokens: Int

    /// Everything together.
    public var total: Int { weightBytes + workspaceBytes + controlBytes }

    /// Room kept free beyond the estimate: the loaded kernel, its local memory and the driver's own allocations.
    public static let headroom = 256 << 20

    /// The single-GPU operator (`FusedMoE`) on `tokens` tokens.
    public init(config: MoEConfig, tokens: Int) throws(MoEError) {
        try self.init(config: config, ranks: 1, tokensPerRank: [tokens], experts: [0..<config.experts])
    }

    /// `DistributedMoE`'s ranks `onDevice` (of `ranks`), with `tokens` global tokens spread evenly over the ranks.
    public init(config: MoEConfig, ranks: Int, onDevice: Range<Int>, tokens: Int) throws(MoEError) {
        let placement = try ExpertPlacement(experts: config.experts, ranks: ranks)
        let share = ContiguousBlocks(count: tokens, parts: ranks)
        try self.init(
            config: config, ranks: ranks, tokensPerRank: onDevice.map { share.block($0).count },
            experts: onDevice.map { placement.experts(of: $0) }, totalTokens: tokens)
    }

    /// Ranks with the given token counts and experts (one entry per rank on the device).
    init(config c: MoEConfig, ranks: Int, tokensPerRank: [Int], experts: [Range<Int>], totalTokens: Int? = nil)
        throws(MoEError)
    {
        // The workspace as the operator lays it out (fp8's includes the activations' E4M3 codes and scales; its
        // weights are counted by weightBytes). The estimate does not ask for the experimental switch: the operator does.
        let spec = try FusedSpecialization(config: c, ranks: ranks, experimentalFP8: true)
        let total = totalTokens ?? tokensPerRank.reduce(0, +)
        var weights = 0, workspace = 0
        for (s, mine) in zip(tokensPerRank, experts) {
            weights += Self.weightBytes(c, experts: mine.count)
            let rows = ranks == 1 ? s * c.topK : max(total, 1) * min(c.topK, mine.count)
            let ws = FusedWorkspace(
                spec: spec, tokens: ranks == 1 ? s : max(s, 1), rowCapacity: rows,
                // The bound of any grid: gateSplitMax partial-logit rows a token.
                partRows: FusedWorkspace.gateSplitMax * (ranks == 1 ? s : max(s, 1)),
                ranks: ranks, localExperts: mine.count)
            workspace += Self.rounded(ws.byteCount)
        }
        weightBytes = weights
        workspaceBytes = workspace
        let launchTables = ranks == 1 ? 0 : 256 * tokensPerRank.count + 256 + (FusedParams.byteCount + FusedParams.peerByteCount * ranks) * tokensPerRank.count
        let benchmarkInput = ranks == 1 ? Self.rounded(total * c.hiddenSize * c.precision.storage.byteSize) : 0
        controlBytes = Self.rounded(FusedOperator.controlBytes + launchTables) + benchmarkInput
        self.tokens = total
    }

    /// A grid so large that the gate's partial-logit region takes its bound for any token count.
    static let unboundedGrid = 1 << 20

    /// The driver hands out device memory in 2 MiB pages.
    static func rounded(_ bytes: Int) -> Int { (max(bytes, 1) + (2 << 20) - 1) / (2 << 20) * (2 << 20) }

    /// The bytes of one rank's `FusedDeviceWeights` holding `experts` routed experts. fp8's routed experts are E4M3
    /// codes with their block scales (`fp8ImageBytes`), its router and shared expert 16-bit. Not counted: the
    /// staging chunk an fp8 layer made from BF16 device pointers quantizes at a time (at most 256 MiB of BF16 and its
    /// codes, freed before creation returns; `FusedDeviceWeights.fp8Experts`).
    static func weightBytes(_ c: MoEConfig, experts e: Int) -> Int {
        let (h, i, t) = (c.hiddenSize, c.intermediateSize, c.precision.storage.byteSize)
        let pack = 128
        func firstLayer(_ rows: Int) -> Int { c.ffn == .gated ? (rows + pack - 1) / pack * 2 * pack : rows }
        let routerRows = c.experts + (c.sharedExpert?.gated == true ? 1 : 0)
        let fp8 = FusedDeviceWeights.fp8ImageBytes(c)
        let experts = c.precision == .fp8 ? [e * fp8.first, e * fp8.second] : [e * firstLayer(i) * h * t, e * h * i * t]
        var buffers = [routerRows * h * t] + experts
        if c.router.selectionBias { buffers.append(c.experts * 4) }
        if c.bias { buffers += [e * i * 4, e * h * 4] }
        if let s = c.sharedExpert { buffers += [firstLayer(s.intermediateSize) * h * t, h * s.intermediateSize * t] }
        return buffers.map(rounded).reduce(0, +)
    }
}

/// The fused operators refused to allocate: the layer and its workspace would not fit in the GPU's free memory.
public struct DeviceMemoryError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The GPU's ordinal.
    public let deviceOrdinal: Int
    /// The GPU's name, as the driver reports it.
    public let deviceName: String
    /// What the operator would need there (before `FusedMemoryEstimate.headroom`).
    public let estimate: FusedMemoryEstimate
    /// Free device memory as the driver reported it, bytes.
    public let freeBytes: Int
    /// Total device memory as the driver reported it, bytes.
    public let totalBytes: Int
    /// The most tokens per call that fit with these weights (nil when the weights alone do not fit).
    public let tokensThatFit: Int?
    /// What to change, most direct first.
    public let suggestions: [String]

    /// The GPU, its free and total memory, what the layer needs there (weights, workspace, headroom), and the
    /// suggestions to make it fit.
    public var description: String {
        let e = estimate
        var need = "weights \(formatByteCount(e.weightBytes))"
        if e.tokens > 0 { need += ", workspace for \(e.tokens) tokens \(formatByteCount(e.workspaceBytes))" }
        return "GPU \(deviceOrdinal) (\(deviceName)) has \(formatByteCount(freeBytes)) free of "
            + "\(formatByteCount(totalBytes)), but the layer needs about "
            + "\(formatByteCount(e.total + FusedMemoryEstimate.headroom)) there (\(need), plus "
            + "\(formatByteCount(FusedMemoryEstimate.headroom)) headroom); nothing was allocated. To fit: "
            + suggestions.joined(separator: "; ")
    }
}

/// The check every fused operator makes before it allocates: the estimate against `cuMemGetInfo`.
public enum FusedMemoryCheck {
    /// The minimal workspace an operator is checked for when it is created (one 128-token tile per rank); each
    /// call checks its own token count again before it grows the arena.
    static let tokensAtCreation = 128

    /// `FusedMoE.init` and `DistributedMoE.init`: the weights and a one-tile workspace must fit on every GPU the
    /// operator uses (`devices`: one launch per entry; nil is `options.deviceOrdinal`).
    ///
    /// Throws only `DeviceMemoryError`: a layer the kernel does not support, a bad launch plan or a missing driver
    /// are left to the operator's own checks, which report them as before.
    public static func check(layer: MoELayer, options: FusedOptions, ranks: Int = 1, devices: [Int]? = nil)
        throws(DeviceMemoryError)
    {
        try check(config: layer.config, tokens: tokensAtCreation * ranks, ranks: ranks,
                  devices: devices ?? [options.deviceOrdinal], driver: { try? CUDADriver.shared.get() })
    }

    /// Refuses with a `DeviceMemoryError` when `tokens` global tokens would not fit (the CLI calls this before it
    /// makes the weights). `devices` is the GPU of each launch, as for `DistributedMoE`. Nothing is checked where
    /// the layer, the plan or the driver cannot be used (the operator reports those).
    public static func check(config: MoEConfig, tokens: Int, ranks: Int = 1, devices: [Int]) throws(DeviceMemoryError) {
        try check(config: config, tokens: tokens, ranks: ranks, devices: devices, driver: { try? CUDADriver.shared.get() })
    }

    static func check(
        config: MoEConfig, tokens: Int, ranks: Int, devices: [Int], driver: () -> (any CUDADriverAPI)?
    ) throws(DeviceMemoryError) {
        guard let plan = try? RankLaunchPlan(ranks: ranks, devices: devices) else { return }
        for ordinal in Set(devices).sorted() {
            let mine = plan.devices.indices.filter { plan.devices[$0] == ordinal }.map { plan.ranks(of: $0) }
            let onDevice = (mine.map(\.lowerBound).min() ?? 0)..<(mine.map(\.upperBound).max() ?? 0)
            func estimate(_ s: Int) throws(MoEError) -> FusedMemoryEstimate {
                ranks == 1
                    ? try FusedMemoryEstimate(config: config, tokens: s)
                    : try FusedMemoryEstimate(config: config, ranks: ranks, onDevice: onDevice, tokens: s)
            }
            guard let needed = try? estimate(tokens), let api = driver(),
                let device = try? CUDADevice(ordinal: ordinal, driver: api),
                let (free, total) = try? device.memoryInfo()
            else { return }
            guard needed.total + FusedMemoryEstimate.headroom > free else { continue }
            let fit = (try? largestFitting(upTo: tokens, free: free, estimate)) ?? nil
            throw refusal(needed, device: device, free: free, total: total, tokensThatFit: fit)
        }
    }

    /// Before an operator grows its arenas (one per rank, `workspaces[r]` on `devices[r]`) for `tokens` tokens, with
    /// its weights already in place: the new arenas must fit in each GPU's free memory.
    static func checkArenas(_ workspaces: [FusedWorkspace], on devices: [CUDADevice], tokens: Int) throws {
        var perDevice: [Int: (device: CUDADevice, bytes: Int)] = [:]
        for (ws, d) in zip(workspaces, devices) {
            perDevice[d.properties.ordinal, default: (d, 0)].bytes += FusedMemoryEstimate.rounded(ws.byteCount)
        }
        for (_, entry) in perDevice.sorted(by: { $0.key < $1.key }) {
            guard let (free, total) = try? entry.device.memoryInfo() else { continue }
            guard entry.bytes + FusedMemoryEstimate.headroom > free else { continue }
            // The arenas grow about linearly with the tokens (a few regions are capped): scale down to what fits,
            // less 10 % for the capped ones. A suggestion, not a promise: the next call checks again.
            let fit = max(0, Int(0.9 * Double(tokens) * Double(free - FusedMemoryEstimate.headroom) / Double(entry.bytes)))
            let estimate = FusedMemoryEstimate(weightBytes: 0, workspaceBytes: entry.bytes, controlBytes: 0, tokens: tokens)
            throw DeviceMemoryError(
                deviceOrdinal: entry.device.properties.ordinal, deviceName: entry.device.properties.name,
                estimate: estimate, freeBytes: free, totalBytes: total, tokensThatFit: fit,
                suggestions: [
                    "this call's workspace does not fit next to the weights (already on the GPU): about \(fit) tokens "
                        + "per call fit, so split the batch into smaller calls",
                    "free the memory other processes hold (nvidia-smi)",
                ])
        }
    }

    /// The error for an estimate that does not fit, with what to change.
    static func refusal(
        _ estimate: FusedMemoryEstimate, device: CUDADevice, free: Int, total: Int, tokensThatFit fit: Int?
    ) -> DeviceMemoryError {
        var suggestions: [String] = []
        if let fit {
            suggestions.append("at most \(fit) tokens per call fit with these weights: use fewer tokens or split "
                + "the batch into calls of at most \(fit)")
        } else {
            suggestions.append("the weights alone (\(formatByteCount(estimate.weightBytes))) do not fit")
        }
        suggestions.append("a 16-bit precision (--precision bf16) halves the weights and the activations (if the "
            + "layer is in fp32 or tf32)")
        suggestions.append("spread the experts over more GPUs: ranks with one launch per GPU (DistributedMoE, "
            + "`flashmoe bench --ranks R --rank-devices 0,1,…`) hold 1/R of them each")
        suggestions.append("free the memory other processes hold (nvidia-smi)")
        return DeviceMemoryError(
            deviceOrdinal: device.properties.ordinal, deviceName: device.properties.name, estimate: estimate,
            freeBytes: free, totalBytes: total, tokensThatFit: fit, suggestions: suggestions)
    }

    /// The most tokens ≤ `upTo` whose estimate fits in `free` bytes, or nil when none does (not even 0).
    static func largestFitting(upTo tokens: Int, free: Int, _ estimate: (Int) throws(MoEError) -> FusedMemoryEstimate)
        throws(MoEError) -> Int?
    {
        func fits(_ s: Int) throws(MoEError) -> Bool { try estimate(s).total + FusedMemoryEstimate.headroom <= free }
        guard try fits(0) else { return nil }
        var lo = 0, hi = tokens
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if try fits(mid) { lo = mid } else { hi = mid - 1 }
        }
        return lo
    }
}

extension FusedMemoryEstimate {
    /// A given breakdown (an arena check, tests).
    init(weightBytes: Int, workspaceBytes: Int, controlBytes: Int, tokens: Int) {
        self.weightBytes = weightBytes
        self.workspaceBytes = workspaceBytes
        self.controlBytes = controlBytes
        self.tokens = tokens
    }
}
