import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// `flashmoe run` counts NaN and ±Inf (docs/nonfinite.md): the case, a qwen3_moe checkpoint with one NaN in
/// token 17 of 40, on both CPU backends.
@Suite struct RunNonFiniteTests {
    @Test(arguments: ["cpu", "oracle"])
    func nanTokenIsCountedInTheSummary(_ backend: String) throws {
        try withTemporaryDirectory { dir in
            var v = randomInput(tokens: 40, hidden: 16, seed: 3).floats()
            v[17 * 16 + 4] = .nan
            try Safetensors.write(["x": SafetensorsTensor(shape: [40, 16], values: v)], to: dir + "/x.safetensors")
            let run = try flashmoeRun([
                "--checkpoint", "\(TransformersFixtureTests.root)/qwen3_moe/save_pretrained", "--layer", "1",
                "--input", dir + "/x.safetensors", "--backend", backend,
            ])
            let k = run.result.routing.topK
            #expect(run.result.routing.expertIDs[(17 * k)..<(18 * k)].allSatisfy { $0 == -1 })
            #expect(run.text.contains("; \(k) unrouted (NaN logits), 1 token with no expert"), "\(run.text)")
            // qwen3_moe has no shared expert: the unrouted token's y is 0 and every y is finite.
            #expect(
                run.text.contains(
                    "non-finite: NaN/±Inf in 1 token of x; 1 token with no expert (all logits NaN); "
                        + "NaN/±Inf in 0 tokens of y (0 values) (rules: docs/nonfinite.md)"), "\(run.text)")
        }
    }

    @Test func cleanRunSaysNone() throws {
        let run = try flashmoeRun(["--hidden", "16", "--intermediate", "8", "--experts", "4", "--tokens", "5", "--backend", "cpu"])
        #expect(
            run.text.contains(
                "non-finite: NaN/±Inf in 0 tokens of x; 0 tokens with no expert (all logits NaN); "
                    + "NaN/±Inf in 0 tokens of y (0 values)"))
        #expect(!run.text.contains("docs/nonfinite.md"))
    }

    @Test func nonFiniteOutputsAreCountedPerToken() {
        #expect(NonFiniteSummary.rows([1, .nan, .infinity, 2, 3, 4, -.infinity, 0], width: 4) == (rows: 2, values: 3))
        #expect(NonFiniteSummary.rows([], width: 4) == (rows: 0, values: 0))
    }
}
