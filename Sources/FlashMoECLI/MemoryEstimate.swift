import FlashMoE

/// The host memory a command will need for a layer and a token count, by part, so it can refuse up front
/// instead of being killed mid-way. The numbers are estimates from the shapes (within a few percent).
struct MemoryEstimate: Sendable, Equatable {
    /// The layer's tensors in the precision's storage type.
    var weights: Int
    /// Scratch while making the weights: random FP32 values of the largest tensor before rounding to 16 bits.
    var scratch: Int
    /// The backend's own host copy: the fast CPU backend packs every matrix again, widened to FP32.
    var backendCopy: Int
    /// Input, output and the forward pass's working buffers.
    var activations: Int

    /// Whether the weights are stored in 32 bits (so a 16-bit precision would halve them).
    var wideStorage: Bool
    /// Whether the plan runs on the CPU (so a GPU would need less host memory).
    var onHost: Bool

    /// Everything together.
    var total: Int { weights + scratch + backendCopy + activations }

    /// The estimate for `config` at `tokens` tokens on `backend` (`.cpu`, `.oracle` or `.cuda`). Computed in
    /// Float64, so absurd shapes give huge numbers instead of overflowing.
    init(config c: MoEConfig, tokens: Int, backend: BackendKind, randomWeights: Bool) {
        let (e, h, i) = (Double(c.experts), Double(c.hiddenSize), Double(c.intermediateSize))
        let (s, k) = (Double(tokens), Double(c.topK))
        let matrices: Double = c.ffn == .gated ? 3 : 2
        let expertElements = e * i * h
        var elements = e * h + expertElements * matrices
        if let shared = c.sharedExpert {
            elements += Double(shared.intermediateSize) * h * matrices + (shared.gated ? h : 0)
        }
        let fp32Extras = (c.bias ? e * (i + h) : 0) + (c.router.selectionBias ? e : 0)
        let storageBytes = Double(c.precision.storage.byteSize)
        let io = 2 * s * h * 4
        var copy = 0.0
        var work = io
        switch backend {
        case .cpu, .auto:
            copy = (elements + fp32Extras) * 4
            work += s * e * 4 + s * k * (2 * h + Double(c.firstLayerRows)) * 4
        case .oracle:
            work += s * e * 8 + s * h * 8 + s * k * h * 8
        case .cuda:
            break
        }
        wideStorage = storageBytes == 4
        onHost = backend != .cuda
        weights = Self.bytes(elements * storageBytes + fp32Extras * 4)
        // fp8 quantizes the BF16 experts once: both copies exist while it does (docs/fp8.md).
        let fp8Copy = c.precision == .fp8 ? expertElements * matrices : 0
        scratch = Self.bytes((randomWeights && storageBytes != 4 ? expertElements * 4 : 0) + fp8Copy)
        backendCopy = Self.bytes(copy)
        activations = Self.bytes(work)
    }

    /// The most bytes any part is taken to be: far beyond any machine, and four of them still fit in an `Int`.
    static let limit = 1 << 60

    private static func bytes(_ d: Double) -> Int { d >= Double(limit) ? limit : Int(d) }

    /// Throws when the estimate exceeds `available` bytes (nothing is checked when `available` is unknown).
    /// `subject` names what is being built ("random weights for --preset deepseek-v3 at fp32 on the cpu backend").
    func check(available: Int?, subject: String) throws(CLIError) {
        if total >= Self.limit {
            throw CLIError(
                .insufficientMemory,
                "\(subject) would need more than \(formatByteCount(Self.limit)) of memory: the shape or token count is "
                    + "far too large; check --tokens, --hidden, --intermediate and --experts")
        }
        guard let available, total > available else { return }
        var parts = ["weights \(formatByteCount(weights))"]
        if scratch > 0 { parts.append("scratch while generating them \(formatByteCount(scratch))") }
        if backendCopy > 0 { parts.append("the CPU backend's packed FP32 copy \(formatByteCount(backendCopy))") }
        parts.append("activations \(formatByteCount(activations))")
        var remedies = ["a smaller layer (e.g. fewer --experts or a smaller --intermediate)", "fewer --tokens"]
        if wideStorage { remedies.append("--precision bf16 (halves the weights)") }
        if onHost { remedies.append("a machine with a GPU") }
        throw CLIError(
            .insufficientMemory,
            "\(subject) needs about \(formatByteCount(total)) of memory (\(parts.joined(separator: ", "))) but only "
                + "\(formatByteCount(available)) is available: choose \(remedies.joined(separator: ", "))")
    }
}
