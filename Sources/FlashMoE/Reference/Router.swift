/// The routing rules every FlashMoE backend implements, as callable functions.
///
/// The CPU backends route with these functions; the GPU kernel implements the same rules and `flashmoe verify`
/// checks it against them. Per token t, with logits l[e] = Σ_h x[t,h]·router[e,h] (x and the router already
/// rounded to the precision's storage type):
///
/// 1. **Eligibility.** An expert is eligible when its logit is not NaN. A NaN logit never selects an expert.
/// 2. **Softmax router.** m = the largest eligible logit. If m is ±∞, p[e] = 1/c for each eligible e with
///    l[e] == m (c = how many), else 0. Otherwise p[e] = exp(l[e] − m) / Σ_eligible exp(l − m) (sum in expert
///    order). Ineligible experts have p = 0. Selection: k rounds of arg-max **by logit** over the eligible,
///    not-yet-chosen experts, ties to the lower expert index; the weight is p of the chosen expert.
/// 3. **Sigmoid router** (DeepSeek-V3, transformers' `DeepseekV3TopkRouter`): s[e] = 1 / (1 + exp(−l[e]));
///    choice score c[e] = s[e] + bias[e] (bias = the selection bias, or 0). With G = `groups` > 1, the groups are
///    contiguous blocks of E/G experts; a group's score is the sum of its best min(2, eligible in the group)
///    choice scores (best + second), or −∞ with none eligible; the `groupsKept` best groups are kept (ties to the
///    lower group index) and experts outside them are no longer candidates (transformers 5.x masks them with −∞;
///    older releases and DeepSeek's reference code used 0.0, which differs only when a biased choice score is
///    negative).
///    Selection: k rounds of arg-max of c over the eligible, not-yet-chosen experts, ties to the lower index; the
///    weight is s (unbiased) of the chosen expert.
/// 4. **Unrouted ranks.** With fewer than k eligible experts, the remaining ranks get id −1, weight 0, slot −1.
/// 5. **Weights.** If `renormalize`: softmax w /= Σw (skipped when the sum is 0); sigmoid w /= (Σw + 1e-20), as
///    transformers. Then w *= `scalingFactor`. Sums run over the routed ranks in rank order. Ranks are in
///    selection order (rank 0 = the first arg-max).
/// 6. **Slots and capacity.** For each expert, tokens are walked in order t = 0..<S; the pair (t, j) routed to e
///    gets slot = the number of earlier pairs routed to e. With C = `capacity.perExpert(tokens: S, experts: E,
///    topK: k)`, a pair whose slot ≥ C is dropped: slot −1 (its contribution is omitted and the token's other
///    weights are not renormalised). `expertLoad[e]` counts the pairs routed to e before capacity.
///
/// The selection bias must be finite and is defined for the sigmoid router only.
///
/// Non-finite logits (docs/nonfinite.md): a NaN logit makes its expert ineligible (rule 1), so a token whose x
/// holds a NaN has every logit NaN and every rank unrouted (rule 4); ±∞ logits are ordinary values when compared,
/// with the softmax limit of rule 2 and sigmoid(±∞) = 1 / 0. The rules apply to the logits in each backend's own
/// arithmetic (FP32, or Float64 in the oracle), so logits that overflow FP32 but not Float64 may route differently.
public enum Router {
    /// Router logits in Float64: l[t, e] = Σ_h x[t, h]·router[e, h], accumulated in Float64 (the oracle's
    /// arithmetic), from the values as stored (round them to the precision's storage type first).
    ///
    /// - Parameters:
    ///   - input: x [S, H] in any element type.
    ///   - router: the gate weight [E, H] in any element type.
    /// - Returns: [S·E] logits, token-major.
    public static func logits(input: HostTensor, router: HostTensor) throws(MoEError) -> [Double] {
        guard input.shape.count == 2, router.shape.count == 2, input.shape[1] == router.shape[1] else {
            throw MoEError(
                .shapeMismatch,
                "router logits need x [S, H] and a router [E, H] with the same H; got \(input.shape) and \(router.shape)")
        }
        let (s, h, e) = (input.shape[0], input.shape[1], router.shape[0])
        let x = input.floats().map(Double.init)
        let r = router.floats().map(Double.init)
        var out = [Double](repeating: 0, count: s * e)
        x.withUnsafeBufferPointer { xb in
            r.withUnsafeBufferPointer { rb in
                out.withUnsafeMutableBufferPointer { ob in
                    // Each chunk writes the logits of its own tokens.
                    nonisolated(unsafe) let (xp, rp, op) = (xb.baseAddress, rb.baseAddress, ob.baseAddress)
                    parallelChunks(count: s, minimumChunk: max(1, 65_536 / max(1, e * h))) { tokens in
                        guard let xp, let rp, let op else { return }
                        for t in tokens {
                            for j in 0..<e { op[t * e + j] = dotFloat64(xp + t * h, rp + j * h, h) }
                        }
                    }
                }
            }
        }
        return out
    }

    /// Routes S tokens from Float64 logits (the oracle's routing).
    ///
    /// - Parameters:
    ///   - logits: [S·E] token-major logits, e.g. from `logits(input:router:)`.
    ///   - selectionBias: [E] per-expert bias added to the sigmoid router's choice scores, or nil for none.
    ///   - config: the layer configuration (E, k, router, capacity).
    ///   - tokens: S.
    /// - Returns: ids, weights (rounded to FP32), slots and loads, by the rules documented on `Router`.
    public static func route(logits: [Double], selectionBias: [Float]?, config: MoEConfig, tokens: Int)
        throws(MoEError) -> Routing
    {
        try routeDetailed(logits: logits, selectionBias: selectionBias, config: config, tokens: tokens).routing
    }

    /// Routes S tokens from Float32 logits with Float32 routing math (the fast CPU path's and the GPU's
    /// arithmetic). Same rules and parameters as the Float64 overload.
    public static func route(logits: [Float], selectionBias: [Float]?, config: MoEConfig, tokens: Int)
        throws(MoEError) -> Routing
    {
        try routeDetailed(logits: logits, selectionBias: selectionBias, config: config, tokens: tokens).routing
    }

    /// Slots and per-expert loads for given expert choices (rule 6): token order decides who keeps a slot.
    ///
    /// - Parameters:
    ///   - expertIDs: [S·k] expert ids in rank order, −1 for unrouted ranks.
    ///   - tokens: S.
    ///   - config: supplies E, k and the capacity rule.
    /// - Returns: [S·k] slots (−1 = dropped or unrouted) and [E] loads before capacity.
    public static func assignSlots(expertIDs: [Int32], tokens: Int, config: MoEConfig) throws(MoEError)
        -> (slots: [Int32], expertLoad: [Int])
    {
        let (e, k) = (config.experts, config.topK)
        guard tokens >= 0, expertIDs.count == tokens * k else {
            throw MoEError(
                .shapeMismatch, "expected \(tokens) × \(k) expert ids (tokens × top-k), got \(expertIDs.count)")
        }
        if let bad = expertIDs.first(where: { $0 < -1 || $0 >= Int32(e) }) {
            throw MoEError(.invalidInput, "expert id \(bad) is out of range: ids must be −1 (unrouted) or 0..<\(e)")
        }
        let capacity = config.capacity.perExpert(tokens: tokens, experts: e, topK: k) ?? Int.max
        var load = [Int](repeating: 0, count: e)
        var slots = [Int32](repeating: -1, count: expertIDs.count)
        for (p, id) in expertIDs.enumerated() where id >= 0 {
            let slot = load[Int(id)]
            load[Int(id)] += 1
            if slot < capacity { slots[p] = Int32(slot) }
        }
        return (slots, load)
    }

    /// Routing plus the combine weights in the routing's own precision (the oracle combines with Float64 weights).
    static func routeDetailed<T: RouterScalar>(
        logits: [T], selectionBias: [Float]?, config: MoEConfig, tokens: Int
    ) throws(MoEError) -> (routing: Routing, weights: [T]) {
        try config.validate()
        let (e, k) = (config.experts, config.topK)
        guard tokens >= 0, logits.count == tokens * e else {
            throw MoEError(
                .shapeMismatch, "expected \(tokens) × \(e) router logits (tokens × experts), got \(logits.count)")
        }
        let bias = try checkedBias(selectionBias, config: config).map { T($0) }
        var ids = [Int32](repeating: -1, count: tokens * k)
        var weights = [T](repeating: 0, count: tokens * k)
        logits.withUnsafeBufferPointer { lb in
            ids.withUnsafeMutableBufferPointer { ib in
                weights.withUnsafeMutableBufferPointer { wb in
                    // Each chunk routes its own tokens and writes only their k entries.
                    nonisolated(unsafe) let (lp, ip, wp) = (lb.baseAddress, ib.baseAddress, wb.baseAddress)
                    parallelChunks(count: tokens, minimumChunk: max(1, 16_384 / e)) { range in
                        guard let lp, let ip, let wp else { return }
                        var router = TokenRouter<T>(experts: e, topK: k, router: config.router, bias: bias)
                        for t in range {
                            router.route(
                                UnsafeBufferPointer(start: lp + t * e, count: e),
                                ids: UnsafeMutableBufferPointer(start: ip + t * k, count: k),
                                weights: UnsafeMutableBufferPointer(start: wp + t * k, count: k))
                        }
                    }
                }
            }
        }
        let (slots, load) = try assignSlots(expertIDs: ids, tokens: tokens, config: config)
        let routing = Routing(
            tokens: tokens, topK: k, expertIDs: ids, weights: weights.map { Float($0) }, slots: slots,
            expertLoad: load)
        return (routing, weights)
    }

    /// The selection bias as E finite values (zeros when there is none).
    static func checkedBias(_ bias: [Float]?, config: MoEConfig) throws(MoEError) -> [Float] {
        guard let bias else { return [Float](repeating: 0, count: config.experts) }
        guard config.router.scoring == .sigmoid else {
            throw MoEError(
                .unsupported, "a selection bias is defined for the sigmoid router only: drop it or use scoring = sigmoid")
        }
        guard bias.count == config.experts else {
            throw MoEError(
                .shapeMismatch, "the selection bias needs \(config.experts) values (one per expert), got \(bias.count)")
        }
        guard bias.allSatisfy(\.isFinite) else {
            throw MoEError(.invalidInput, "the selection bias must be finite: replace its NaN or infinite entries")
        }
        return bias
    }
}
