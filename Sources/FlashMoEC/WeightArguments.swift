import CFlashMoEABI
import FlashMoE

extension WeightPointers {
    /// The caller's `flashmoe_weights_t` checked against the config: the struct's size and version, the layout,
    /// every pointer the layer needs present and aligned to its element type, every other pointer NULL (a pointer
    /// the layer would ignore is a mistake in the caller's config or weights). Works for host and device pointers
    /// alike: nothing is dereferenced here.
    init(checking pointer: UnsafePointer<flashmoe_weights_t>?, config c: MoEConfig) throws(ArgumentError) {
        let w = try Check.versionedStruct(
            pointer, "weights", initMacro: "FLASHMOE_WEIGHTS_INIT", version: { $0.version })
        let fused: Bool = try Check.enumeration(
            w.layout, "weights->layout", [(0, "FLASHMOE_LAYOUT_FUSED", true), (1, "FLASHMOE_LAYOUT_SEPARATE", false)])
        let element = c.precision.storage.byteSize
        let storage = "\(c.precision.storage) for \(c.precision)"
        let gated = c.ffn == .gated

        func address(_ p: UnsafeRawPointer?) -> UInt64 { UInt64(UInt(bitPattern: p)) }
        func required(_ p: UnsafeRawPointer?, _ field: String, _ shape: String, float32: Bool = false, because: String)
            throws(ArgumentError) -> UInt64
        {
            guard p != nil else {
                throw ArgumentError("weights->\(field) is NULL but \(because) needs it: pass \(shape) (\(float32 ? "float32" : storage))")
            }
            try Check.aligned(UInt(address(p)), "weights->\(field)", float32 ? 4 : element, float32 ? "float32" : storage)
            return address(p)
        }
        func absent(_ p: UnsafeRawPointer?, _ field: String, _ why: String) throws(ArgumentError) {
            guard p == nil else { throw ArgumentError("weights->\(field) must be NULL: \(why)") }
        }
        let layoutName = fused ? "FLASHMOE_LAYOUT_FUSED" : "FLASHMOE_LAYOUT_SEPARATE"

        let router = try required(w.router, "router", "[E, H]", because: "every layer")
        let selectionBias: UInt64?
        if c.router.selectionBias {
            selectionBias = try required(
                w.selection_bias, "selection_bias", "[E]", float32: true, because: "config->selection_bias = 1")
        } else {
            try absent(w.selection_bias, "selection_bias", "config->selection_bias is 0")
            selectionBias = nil
        }

        let firstLayer: FirstLayer
        let gateUpShape = gated ? "[E, 2I, H]" : "W1 [E, I, H]"
        if fused {
            try absent(w.gate, "gate", "the layout is FLASHMOE_LAYOUT_FUSED (gate_up holds it); set layout = SEPARATE to pass gate and up")
            try absent(w.up, "up", "the layout is FLASHMOE_LAYOUT_FUSED (gate_up holds it); set layout = SEPARATE to pass gate and up")
            firstLayer = .fused(try required(w.gate_up, "gate_up", gateUpShape, because: "\(layoutName)"))
        } else {
            try absent(w.gate_up, "gate_up", "the layout is FLASHMOE_LAYOUT_SEPARATE (pass gate and up); set layout = FUSED to pass gate_up")
            let gate = try required(w.gate, "gate", "W1 [E, I, H]", because: "\(layoutName)")
            if gated {
                firstLayer = .separate(gate: gate, up: try required(w.up, "up", "W3 [E, I, H]", because: "a gated FFN"))
            } else {
                try absent(w.up, "up", "the FFN is plain (config->ffn = FLASHMOE_FFN_PLAIN) and has no up projection")
                firstLayer = .separate(gate: gate, up: nil)
            }
        }
        let down = try required(w.down, "down", "W2 [E, H, I]", because: "every layer")

        var b1: UInt64?, b2: UInt64?
        if c.bias {
            b1 = try required(w.b1, "b1", "[E, I]", float32: true, because: "config->bias = 1")
            b2 = try required(w.b2, "b2", "[E, H]", float32: true, because: "config->bias = 1")
        } else {
            try absent(w.b1, "b1", "config->bias is 0")
            try absent(w.b2, "b2", "config->bias is 0")
        }

        var sharedFirst: FirstLayer?, sharedDown: UInt64?, sharedGate: UInt64?
        if let s = c.sharedExpert {
            let because = "config->shared_intermediate = \(s.intermediateSize)"
            let firstShape = fused && gated ? "[2·IS, H]" : "W1 [IS, H]"
            let first = try required(w.shared_gate_up, "shared_gate_up", firstShape, because: because)
            if fused || !gated {
                try absent(w.shared_up, "shared_up", fused
                    ? "the layout is FLASHMOE_LAYOUT_FUSED (shared_gate_up holds both)"
                    : "the FFN is plain and has no up projection")
                sharedFirst = fused ? .fused(first) : .separate(gate: first, up: nil)
            } else {
                sharedFirst = .separate(
                    gate: first, up: try required(w.shared_up, "shared_up", "W3 [IS, H]", because: "a gated shared expert"))
            }
            sharedDown = try required(w.shared_down, "shared_down", "[H, IS]", because: because)
            if s.gated {
                sharedGate = try required(w.shared_gate, "shared_gate", "[H]", because: "config->shared_gated = 1")
            } else {
                try absent(w.shared_gate, "shared_gate", "config->shared_gated is 0")
            }
        } else {
            let why = "config->shared_intermediate is 0 (no shared expert)"
            try absent(w.shared_gate_up, "shared_gate_up", why)
            try absent(w.shared_up, "shared_up", why)
            try absent(w.shared_down, "shared_down", why)
            try absent(w.shared_gate, "shared_gate", why)
        }
        self.init(
            router: router, selectionBias: selectionBias, firstLayer: firstLayer, down: down, b1: b1, b2: b2,
            sharedFirstLayer: sharedFirst, sharedDown: sharedDown, sharedGate: sharedGate)
    }
}
