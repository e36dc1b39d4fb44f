/// `flashmoe verify`'s checks of storage rows on one GPU (`FusedOptions.storageReturns`): the routed experts'
/// output rows kept in the layer's 16-bit type between GEMM1 and the combine.
extension Verifier {
    /// The layers `storageRowsChecks` runs, with the token counts that reach each GEMM1 path: wide (and half) tiles
    /// of a gated bf16 layer at S = 300, its decode GEMV at S = 3, a plain fp16 layer with biases (b2 added before
    /// the rounding) with I not a multiple of the tile, and a DeepSeek-like bf16 layer whose shared expert keeps
    /// FP32 rows beside the routed ones; the same layer in fp8 (with `FLASHMOE_EXPERIMENTAL_FP8=1`; its TMA
    /// engine's own GEMM1 epilogue, register_epilogues.cuh) at two prefill token counts.
    public static let storageRowsCases: [(name: String, config: MoEConfig, tokens: Int)] = {
        let gated = MoEConfig(hiddenSize: 256, intermediateSize: 192, experts: 16, topK: 4, ffn: .gated,
                              activation: .silu, precision: .bf16)
        let plain = MoEConfig(hiddenSize: 320, intermediateSize: 200, experts: 8, topK: 2, bias: true,
                              activation: .gelu, precision: .fp16)
        let shared = MoEConfig(hiddenSize: 256, intermediateSize: 128, experts: 32, topK: 4, ffn: .gated,
                               activation: .silu, router: .deepSeek(groups: 4, groupsKept: 2, scalingFactor: 2.5),
                               sharedExpert: SharedExpertConfig(intermediateSize: 256, gated: false), precision: .bf16)
        var fp8Shared = shared
        fp8Shared.precision = .fp8
        return [("bf16 gated S=300", gated, 300), ("bf16 gated S=3 (decode)", gated, 3),
                ("fp16 plain + biases S=500", plain, 500), ("bf16 shared expert S=200", shared, 200),
                ("fp8 shared expert S=600", fp8Shared, 600), ("fp8 shared expert S=2048", fp8Shared, 2048)]
    }()

    /// Per `storageRowsCases` layer, on fresh random inputs with the output poisoned before every launch:
    /// - storage rows against FP32 rows on the GPU: the same routing, y within the precision's tolerance, and not
    ///   the same bits (the option took effect);
    /// - storage rows on the GPU against the CPU backend's storage rows (`CPUBackend(storageRows:)`, the same
    ///   rounding of each expert row) within tolerance, and against the oracle within tolerance;
    /// - two launches give the same bits.
    public static func storageRowsChecks(deviceOrdinal: Int, seed: UInt64 = 1) -> [DeviceForwardCheck] {
        // fp8 cases only with the kernel's fp8 path on, as deviceForwardChecks does (they are the last cases, so
        // the others keep their seeds).
        storageRowsCases.filter { $0.config.precision != .fp8 || FusedSpecialization.supportsFP8 }.enumerated().map {
            i, entry in
            let name = "storage rows, \(entry.name)"
            do {
                let (failure, detail) = try storageRowsCheck(
                    entry.config, tokens: entry.tokens, seed: seed &+ 300 &+ UInt64(i), deviceOrdinal: deviceOrdinal)
                return DeviceForwardCheck(name: name, failure: failure, detail: detail)
            } catch {
                return DeviceForwardCheck(name: name, failure: "\(error)", detail: "error")
            }
        }
    }

    private static func storageRowsCheck(_ config: MoEConfig, tokens s: Int, seed: UInt64, deviceOrdinal: Int) throws
        -> (String?, String)
    {
        let c = VerificationCase(name: "storage rows", config: config, tokens: s, seed: seed)
        let (layer, x) = try makeProblem(c)
        var options = FusedOptions(deviceOrdinal: deviceOrdinal, poisonOutput: true)
        let fp32 = try FusedMoE(layer: layer, options: options).forward(x)
        options.storageReturns = true
        let op = try FusedMoE(layer: layer, options: options)
        let rows = try op.forward(x), again = try op.forward(x)
        let cpu = try CPUBackend(layer: layer, mode: .fast, storageRows: true).forward(x)
        let oracle = try CPUBackend(layer: layer, mode: .oracle).forward(x)
        let y = rows.output.floats()
        let vsFP32 = relativeError(y, fp32.output.floats())
        let vsCPU = relativeError(y, cpu.output.floats())
        let vsOracle = relativeError(y, oracle.output.floats())
        let tolerance = config.precision.tolerance(for: .tensorCores)
        let detail = "rel.err vs FP32 rows \(Float(vsFP32)), vs CPU storage rows \(Float(vsCPU)), vs oracle "
            + "\(Float(vsOracle)) (tol \(tolerance))"
        if !sameRouting(rows, fp32) { return ("storage rows changed the routing", detail) }
        if sameBits(rows, fp32) {
            return ("storage rows gave FP32 rows' bits: the option did not reach the kernel", detail)
        }
        if !sameBits(rows, again) { return ("two launches gave different bits", detail) }
        for (what, e) in [("FP32 rows", vsFP32), ("the CPU's storage rows", vsCPU), ("the oracle", vsOracle)]
        where !(e <= tolerance) {
            return ("y is \(e) from \(what), above the tolerance \(tolerance)", detail)
        }
        return (nil, detail)
    }
}
