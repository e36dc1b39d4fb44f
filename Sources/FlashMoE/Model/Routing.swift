/// The routing decisions of one forward pass over S tokens.
///
/// Per token t and rank j < k (in selection order, ties to the lower expert id: highest weight first for the
/// softmax router, highest biased choice score first for the sigmoid router; see `Router`):
/// `expertIDs[t·k + j]` is the expert (−1 when unrouted, see `RouterConfig`), `weights[t·k + j]` its combine
/// weight, and `slots[t·k + j]` the token's row in that expert's buffer: its rank among lower-index tokens
/// routed to the same expert, or −1 when dropped by capacity or unrouted.
///
/// Non-finite input (docs/nonfinite.md): an id is always in 0..<E or −1. A rank is unrouted (id −1, weight 0,
/// slot −1) when fewer than k experts have a non-NaN logit; a token with a NaN anywhere in its x has every rank
/// unrouted. An unrouted rank never precedes a routed one and is in no expert's load. Index experts with ids ≥ 0
/// only.
public struct Routing: Sendable, Equatable {
    /// Tokens S.
    public let tokens: Int
    /// Experts per token k.
    public let topK: Int
    /// [S·k] expert ids in rank order; −1 = unrouted.
    public var expertIDs: [Int32]
    /// [S·k] combine weights (after renormalisation and scaling).
    public var weights: [Float]
    /// [S·k] slot of each (token, rank) pair in its expert; −1 = dropped or unrouted.
    public var slots: [Int32]
    /// [E] tokens routed to each expert, before capacity.
    public var expertLoad: [Int]

    /// A routing from its arrays, as given (nothing checks their lengths against S·k and E).
    public init(tokens: Int, topK: Int, expertIDs: [Int32], weights: [Float], slots: [Int32], expertLoad: [Int]) {
        self.tokens = tokens
        self.topK = topK
        self.expertIDs = expertIDs
        self.weights = weights
        self.slots = slots
        self.expertLoad = expertLoad
    }

    /// (token, rank) pairs dropped by capacity (routed, but with no slot).
    public var dropped: Int {
        zip(expertIDs, slots).reduce(0) { $0 + ($1.0 >= 0 && $1.1 < 0 ? 1 : 0) }
    }

    /// Rows each expert actually processes (load clamped to capacity).
    public var expertRows: [Int] {
        var rows = [Int](repeating: 0, count: expertLoad.count)
        for (e, s) in zip(expertIDs, slots) where e >= 0 && s >= 0 { rows[Int(e)] += 1 }
        return rows
    }
}

/// The result of a forward pass: y [S, H] in FP32 and the routing that produced it.
///
/// Non-finite input (docs/nonfinite.md): y[t] sums w·o over the token's kept pairs (unrouted and dropped ranks
/// add nothing, a kept pair adds w·o even at w = 0) plus the shared expert's term. So a token with a NaN in x has
/// y = 0 without a shared expert and NaN with one; a NaN in an expert's weights reaches exactly the tokens with a
/// kept pair on it; an FFN that overflows gives ±∞ or NaN (which one may differ by backend). Every other token's
/// ids, weights and y are bit-identical to the run without the fault (dropless; with a capacity, pairs kept
/// without the fault stay kept).
public struct MoEOutput: Sendable {
    /// The layer output [S, H], FP32.
    public var output: HostTensor
    /// The routing decisions.
    public var routing: Routing

    /// The output and the routing that produced it, as given.
    public init(output: HostTensor, routing: Routing) {
        self.output = output
        self.routing = routing
    }

    /// The output of a call with no tokens: y [0, H], no routing, every expert's load 0.
    public static func noTokens(_ c: MoEConfig) -> MoEOutput {
        MoEOutput(
            output: .zeros(shape: [0, c.hiddenSize]),
            routing: Routing(
                tokens: 0, topK: c.topK, expertIDs: [], weights: [], slots: [],
                expertLoad: [Int](repeating: 0, count: c.experts)))
    }
}

/// Something that runs an MoE layer forward: the CPU backends and the CUDA operator.
public protocol MoEBackend: Sendable {
    /// A short name for logs and the CLI (`cpu`, `oracle`, `cuda`).
    var name: String { get }
    /// The layer this backend was built for.
    var layer: MoELayer { get }
    /// Runs the layer on `input` [S, H] (any storage type; it is rounded to the layer's precision first).
    ///
    /// NaN and ±∞ in `input` or in the weights are data, not errors: no backend throws or traps for them, and all
    /// follow the same rules (docs/nonfinite.md, summarised on `Routing` and `MoEOutput`).
    func forward(_ input: HostTensor) throws -> MoEOutput
}
