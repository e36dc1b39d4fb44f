/// The complete description of one MoE layer: shapes, FFN, router, shared expert, capacity and precision.
///
/// A plain value. `validate()` checks every constraint and throws an `MoEError` that says what to change;
/// every backend calls it before running.
public struct MoEConfig: Sendable, Hashable, Codable {
    /// Model (hidden) size H.
    public var hiddenSize: Int
    /// Expert intermediate size I.
    public var intermediateSize: Int
    /// Number of routed experts E.
    public var experts: Int
    /// Experts per token k.
    public var topK: Int
    /// Plain or gated expert FFN.
    public var ffn: FFNKind
    /// Plain FFN only: whether W1 and W2 carry biases b1 [E, I] and b2 [E, H].
    public var bias: Bool
    /// The FFN's activation.
    public var activation: Activation
    /// How tokens choose experts.
    public var router: RouterConfig
    /// An optional always-active expert.
    public var sharedExpert: SharedExpertConfig?
    /// Dropless or capacity-limited.
    public var capacity: Capacity
    /// Storage and multiply precision.
    public var precision: Precision

    /// A layer of the given shapes; by default a plain ReLU FFN without biases, softmax top-k renormalised, no shared
    /// expert, dropless and FP32. Nothing is checked here (`validate()` does that).
    public init(
        hiddenSize: Int, intermediateSize: Int, experts: Int, topK: Int,
        ffn: FFNKind = .plain, bias: Bool = false, activation: Activation = .relu,
        router: RouterConfig = .softmax(renormalize: true), sharedExpert: SharedExpertConfig? = nil,
        capacity: Capacity = .dropless, precision: Precision = .fp32
    ) {
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.experts = experts
        self.topK = topK
        self.ffn = ffn
        self.bias = bias
        self.activation = activation
        self.router = router
        self.sharedExpert = sharedExpert
        self.capacity = capacity
        self.precision = precision
    }

    /// Checks every constraint; the error says which field to change and to what.
    public func validate() throws(MoEError) {
        func fail(_ m: String) -> MoEError { MoEError(.invalidConfig, m) }
        guard hiddenSize > 0 else { throw fail("hidden size must be positive (got \(hiddenSize))") }
        guard intermediateSize > 0 else {
            throw fail("intermediate size must be positive (got \(intermediateSize))")
        }
        guard experts > 0 else { throw fail("the number of experts must be positive (got \(experts))") }
        guard topK > 0 else { throw fail("top-k must be at least 1 (got \(topK))") }
        guard topK <= experts else {
            throw fail("top-k (\(topK)) cannot exceed the number of experts (\(experts)): lower k or add experts")
        }
        if bias && ffn == .gated {
            throw fail("biases are supported for the plain FFN only: set bias = false or ffn = plain")
        }
        let r = router
        guard r.groups >= 1 else { throw fail("router groups must be at least 1 (got \(r.groups))") }
        guard experts % r.groups == 0 else {
            throw fail("router groups (\(r.groups)) must divide the number of experts (\(experts))")
        }
        guard r.groupsKept >= 1 && r.groupsKept <= r.groups else {
            throw fail("groups kept (\(r.groupsKept)) must be between 1 and the number of groups (\(r.groups))")
        }
        if r.groups > 1 {
            guard r.scoring == .sigmoid else {
                throw fail("group-limited routing is defined for the sigmoid router only: set groups = 1")
            }
            let reachable = r.groupsKept * (experts / r.groups)
            guard topK <= reachable else {
                throw fail(
                    "top-k (\(topK)) exceeds the experts in the kept groups (\(r.groupsKept) × \(experts / r.groups)): raise groups kept or lower k"
                )
            }
        }
        guard r.scalingFactor.isFinite else { throw fail("the routed scaling factor must be finite") }
        if let s = sharedExpert, s.intermediateSize <= 0 {
            throw fail("the shared expert's intermediate size must be positive (got \(s.intermediateSize))")
        }
        if case .factor(let f) = capacity, !(f > 0 && f.isFinite) {
            throw fail("the capacity factor must be a positive finite number (got \(f)); use dropless for none")
        }
    }

    /// Rows of W1 per expert: I for the plain FFN, 2·I (gate and up) for the gated one.
    public var firstLayerRows: Int { ffn == .gated ? 2 * intermediateSize : intermediateSize }

    /// Floating-point operations of one forward over `tokens` tokens (routed rows × both GEMMs, gate, shared).
    public func flops(tokens: Int) -> Double {
        let s = Double(tokens), h = Double(hiddenSize), i = Double(intermediateSize)
        let mult: Double = ffn == .gated ? 3 : 2
        var f = 2 * s * h * Double(experts)  // gate
        f += 2 * s * Double(topK) * h * i * mult
        if let sh = sharedExpert { f += 2 * s * h * Double(sh.intermediateSize) * mult }
        return f
    }
}
