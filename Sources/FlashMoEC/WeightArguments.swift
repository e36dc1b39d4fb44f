import CFlashMoEABI
import FlashMoE

extension WeightPointers {
    /// The caller's `flashmoe_weights_t` checked against the config: the struct's size and version, the layout,
    /// every pointer the layer needs present and aligned to its element type, every other pointer NULL (a pointer
    /// the layer would ignore is a mistake in the caller's config or weights). Works for host and device pointers
    /// alike: nothing is dereferenced here.
    init(checking pointer: UnsafePointer<flashmoe_weights_t>?, config c: MoEConfig) throws(ArgumentError) {
        // 0.5 added the FP8 block scales at the end; a 0.4 caller's struct stops before them.
        let w = try Check.versionedStruct(
            pointer, "weights", initMacro: "FLASHMOE_WEIGHTS_INIT", version: { $0.version },
            older: (MemoryLayout<flashmoe_weights_t>.offset(of: \.gate_up_scale)!, 500))
        let fused: Bool = try Check.enumeration(
            w.layout, "weights->layout", [(0, "FLASHMOE_LAYOUT_FUSED", true), (1, "FLASHMOE_LAYOUT_SEPARATE", false)])
        let gated = c.ffn == .gated
        let scales = try Self.expertScaleFields(w, config: c, fused: fused)
        // (bytes, name) of the storage type, and of the routed experts' matrices (E4M3 codes when scaled).
        let storage = (c.precision.storage.byteSize, "\(c.precision.storage) for \(c.precision)")
        let expert = scales == nil ? storage : (1, "E4M3 codes, with their *_scale")

        func address(_ p: UnsafeRawPointer?) -> UInt64 { UInt64(UInt(bitPattern: p)) }
        func required(
            _ p: UnsafeRawPointer?, _ field: String, _ shape: String, float32: Bool = false,
            type: (bytes: Int, name: String)? = nil, because: String
        ) throws(ArgumentError) -> UInt64 {
            let t = float32 ? (4, "float32") : type ?? storage
            guard p != nil else {
                throw ArgumentError("weights->\(field) is NULL but \(because) needs it: pass \(shape) (\(t.1))")
            }
            try Check.aligned(UInt(address(p)), "weights->\(field)", t.0, t.1)
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
            firstLayer = .fused(try required(w.gate_up, "gate_up", gateUpShape, type: expert, because: "\(layoutName)"))
        } else {
            try absent(w.gate_up, "gate_up", "the layout is FLASHMOE_LAYOUT_SEPARATE (pass gate and up); set layout = FUSED to pass gate_up")
            let gate = try required(w.gate, "gate", "W1 [E, I, H]", type: expert, because: "\(layoutName)")
            if gated {
                firstLayer = .separate(
                    gate: gate, up: try required(w.up, "up", "W3 [E, I, H]", type: expert, because: "a gated FFN"))
            } else {
                try absent(w.up, "up", "the FFN is plain (config->ffn = FLASHMOE_FFN_PLAIN) and has no up projection")
                firstLayer = .separate(gate: gate, up: nil)
            }
        }
        let down = try required(w.down, "down", "W2 [E, H, I]", type: expert, because: "every layer")

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
            sharedFirstLayer: sharedFirst, sharedDown: sharedDown, sharedGate: sharedGate, expertScales: scales)
    }

    /// The FP8 block scales of `w`: nil when every *_scale field is NULL (the expert matrices in the storage type);
    /// for an fp8 layer, the layout's scales, checked present, aligned and usable; for any other layer an error.
    private static func expertScaleFields(_ w: flashmoe_weights_t, config c: MoEConfig, fused: Bool)
        throws(ArgumentError) -> ExpertScales?
    {
        func address(_ p: UnsafePointer<Float>?) -> UInt64 { UInt64(UInt(bitPattern: p)) }
        let fields: [(String, UnsafePointer<Float>?)] = [
            ("gate_up_scale", w.gate_up_scale), ("gate_scale", w.gate_scale), ("up_scale", w.up_scale),
            ("down_scale", w.down_scale),
        ]
        guard let given = fields.first(where: { $0.1 != nil }) else { return nil }
        guard c.precision == .fp8 else {
            throw ArgumentError(
                "weights->\(given.0) must be NULL: block scales are for FLASHMOE_PRECISION_FP8 layers with E4M3 "
                    + "expert matrices, and config->precision is \(c.precision)")
        }
        let gated = c.ffn == .gated
        let rows = gated && fused ? "ceil(2I / 128)" : "ceil(I / 128)"
        let wanted: [(String, String)] =
            (fused ? [("gate_up_scale", "[E, \(rows), ceil(H / 128)]")]
                : [("gate_scale", "[E, ceil(I / 128), ceil(H / 128)]")]
                    + (gated ? [("up_scale", "[E, ceil(I / 128), ceil(H / 128)]")] : []))
            + [("down_scale", "[E, ceil(H / 128), ceil(I / 128)]")]
        let layout = fused ? "FLASHMOE_LAYOUT_FUSED" : "FLASHMOE_LAYOUT_SEPARATE"
        var found: [String: UInt64] = [:]
        for (name, pointer) in fields {
            guard let shape = wanted.first(where: { $0.0 == name })?.1 else {
                guard pointer == nil else {
                    throw ArgumentError(
                        "weights->\(name) must be NULL with \(layout)\(gated ? "" : " and a plain FFN"): pass "
                            + wanted.map(\.0).joined(separator: ", "))
                }
                continue
            }
            guard let pointer else {
                throw ArgumentError(
                    "weights->\(name) is NULL but weights->\(given.0) is set: E4M3 expert matrices need every scale "
                        + "of the layout (\(wanted.map(\.0).joined(separator: ", "))); pass \(shape) float32, or "
                        + "set every *_scale to NULL to pass bfloat16 matrices that create quantizes")
            }
            try Check.aligned(UInt(address(pointer)), "weights->\(name)", 4, "float32")
            found[name] = address(pointer)
        }
        if fused && gated && c.intermediateSize % 128 != 0 {
            throw ArgumentError(
                "weights->gate_up_scale: with I = \(c.intermediateSize), not a multiple of 128, a 128-row scale "
                    + "block of gate_up would hold gate and up rows; pass gate, up, gate_scale and up_scale "
                    + "(FLASHMOE_LAYOUT_SEPARATE) instead")
        }
        let first: FirstLayer =
            fused ? .fused(found["gate_up_scale"]!) : .separate(gate: found["gate_scale"]!, up: found["up_scale"])
        return ExpertScales(firstLayer: first, down: found["down_scale"]!)
    }
}
