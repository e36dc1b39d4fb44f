import CCUDA

extension RankProcessMoE {
    /// One forward of this rank's tokens over the caller's device memory (`DeviceForward`: x [S_r, H] in the storage
    /// type, y [S_r, H], optional ids and weights), enqueued on `call.stream`: no host synchronisation, no
    /// allocation. Every rank must call it once per step, on any stream of its GPU (each rank's calls in order).
    ///
    /// - Parameter tokensPerRank: every rank's token count this step, when the caller knows them; nil all-gathers
    ///   them through the exchange (a host round trip per call, and a collective every rank must make).
    ///
    /// The rank's `Params` travel in the launch itself (encoded again only when the token counts or the caller's
    /// pointers differ from the previous call's). Capturable in a CUDA graph on every rank alike (the same rules as the single-GPU
    /// operator): the launch carries no epoch, each rank's blocks read it from the rank's `done_epoch`, so a replay
    /// runs the next epoch; replays must keep every rank in step (each rank replays its graph once per step), the
    /// captured token counts and pointers stay fixed, and after `FusedOptions.epochWrap` launches the host never
    /// saw (replays) the kernel refuses with `DistributedError.epochLimit` (create the group again). An S_r = 0
    /// rank still launches (its experts receive the other ranks' rows); its x and y may then be null.
    ///
    /// - Throws: before any launch, `MoEError` for a bad argument (see `DeviceForward`), `RendezvousError` from the
    ///   count all-gather, and the `DistributedError` an earlier launch left when `FusedOptions.synchronousErrors`
    ///   is set (otherwise `checkErrors`). After a kernel error the rank is unusable: create the group again.
    public func forward(_ call: DeviceForward, tokensPerRank: [Int]? = nil) throws {
        try state.withLock { st in
            try checkUsable(st)
            try device.makeCurrent()
            if call.injectFault {
                throw MoEError(
                    .invalidInput, "injectFault: a group's fault injection is a build option (FusedOptions.injectFault)")
            }
            try call.check(
                device: device, hiddenSize: config.hiddenSize, maxTokens: maxTokens, faultBuild: false, owner: "group")
            let s = call.tokens
            let counts = try tokensPerRank ?? gatherCounts(s)
            try check(counts, own: s)
            // No token on any rank (every rank sees the same counts, so all skip alike): no launch, no epoch.
            if counts.allSatisfy({ $0 == 0 }) { return }
            // Only after epochWrap forwards (2^32 - 1 by default): the wait is not allowed while a graph captures.
            if st.epoch >= options.epochWrap {
                try synchronize(call.stream)
                try wrapEpoch()
                st.epoch = 0
            }
            let io: DeviceForward? = s > 0 ? call : nil
            var key: [UInt64] = [0]
            if let io {
                let storage: UInt64 = io.outputType == .storage ? 1 : 0
                key = [io.input, io.output, io.topKIDs ?? 0, io.topKWeights ?? 0, storage]
            }
            // The parameters travel in the launch (by value, as the single-GPU operator's), so nothing is copied
            // to the device before it and a CUDA graph captures them with it; they are encoded again only when
            // the token counts or the caller's pointers change.
            if counts != st.tokens || key != st.pointers || st.params.isEmpty {
                let total = counts.reduce(0, +)
                st.params = RankParts.params(
                    workspace: workspace, base: arena.address, weights: weights, sync: controlAddress,
                    errorRecord: memory.errorRecordAddress, peers: peers.address, tokens: s,
                    capacity: RankParts.capacity(config, totalTokens: total), rank: rank,
                    gateSplit: gateSplit(totalTokens: total), budget: options.waitBudget, epochWrap: options.epochWrap,
                    io: io)
                st.tokens = counts
                st.pointers = key
            }
            st.epoch += 1
            try RankParts.launch(kernel, params: st.params, blocksPerRank: blocksPerRank, streamHandle: call.stream)
            if options.synchronousErrors {
                try synchronize(call.stream)
                try throwRecordedError(&st)
            }
        }
    }

    /// Throws the `DistributedError` a launch of the group recorded (in rank 0's error record, which every rank
    /// reads), without waiting for launches still queued; the rank is unusable afterwards.
    public func checkErrors() throws {
        try state.withLock { st in
            if let failure = st.failure { throw MoEError(.invalidConfig, "rank \(rank) failed earlier: \(failure)") }
            try throwRecordedError(&st)
        }
    }

    /// Waits for the work queued on `stream` (nil: the legacy default stream), then `checkErrors()`.
    public func checkErrors(synchronizing stream: CUstream?) throws {
        try state.withLock { st in
            if let failure = st.failure { throw MoEError(.invalidConfig, "rank \(rank) failed earlier: \(failure)") }
            try synchronize(stream)
            try throwRecordedError(&st)
        }
    }

    /// The gate split the last forward used, for comparisons with a single-rank operator (0 before the first, and
    /// for the decode gate of a forward of at most 8 tokens, which the single-rank operator then uses too).
    public var lastGateSplit: Int {
        state.withLock { st in st.tokens.isEmpty ? 0 : gateSplit(totalTokens: st.tokens.reduce(0, +)) }
    }

    private func synchronize(_ stream: CUstream?) throws {
        try device.makeCurrent()
        try device.driver.check(device.driver.streamSynchronize(stream), "cuStreamSynchronize")
    }

    private func throwRecordedError(_ st: inout State) throws {
        guard let error = try readErrorRecord() else { return }
        let failure = DistributedError(kernel: error, placement: placement)
        st.failure = "\(failure)"
        throw failure
    }
}
