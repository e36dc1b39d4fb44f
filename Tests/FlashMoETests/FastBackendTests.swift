import Testing

@testable import FlashMoE

/// The fast CPU backend against the oracle, within each precision's tolerance.
@Suite struct FastBackendTests {
    /// The oracle sweep in FP32, BF16 and FP16, plus the extra cases.
    static let sweep: [OracleTests.Case] =
        [Precision.fp32, .bf16, .fp16].flatMap { p in
            OracleTests.sweep.map { c in
                var config = c.config
                config.precision = p
                return OracleTests.Case(config: config, tokens: c.tokens)
            }
        } + OracleTests.extra

    /// Routing must agree exactly and the outputs within the precision's tolerance.
    static func compare(_ layer: MoELayer, _ x: HostTensor, kernel: GemmKernel = .best) throws {
        let fast = try CPUBackend(layer: layer, mode: .fast, kernel: kernel).forward(x)
        let oracle = try CPUBackend(layer: layer, mode: .oracle).forward(x)
        #expect(fast.routing.expertIDs == oracle.routing.expertIDs)
        #expect(fast.routing.slots == oracle.routing.slots)
        #expect(fast.routing.expertLoad == oracle.routing.expertLoad)
        #expect(relativeError(fast.routing.weights, oracle.routing.weights) < 1e-5)
        #expect(fast.output.shape == oracle.output.shape)
        #expect(relativeError(fast.output.floats(), oracle.output.floats()) <= layer.config.precision.tolerance)
    }

    /// The whole sweep on every GEMM kernel this CPU has.
    @Test(arguments: sweep, GemmKernel.allCases.filter(\.isSupported))
    func fastMatchesOracle(_ c: OracleTests.Case, kernel: GemmKernel) throws {
        let layer = try Fixture.layer(c.config)
        try Self.compare(
            layer, Fixture.input(tokens: c.tokens, hidden: c.config.hiddenSize, scale: 2), kernel: kernel)
    }

    /// Every GEMM kernel this CPU has, on shapes that leave partial row tiles and partial panels, with more rows
    /// per expert than one row chunk of the kernel (96).
    @Test(arguments: GemmKernel.allCases.filter(\.isSupported))
    func everyKernelMatchesOracle(_ kernel: GemmKernel) throws {
        let shapes: [(h: Int, i: Int, e: Int, k: Int, s: Int)] = [
            (37, 45, 4, 2, 23), (64, 48, 2, 1, 300), (16, 300, 8, 3, 13), (290, 33, 3, 2, 9),
        ]
        for (n, sh) in shapes.enumerated() {
            let config = MoEConfig(
                hiddenSize: sh.h, intermediateSize: sh.i, experts: sh.e, topK: sh.k, ffn: n % 2 == 0 ? .plain : .gated,
                bias: n % 2 == 0, activation: .silu, router: .softmax(renormalize: true),
                sharedExpert: SharedExpertConfig(intermediateSize: 19, gated: n == 1))
            try Self.compare(Fixture.layer(config), Fixture.input(tokens: sh.s, hidden: sh.h), kernel: kernel)
        }
    }

    @Test(arguments: CPUBackend.Mode.allCases)
    func emptyAndSingleToken(_ mode: CPUBackend.Mode) throws {
        let config = Fixture.config(
            router: .deepSeek(groups: 4, groupsKept: 2, scalingFactor: 2.5), ffn: .gated, bias: false,
            activation: .silu, capacity: .factor(1), shared: SharedExpertConfig(intermediateSize: 8))
        let layer = try Fixture.layer(config)
        let backend = try CPUBackend(layer: layer, mode: mode)
        let empty = try backend.forward(HostTensor.zeros(shape: [0, 32]))
        #expect(empty.output.shape == [0, 32])
        #expect(empty.output.count == 0)
        #expect(empty.routing.tokens == 0 && empty.routing.expertIDs.isEmpty && empty.routing.slots.isEmpty)
        #expect(empty.routing.expertLoad == [Int](repeating: 0, count: 8))
        try Self.compare(layer, Fixture.input(tokens: 0, hidden: 32))
        try Self.compare(layer, Fixture.input(tokens: 1, hidden: 32))
    }

    @Test func namesAndDefaults() throws {
        let layer = try Fixture.layer(
            Fixture.config(
                router: .softmax(renormalize: true), ffn: .plain, bias: false, activation: .relu,
                capacity: .dropless))
        #expect(try CPUBackend(layer: layer).name == "cpu")
        #expect(try CPUBackend(layer: layer).mode == .fast)
        #expect(try CPUBackend(layer: layer, mode: .oracle).name == "oracle")
    }

    /// Same bits on every call, and inputs stored in another element type are rounded like FP32 inputs.
    @Test func deterministicAndInputTypeIndependent() throws {
        let config = Fixture.config(
            router: .softmax(renormalize: true), ffn: .gated, bias: false, activation: .gelu, capacity: .dropless,
            precision: .bf16)
        let backend = try CPUBackend(layer: Fixture.layer(config), mode: .fast)
        let x32 = try Fixture.input(tokens: 29, hidden: 32)
        let a = try backend.forward(x32), b = try backend.forward(x32)
        #expect(a.output == b.output && a.routing == b.routing)
        let c = try backend.forward(x32.converted(to: .bfloat16))
        #expect(c.output == a.output)
    }

    /// Weights that arrive in another element type are converted once to the precision's storage type.
    @Test func weightsInAnyElementType() throws {
        let config = Fixture.config(
            router: .softmax(renormalize: true), ffn: .plain, bias: true, activation: .relu, capacity: .dropless,
            precision: .fp16)
        let w = try MoEWeights.random(config: config, seed: 3)
        let asFP32 = try MoELayer(config: config, weights: w.converted(to: .float32))
        let asBF16 = try MoELayer(config: config, weights: w.converted(to: .bfloat16))
        let x = try Fixture.input(tokens: 11, hidden: 32)
        for mode in CPUBackend.Mode.allCases {
            let native = try CPUBackend(layer: MoELayer(config: config, weights: w), mode: mode).forward(x)
            #expect(try CPUBackend(layer: asFP32, mode: mode).forward(x).output == native.output)
            // BF16 → FP16 is another rounding, so only the tolerance holds.
            let other = try CPUBackend(layer: asBF16, mode: mode).forward(x)
            #expect(relativeError(other.output.floats(), native.output.floats()) < 2e-2)
        }
    }
}
