import FlashMoE
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Opt-in timings of the CPU backends on real layer shapes, in release mode:
///
///     FLASHMOE_CPU_BENCH=1 swift test -c release --scratch-path .build-ref --filter CPUBenchmark
///
/// They print GFLOP/s (counting `MoEConfig.flops(tokens:)`) and check the results against the oracle; they
/// assert nothing about speed.
@Suite(.enabled(if: getenv("FLASHMOE_CPU_BENCH") != nil), .serialized)
struct CPUBenchmark {
    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
    }

    /// The median of `runs` timed calls, after one warm-up call.
    static func median(runs: Int, _ body: () throws -> Void) rethrows -> Double {
        try body()
        var times: [Double] = []
        for _ in 0..<runs { times.append(seconds(try ContinuousClock().measure(body))) }
        return times.sorted()[runs / 2]
    }

    @Test func paperE32FastPath() throws {
        let config = Preset.paperE32.config
        let tokens = 256
        let clock = ContinuousClock()
        var layer: MoELayer? = nil
        let make = clock.measure { layer = try? Fixture.layer(config) }
        let built = try #require(layer)
        var fast: CPUBackend? = nil
        let pack = clock.measure { fast = try? CPUBackend(layer: built, mode: .fast) }
        let backend = try #require(fast)
        let x = try Fixture.input(tokens: tokens, hidden: config.hiddenSize)
        var out: MoEOutput? = nil
        let t = try Self.median(runs: 7) { out = try backend.forward(x) }
        let gflops = config.flops(tokens: tokens) / t / 1e9
        print(
            "paper-e32 S=\(tokens) fp32 fast: \(String(t * 1e3)) ms, \(gflops) GFLOP/s "
                + "(weights \(Self.seconds(make)) s, packing \(Self.seconds(pack)) s)")
        var oracleOut: MoEOutput? = nil
        let o = try clock.measure { oracleOut = try CPUBackend(layer: built, mode: .oracle).forward(x) }
        print("paper-e32 S=\(tokens) oracle: \(Self.seconds(o)) s")
        let fo = try #require(out), oo = try #require(oracleOut)
        #expect(fo.routing.expertIDs == oo.routing.expertIDs && fo.routing.slots == oo.routing.slots)
        #expect(relativeError(fo.output.floats(), oo.output.floats()) <= config.precision.tolerance)

        // A prefill-sized batch: compute-bound rather than weight-bandwidth-bound.
        let big = try Fixture.input(tokens: 2048, hidden: config.hiddenSize)
        let tb = try Self.median(runs: 3) { _ = try backend.forward(big) }
        print("paper-e32 S=2048 fp32 fast: \(tb * 1e3) ms, \(config.flops(tokens: 2048) / tb / 1e9) GFLOP/s")
    }

    /// DeepSeek-V3's expert shape (H = 7168, I = 2048, k = 8, groups, shared expert) with 32 experts instead of
    /// 256 (the work per token is the same; the weights fit in memory), BF16, 16 tokens.
    @Test func deepSeekShapeOracle() throws {
        var config = Preset.deepSeekV3.config
        config.experts = 32
        config.precision = .bf16
        let tokens = 16
        let layer = try Fixture.layer(config)
        let x = try Fixture.input(tokens: tokens, hidden: config.hiddenSize)
        let clock = ContinuousClock()
        var oracleOut: MoEOutput? = nil
        let o = try clock.measure { oracleOut = try CPUBackend(layer: layer, mode: .oracle).forward(x) }
        let backend = try CPUBackend(layer: layer, mode: .fast)
        var out: MoEOutput? = nil
        let t = try Self.median(runs: 3) { out = try backend.forward(x) }
        print(
            "deepseek-v3 shape (E=32) S=\(tokens) bf16: oracle \(Self.seconds(o)) s, fast \(t * 1e3) ms "
                + "(\(config.flops(tokens: tokens) / t / 1e9) GFLOP/s)")
        let fo = try #require(out), oo = try #require(oracleOut)
        #expect(fo.routing.expertIDs == oo.routing.expertIDs)
        #expect(relativeError(fo.output.floats(), oo.output.floats()) <= config.precision.tolerance)
    }
}
