import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// `flashmoe run` end to end on the CPU, in-process.
@Suite struct RunCommandTests {
    /// The overrides below applied by hand to paper-e32.
    static let overridden = MoEConfig(
        hiddenSize: 48, intermediateSize: 40, experts: 6, topK: 3, ffn: .gated, activation: .silu,
        router: .softmax(renormalize: false), sharedExpert: SharedExpertConfig(intermediateSize: 16))

    @Test func presetWithOverridesWritesWhatTheCPUBackendComputes() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/out.safetensors"
            let run = try flashmoeRun([
                "--preset", "paper-e32", "--hidden", "48", "--intermediate", "40", "--experts", "6", "--top-k", "3",
                "--ffn", "gated", "--activation", "silu", "--router", "softmax-norenorm", "--shared-intermediate", "16",
                "--tokens", "10", "--seed", "5", "--backend", "cpu", "--output", path,
            ])
            let layer = try MoELayer(
                config: Self.overridden, weights: MoEWeights.random(config: Self.overridden, seed: 5))
            let x = randomInput(tokens: 10, hidden: 48, seed: 5)
            let expected = try CPUBackend(layer: layer).forward(x)
            #expect(run.result.output == expected.output)
            #expect(run.result.routing == expected.routing)

            let file = try Safetensors.read(path: path)
            #expect(Set(file.keys) == ["y", "topk_ids", "topk_weights"])
            let y = try #require(file["y"])
            let ids = try #require(file["topk_ids"])
            let w = try #require(file["topk_weights"])
            #expect(y.dtype == .float32 && y.shape == [10, 48])
            #expect(try y.values(as: Float.self) == expected.output.floats())
            #expect(ids.dtype == .int32 && ids.shape == [10, 3])
            #expect(try ids.values(as: Int32.self) == expected.routing.expertIDs)
            #expect(w.dtype == .float32 && w.shape == [10, 3])
            #expect(try w.values(as: Float.self) == expected.routing.weights)

            #expect(run.lines[0] == "backend: cpu (--backend cpu)")
            #expect(
                run.text.contains(
                    "layer: paper-e32 with overrides, random weights (seed 5): H=48 I=40 E=6 k=3, gated FFN, silu, "
                        + "softmax top-k not renormalised, shared expert I=16, dropless, fp32"))
            #expect(run.text.contains("input: random [10, 48] (seed 5)"))
            #expect(run.text.contains("y [10, 48] F32, topk_ids [10, 3] I32, topk_weights [10, 3] F32"))
            let load = LoadSummary(expected.routing)
            #expect(
                run.text.contains(
                    "expert load: min \(load.minimum) / mean 5.0 / max \(load.maximum) tokens over 6 experts"))
            #expect(run.text.contains("dropped 0 of 30 (token, expert) pairs"))
            #expect(run.text.contains(OutputNorms(expected.output.floats()).text))
            #expect(run.text.contains("wrote \(path)"))
        }
    }

    @Test func randomInputIsNotZeroAndDependsOnTheSeed() {
        let a = randomInput(tokens: 4, hidden: 8, seed: 0).floats()
        #expect(a.allSatisfy { $0 >= -1 && $0 < 1 } && a.filter { $0 != 0 }.count == a.count)
        #expect(a != randomInput(tokens: 4, hidden: 8, seed: 1).floats())
    }

    @Test func capacityFactorAndPrecisionReachTheLayer() throws {
        let run = try flashmoeRun([
            "--hidden", "16", "--intermediate", "8", "--experts", "4", "--tokens", "32", "--capacity-factor", "0.5",
            "--precision", "bf16", "--backend", "oracle",
        ])
        #expect(run.lines[0] == "backend: oracle (--backend oracle)")
        #expect(run.text.contains("capacity factor 0.5, bf16"))
        // Capacity ceil(ceil(32/4)·2·0.5) = 8 per expert: 64 routed pairs, at most 32 kept.
        #expect(run.result.routing.dropped >= 32)
        #expect(run.text.contains("dropped \(run.result.routing.dropped) of 64"))
    }

    @Test(arguments: [ElementType.bfloat16, .float16, .float32])
    func inputFromAFileOfAnyFloatType(_ type: ElementType) throws {
        try withTemporaryDirectory { dir in
            let x = try HostTensor(shape: [5, 32], values: (0..<160).map { Float($0 % 17) / 8 - 1 }, as: type)
            try Safetensors.write(
                ["x": SafetensorsTensor(x), "other": SafetensorsTensor(shape: [1], values: [Int32(3)])],
                to: dir + "/x.safetensors")
            let run = try flashmoeRun([
                "--hidden", "32", "--intermediate", "16", "--experts", "4", "--seed", "3", "--backend", "cpu",
                "--input", dir + "/x.safetensors",
            ])
            var config = Preset.paperE32.config
            (config.hiddenSize, config.intermediateSize, config.experts) = (32, 16, 4)
            let layer = try MoELayer(config: config, weights: MoEWeights.random(config: config, seed: 3))
            #expect(run.result.output == (try CPUBackend(layer: layer).forward(x)).output)
            #expect(run.text.contains("input: x [5, 32] \(type) from \(dir)/x.safetensors"))
        }
    }

    @Test func float64InputIsRoundedToFloat32() throws {
        try withTemporaryDirectory { dir in
            let values = (0..<48).map { Double($0) / 7 - 3 }
            try Safetensors.write(["x": SafetensorsTensor(shape: [3, 16], values: values)], to: dir + "/x.safetensors")
            let run = try flashmoeRun([
                "--hidden", "16", "--intermediate", "8", "--experts", "4", "--backend", "cpu", "--input",
                dir + "/x.safetensors",
            ])
            var config = Preset.paperE32.config
            (config.hiddenSize, config.intermediateSize, config.experts) = (16, 8, 4)
            let layer = try MoELayer(config: config, weights: MoEWeights.random(config: config, seed: 0))
            let x = try HostTensor(shape: [3, 16], float32: values.map { Float($0) })
            #expect(run.result.output == (try CPUBackend(layer: layer).forward(x)).output)
        }
    }

    @Test func checkpointLayerRunsOnTheOracle() throws {
        let config = MoEConfig(
            hiddenSize: 16, intermediateSize: 8, experts: 4, topK: 2, ffn: .gated, activation: .silu,
            router: .softmax(renormalize: true))
        let original = try MoELayer(config: config, weights: MoEWeights.random(config: config, seed: 9))
        try withTemporaryDirectory { dir in
            try CheckpointWriter.saveMoELayer(original, family: .qwen3Moe, to: dir, layerIndex: 1, hiddenLayers: 2)
            let run = try flashmoeRun([
                "--checkpoint", dir, "--layer", "1", "--tokens", "6", "--backend", "oracle", "--output",
                dir + "/y.safetensors",
            ])
            let expected = try CPUBackend(layer: original, mode: .oracle).forward(
                randomInput(tokens: 6, hidden: 16, seed: 0))
            #expect(run.result.output == expected.output && run.result.routing == expected.routing)
            #expect(run.text.contains("layer: layer 1 of \(dir): H=16 I=8 E=4 k=2, gated FFN, silu"))
            let y = try #require(try Safetensors.read(path: dir + "/y.safetensors")["y"])
            #expect(try y.values(as: Float.self) == expected.output.floats())

            expectCommandFailure(mentioning: ["--layer N"]) { try flashmoeRun(["--checkpoint", dir, "--tokens", "2"]) }
            expectCommandFailure(mentioning: ["--tokens S or --input FILE"]) {
                try flashmoeRun(["--checkpoint", dir, "--layer", "1"])
            }
            expectCommandFailure(mentioning: ["--experts", "config.json"]) {
                try flashmoeRun(["--checkpoint", dir, "--layer", "1", "--tokens", "2", "--experts", "8"])
            }
            let error = expectCommandFailure(mentioning: ["layer 5 does not exist"]) {
                try flashmoeRun(["--checkpoint", dir, "--layer", "5", "--tokens", "2"])
            }
            #expect((error as? CheckpointError)?.kind == .layerOutOfRange)
        }
    }

    @Test func zeroTokensWriteEmptyTensors() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/empty.safetensors"
            let run = try flashmoeRun([
                "--hidden", "16", "--intermediate", "8", "--experts", "4", "--tokens", "0", "--backend", "cpu",
                "--output", path,
            ])
            #expect(run.result.output.shape == [0, 16])
            #expect(run.text.contains("min 0 / mean 0.0 / max 0 tokens over 4 experts (0 used); dropped 0 of 0"))
            let file = try Safetensors.read(path: path)
            #expect(file["y"]?.shape == [0, 16] && file["y"]?.data.isEmpty == true)
            #expect(file["topk_ids"]?.shape == [0, 2] && file["topk_weights"]?.shape == [0, 2])
        }
    }

    @Test func noArgumentsMeanPaperE32WithItsTokensInFP32() {
        // One byte of memory stops the run before any weight is made; the message shows the defaults.
        let error = expectCommandFailure(mentioning: ["paper-e32, random weights (seed 0) at fp32", "with 8192 tokens"])
        {
            try flashmoeRun([], context: .noGPU(memory: 1))
        }
        #expect((error as? CLIError)?.kind == .insufficientMemory)
    }

    @Test func refusesLayersThatDoNotFitInMemory() {
        let error = expectCommandFailure(mentioning: ["deepseek-v3", "needs about", "is available", "--precision bf16"])
        {
            try flashmoeRun(["--preset", "deepseek-v3", "--backend", "cpu"], context: .noGPU(memory: 16 << 30))
        }
        #expect((error as? CLIError)?.kind == .insufficientMemory)
        expectCommandFailure(mentioning: ["far too large"]) {
            try flashmoeRun(["--hidden", "1000000000", "--intermediate", "1000000000"])
        }
    }

    @Test func badOptionsAreTypedErrorsThatSayWhatToChange() throws {
        func kind(_ e: (any Error)?) -> CLIError.Kind? { (e as? CLIError)?.kind }
        #expect(
            kind(
                expectCommandFailure(mentioning: ["--preset", "--checkpoint", "not both"]) {
                    try flashmoeRun(["--preset", "paper-e32", "--checkpoint", "/nonexistent"])
                }) == .conflictingOptions)
        let unknown = expectCommandFailure(mentioning: ["unknown preset 'gpt-5'", "paper-e64", "deepseek-v3"]) {
            try flashmoeRun(["--preset", "gpt-5"])
        }
        #expect((unknown as? MoEError)?.kind == .unknownPreset)
        let topK = expectCommandFailure(mentioning: ["top-k (9) cannot exceed the number of experts (8)"]) {
            try flashmoeRun(["--experts", "8", "--top-k", "9"])
        }
        #expect((topK as? MoEError)?.kind == .invalidConfig)
        #expect(
            kind(
                expectCommandFailure(mentioning: ["--layer", "--checkpoint"]) {
                    try flashmoeRun(["--layer", "2"])
                }) == .conflictingOptions)
        #expect(
            kind(
                expectCommandFailure(mentioning: ["--tokens must be 0 or more"]) {
                    try flashmoeRun(["--tokens=-3"])
                }) == .invalidValue)
        #expect(
            kind(
                expectCommandFailure(mentioning: [
                    "--backend cuda cannot run here", "no GPU in this test", "--backend cpu",
                ]) {
                    try flashmoeRun([
                        "--hidden", "8", "--intermediate", "8", "--experts", "2", "--tokens", "1", "--backend", "cuda",
                    ])
                }) == .backendUnavailable)
        // Values ArgumentParser rejects while parsing.
        expectCommandFailure(mentioning: ["fp4", "'fp32'", "'fp8'"]) { try flashmoeRun(["--precision", "fp4"]) }
        expectCommandFailure(mentioning: ["--router"]) { try flashmoeRun(["--router", "argmax"]) }
        expectCommandFailure(mentioning: ["plain FFN only"]) { try flashmoeRun(["--ffn", "gated", "--bias"]) }
    }

    @Test func badInputFilesAreTypedErrors() throws {
        try withTemporaryDirectory { dir in
            let small = ["--hidden", "64", "--intermediate", "8", "--experts", "4", "--backend", "cpu"]
            let wrongH = try HostTensor(shape: [3, 32], float32: [Float](repeating: 0.5, count: 96))
            try Safetensors.write(["x": SafetensorsTensor(wrongH)], to: dir + "/h32.safetensors")
            try Safetensors.write(["input": SafetensorsTensor(wrongH)], to: dir + "/named.safetensors")
            try Safetensors.write(
                ["x": SafetensorsTensor(shape: [1, 64], values: [Int32](repeating: 1, count: 64))],
                to: dir + "/int.safetensors")
            try Safetensors.write(
                ["x": SafetensorsTensor(shape: [64], values: [Float](repeating: 1, count: 64))],
                to: dir + "/flat.safetensors")
            let cases: [(String, [String])] = [
                ("h32", ["'x' has shape [3, 32] but this layer needs [S, 64]"]),
                ("named", ["no tensor 'x'", "it holds input", "save the layer input as 'x' with shape [S, 64]"]),
                ("int", ["I32", "F64, F32, F16 and BF16"]),
                ("flat", ["'x' has shape [64]"]),
                ("missing", ["missing.safetensors"]),
            ]
            for (name, mentions) in cases {
                let path = "\(dir)/\(name).safetensors"
                let error = expectCommandFailure(mentioning: ["--input \(path)"] + mentions) {
                    try flashmoeRun(small + ["--input", path])
                }
                #expect((error as? CLIError)?.kind == .invalidInput, "\(name)")
            }
            expectCommandFailure(mentioning: ["--input FILE or --tokens S, not both"]) {
                try flashmoeRun(small + ["--input", dir + "/h32.safetensors", "--tokens", "3"])
            }
            let unwritable = expectCommandFailure(mentioning: ["--output \(dir)/no/such/dir/y.safetensors"]) {
                try flashmoeRun(small + ["--tokens", "2", "--output", dir + "/no/such/dir/y.safetensors"])
            }
            #expect((unwritable as? CLIError)?.kind == .cannotWrite)
        }
    }

    @Test func autoUsesAUsableGPUAndFallsBackWhenItsBackendFails() throws {
        let tiny = ["--hidden", "16", "--intermediate", "8", "--experts", "4", "--tokens", "3"]
        let onGPU = try flashmoeRun(tiny, context: .fakeGPU())
        #expect(onGPU.lines[0] == "backend: cuda (auto: GPU 0 (Fake GPU) is usable)")

        let failing = MachineContext.fakeGPU { _, _ in
            throw CUDAError.outOfMemory(call: "cuMemAlloc", requestedBytes: 1 << 30, freeBytes: 0)
        }
        let fallback = try flashmoeRun(tiny, context: failing)
        #expect(
            fallback.lines[0].hasPrefix("backend: cpu (auto: the CUDA backend failed to start (out of device memory"))
        #expect(throws: CUDAError.self) { try flashmoeRun(tiny + ["--backend", "cuda"], context: failing) }

        let noSuchGPU = expectCommandFailure(mentioning: ["no GPU 3 (1 visible)", "--device 0...0"]) {
            try flashmoeRun(tiny + ["--backend", "cuda", "--device", "3"], context: .fakeGPU())
        }
        #expect((noSuchGPU as? CLIError)?.kind == .backendUnavailable)
        let onCPU = try flashmoeRun(tiny + ["--device", "3"], context: .fakeGPU())
        #expect(onCPU.lines[0].hasPrefix("backend: cpu (auto: CUDA not usable: there is no GPU 3"))
        let noGPU = try flashmoeRun(tiny)
        #expect(noGPU.lines[0] == "backend: cpu (auto: CUDA not usable: no GPU in this test)")
    }
}
