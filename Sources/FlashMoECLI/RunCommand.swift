import ArgumentParser
import FlashMoE
import Logging

/// `flashmoe run`: one forward pass of one MoE layer, on random weights of a preset shape or a checkpoint's layer,
/// with a random or given input; prints what ran and what came out, and can save y and the routing.
struct RunCommand: ReportingCommand {
    /// The preset when neither --preset nor --checkpoint is given.
    static let defaultPreset = Preset.paperE32

    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run one MoE layer forward and report backend, shapes, expert load, time and output norm.",
        discussion: """
            With no options it runs \(defaultPreset.name) with random weights on \(defaultPreset.defaultTokens) \
            random tokens, on the GPU when one is usable and on the CPU otherwise, in fp32 (a few seconds on a \
            CPU).

            Weights: --preset NAME (random weights from --seed; each shape field can be overridden) or \
            --checkpoint DIR --layer N (a Hugging Face mixtral, qwen2_moe, qwen3_moe or deepseek_v3 checkpoint).
            Input: --input FILE (a safetensors file with tensor x [S, H] of any float dtype) or --tokens S random \
            tokens (default: the preset's token count below; a checkpoint needs --tokens or --input).
            Precision is fp32 on every backend unless --precision is given.

            Presets:
            \(Preset.all.map { "  \($0.name): \($0.summary); \($0.defaultTokens) tokens" }.joined(separator: "\n"))
            """)

    @Option(help: "A preset layer shape, with random weights (default: \(defaultPreset.name)).")
    var preset: String?

    @Option(help: "A Hugging Face checkpoint directory (config.json and safetensors files).")
    var checkpoint: String?

    @Option(help: "The decoder layer of --checkpoint to run (0-based).")
    var layer: Int?

    @OptionGroup(title: "Preset overrides")
    var shape: ShapeOverrides

    @Option(help: "A safetensors file holding the input as tensor 'x' [S, H], any float dtype.")
    var input: String?

    @Option(help: "Tokens S of a random input.")
    var tokens: Int?

    @OptionGroup
    var common: CommonOptions

    @Option(help: "Write y [S, H] F32, topk_ids [S, k] I32 and topk_weights [S, k] F32 to this safetensors file.")
    var output: String?

    @OptionGroup(title: "Ranks in separate processes")
    var ranks: RankProcessOptions

    /// Runs the command on `context`, passing each report line to `emit`; returns the forward pass's result.
    @discardableResult
    func execute(context: MachineContext, emit: (String) -> Void) throws -> MoEOutput {
        if ranks.isActive { return try executeRanks(context: context, emit: emit) }
        let progress = common.progress
        let source = try layerSource()
        let config = source.config
        let given = try readInput(hidden: config.hiddenSize)
        let tokens = try given?.shape[0] ?? randomTokenCount(source)
        let (engine, plan) = try common.prepare(source, tokens: tokens, context: context, progress: progress)
        let x = given ?? randomInput(tokens: tokens, hidden: config.hiddenSize, seed: common.seed)

        emit("backend: \(engine.name) (\(plan.reason))")
        emit("layer: \(source.origin): \(LayerReport.describe(config))")
        let origin = input.map { "x \(x.shape) \(x.elementType) from \($0)" }
        emit("input: " + (origin ?? "random \(x.shape) (seed \(common.seed))"))
        let clock = ContinuousClock()
        let start = clock.now
        let result = try progress.step("running the forward pass on \(tokens) tokens") { try engine.forward(x) }
        let elapsed = clock.now - start
        let (h, k) = (config.hiddenSize, config.topK)
        emit("output: y [\(tokens), \(h)] F32, topk_ids [\(tokens), \(k)] I32, topk_weights [\(tokens), \(k)] F32")
        emit(LoadSummary(result.routing).text)
        emit("time: \(formatDecimal(elapsed.milliseconds, 2)) ms for the forward pass (wall clock)")
        emit(OutputNorms(result.output.floats()).text)
        emit(NonFiniteSummary(input: x, output: result).text)
        if let output {
            try write(result, to: output)
            emit("wrote \(output) (y, topk_ids, topk_weights)")
        }
        return result
    }

    /// The layer source after checking that the options describe exactly one.
    func layerSource() throws -> LayerSource {
        if let checkpoint {
            guard preset == nil else {
                throw CLIError(
                    .conflictingOptions,
                    "give either --preset (random weights) or --checkpoint (a model's weights), not both")
            }
            guard let layer else {
                throw CLIError(
                    .missingOption, "--checkpoint needs --layer N: the 0-based index of the decoder layer to run")
            }
            guard shape.given.isEmpty else {
                throw CLIError(
                    .conflictingOptions,
                    "\(shape.given.joined(separator: ", ")) change a preset's shape; a checkpoint's shape comes from "
                        + "its config.json: drop them or use --preset")
            }
            return try LayerSource.checkpoint(directory: checkpoint, layer: layer, options: common)
        }
        if layer != nil {
            throw CLIError(.conflictingOptions, "--layer selects a layer of --checkpoint DIR; give --checkpoint too")
        }
        return try LayerSource.preset(named: preset ?? Self.defaultPreset.name, overrides: shape, options: common)
    }

    /// The token count of a random input.
    func randomTokenCount(_ source: LayerSource) throws(CLIError) -> Int {
        if let tokens {
            guard tokens >= 0 else { throw CLIError(.invalidValue, "--tokens must be 0 or more (got \(tokens))") }
            return tokens
        }
        guard let presetTokens = source.defaultTokens else {
            throw CLIError(
                .missingOption, "a checkpoint has no default token count: give --tokens S or --input FILE")
        }
        return presetTokens
    }

    /// The `--input` tensor, checked against the layer's hidden size; nil without `--input`.
    func readInput(hidden: Int) throws(CLIError) -> HostTensor? {
        guard let path = input else { return nil }
        guard tokens == nil else {
            throw CLIError(.conflictingOptions, "give --input FILE or --tokens S, not both: the file fixes S")
        }
        return try InputFile.read(path, hidden: hidden)
    }

    private func write(_ result: MoEOutput, to path: String) throws(CLIError) {
        let r = result.routing
        do {
            try Safetensors.write(
                [
                    "y": SafetensorsTensor(result.output),
                    "topk_ids": SafetensorsTensor(shape: [r.tokens, r.topK], values: r.expertIDs),
                    "topk_weights": SafetensorsTensor(shape: [r.tokens, r.topK], values: r.weights),
                ], to: path)
        } catch {
            throw CLIError(.cannotWrite, "--output \(path): \(error.message)")
        }
    }
}

/// Reading a layer input from a safetensors file.
enum InputFile {
    /// The tensor `x` of the file at `path` as a [S, `hidden`] host tensor (F64 becomes F32; F32, F16 and BF16
    /// keep their type). Every problem is a `CLIError.invalidInput` naming the file and what to change.
    static func read(_ path: String, hidden: Int) throws(CLIError) -> HostTensor {
        func failure(_ what: String) -> CLIError { CLIError(.invalidInput, "--input \(path): \(what)") }
        let x: HostTensor
        do {
            let file = try SafetensorsFile(path: path)
            guard file.header.names.contains("x") else {
                let names = file.header.names.sorted()
                let held = names.isEmpty ? "no tensors" : names.joined(separator: ", ")
                throw failure(
                    "the file has no tensor 'x' (it holds \(held)): "
                        + "save the layer input as 'x' with shape [S, \(hidden)]")
            }
            x = try file.tensor(named: "x").hostTensor()
        } catch let error as CLIError {
            throw error
        } catch {
            throw failure("\(error)")
        }
        guard x.shape.count == 2, x.shape[1] == hidden else {
            throw failure("'x' has shape \(x.shape) but this layer needs [S, \(hidden)] (H = \(hidden))")
        }
        return x
    }
}
