import FlashMoE

/// The roofline floor of one forward pass on the reference GPU, by the method of docs/performance.md:
/// max(FLOPs / matmul rate, bytes / copy bandwidth), where the bytes are those a forward must move at least once:
/// the weights of the experts it touches, the router (and selection bias), the shared expert, the input in the
/// storage type and the FP32 output.
///
/// The rates are the H200's, measured with torch 2.11 (docs/performance.md, "Reference rates"): dense matmul 773 TFLOP/s in BF16 (FP16 is
/// taken to be the same), 415 in TF32, 50 in FP32; device copy 4.2 TB/s.
enum Roofline {
    /// The GPU the rates were measured on.
    static let referenceDevice = "H200"
    /// Device-to-device copy bandwidth, bytes per second.
    static let copyBytesPerSecond = 4.2e12

    /// Dense matmul rate in FLOP/s for `precision`.
    static func matmulFlopsPerSecond(_ precision: Precision) -> Double {
        switch precision {
        case .bf16, .fp16: 773e12
        case .tf32: 415e12
        case .fp32: 50e12
        case .fp8: 2 * 773e12  // not measured: FP8 tensor cores run at twice the BF16 rate
        }
    }

    /// Bytes a forward over `tokens` tokens moves at least once when it touches `expertsTouched` experts.
    static func bytes(config c: MoEConfig, tokens: Int, expertsTouched: Int) -> Double {
        let storage = Double(c.precision.storage.byteSize)
        let (h, i) = (Double(c.hiddenSize), Double(c.intermediateSize))
        let matrices: Double = c.ffn == .gated ? 3 : 2
        let expert = Double(c.precision.expertWeights.byteSize)  // fp8: one byte (block scales are 1/16384 of it)
        var b = Double(expertsTouched) * matrices * h * i * expert
        b += Double(c.experts) * h * storage + (c.router.selectionBias ? Double(c.experts) * 4 : 0)
        if let s = c.sharedExpert { b += matrices * h * Double(s.intermediateSize) * storage }
        if c.bias { b += Double(expertsTouched) * (i + h) * 4 }
        b += Double(tokens) * h * (storage + 4)
        return b
    }

    /// The floor in milliseconds.
    static func floorMilliseconds(config: MoEConfig, tokens: Int, expertsTouched: Int) -> Double {
        let compute = config.flops(tokens: tokens) / matmulFlopsPerSecond(config.precision)
        let memory = bytes(config: config, tokens: tokens, expertsTouched: expertsTouched) / copyBytesPerSecond
        return max(compute, memory) * 1e3
    }
}
