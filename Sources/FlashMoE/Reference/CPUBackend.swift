/// The CPU implementation of an MoE layer, in two modes.
///
/// - `oracle`: the Float64 reference. Every sum is accumulated in Float64 and the result is rounded once to
///   FP32; it defines what every other backend must reproduce within `Precision.tolerance`.
/// - `fast`: the default when there is no GPU. FP32 arithmetic with fused multiply-adds where the CPU has them
///   (AVX-512 or AVX2+FMA kernels chosen at run time, a portable kernel otherwise), weights packed once at init,
///   all cores.
///
/// Both modes compute the same function:
/// 1. x and every weight matrix (router, w1, w3, w2, shared.*) are rounded to the precision's storage type; the
///    biases b1, b2 and the selection bias stay FP32. Weights are converted once, at init.
/// 2. Routing by `Router`'s rules from logits l = x·routerᵀ (Float64 in the oracle, FP32 in fast mode).
/// 3. Expert FFN per kept (token, rank) pair: plain a = act(x·w1ᵀ + b1), gated a = act(x·w1ᵀ) ⊙ (x·w3ᵀ); a is
///    rounded to the storage type (as the GPU stores it; a no-op for fp32/tf32); o = a·w2ᵀ + b2.
/// 4. y[t] = Σ_j w[t, j]·o_j over ranks j = 0..<k in order, skipping dropped and unrouted ranks; then the shared
///    expert (same FFN kind and activation, no biases) is added, multiplied by sigmoid(x·gateᵀ) when gated.
///
/// TF32 is computed as FP32 here (the oracle is the exact reference; TF32's tolerance covers the difference).
///
/// NaN and ±∞ follow docs/nonfinite.md in both modes: every token is computed from its own row only (GEMM rows are
/// independent, and an unrouted token is gathered into no expert), so a fault in one token leaves every other
/// token's ids, weights and y bits unchanged.
public struct CPUBackend: MoEBackend {
    /// Which arithmetic the backend runs in.
    public enum Mode: String, Sendable, Hashable, CaseIterable {
        /// Float64 accumulation everywhere: the reference.
        case oracle
        /// FP32, SIMD, all cores: the default.
        case fast
    }

    private enum Engine: Sendable {
        case oracle(OracleEngine)
        case fast(FastEngine)
    }

    /// The layer this backend runs.
    public let layer: MoELayer
    /// The arithmetic mode.
    public let mode: Mode
    private let engine: Engine

    /// Prepares `layer` for `mode`: converts (oracle) or converts and packs (fast) the weights once.
    ///
    /// `storageRows` (fast mode, 16-bit layers): each routed expert's output row is rounded to the storage type
    /// before the combine, the arithmetic of the GPU kernel with `FusedOptions.storageReturns`. Throws when the
    /// selection bias is not finite or is given for the softmax router, and for `storageRows` in oracle mode (the
    /// reference keeps its rows exact).
    public init(layer: MoELayer, mode: Mode = .fast, storageRows: Bool = false) throws(MoEError) {
        try self.init(layer: layer, mode: mode, kernel: .best, storageRows: storageRows)
    }

    /// As `init(layer:mode:storageRows:)`, running fast mode on a given GEMM kernel (for tests of every kernel).
    init(layer: MoELayer, mode: Mode, kernel: GemmKernel, storageRows: Bool = false) throws(MoEError) {
        _ = try Router.checkedBias(layer.weights.selectionBias?.floats(), config: layer.config)
        guard kernel.isSupported else {
            throw MoEError(.unsupported, "this CPU cannot run the \(kernel) GEMM kernel")
        }
        guard !(storageRows && mode == .oracle) else {
            throw MoEError(.unsupported, "storage rows are for the fast CPU mode; the oracle keeps its rows exact")
        }
        self.layer = layer
        self.mode = mode
        switch mode {
        case .oracle: engine = .oracle(OracleEngine(layer: layer))
        case .fast: engine = .fast(FastEngine(layer: layer, kernel: kernel, storageRows: storageRows))
        }
    }

    /// "oracle" or "cpu".
    public var name: String { mode == .oracle ? "oracle" : "cpu" }

    /// Runs the layer on x [S, H] (any element type; rounded to the precision's storage type first).
    ///
    /// S = 0 gives an empty [0, H] output and an empty routing. Throws `MoEError` for a wrong shape, never for
    /// NaN or ±∞ values (docs/nonfinite.md).
    public func forward(_ input: HostTensor) throws(MoEError) -> MoEOutput {
        try layer.checkInput(input)
        let (s, h, k, e) = (input.shape[0], layer.config.hiddenSize, layer.config.topK, layer.config.experts)
        if s == 0 {
            let routing = Routing(
                tokens: 0, topK: k, expertIDs: [], weights: [], slots: [],
                expertLoad: [Int](repeating: 0, count: e))
            return MoEOutput(output: HostTensor.zeros(shape: [0, h]), routing: routing)
        }
        switch engine {
        case .oracle(let o): return try o.forward(input)
        case .fast(let f): return try f.forward(input)
        }
    }
}
