import Testing

@testable import FlashMoE

/// The tracing build's host side on a synthetic buffer (no GPU): decoding, overflow, the Chrome-trace JSON; and
/// (with NVRTC) that the tracing build compiles, while the normal build carries none of it.
@Suite struct KernelTraceTests {
    /// One event in the kernel's encoding (trace.cuh).
    static func event(_ kind: KernelTrace.Kind, warp: Int = 0xff, expert: Int = 0xffff, a: Int = 0, b: Int = 0,
                      begin: UInt64, end: UInt64) -> [UInt64] {
        [begin, end,
         UInt64(kind.rawValue) << 56 | UInt64(warp) << 48 | UInt64(expert) << 32,
         UInt64(UInt32(truncatingIfNeeded: a)) << 32 | UInt64(UInt32(truncatingIfNeeded: b))]
    }

    /// Two blocks of capacity 3: block 0 recorded 4 events (one dropped), block 1 two (one a warp's combine).
    static func buffer() -> [UInt64] {
        let origin: UInt64 = 1_000_000_000
        var words: [UInt64] = [4, 0, 0, 0]
        words += event(.gemm0, expert: 3, a: 2, b: 5, begin: origin + 1000, end: origin + 3500)
        words += event(.expertPhase, begin: origin + 500, end: origin + 9000)
        words += event(.barrier, begin: origin, end: origin + 500)
        words += [2, 0, 0, 0]
        words += event(.combine, warp: 7, a: 4095, begin: origin + 2000, end: origin + 2250)
        words += event(.gemm1, expert: 64, a: 0, b: 1, begin: origin + 1500, end: origin + 2000)
        words += [UInt64](repeating: 0, count: 4)
        return words
    }

    @Test func decodesEventsAndCountsOverflow() throws {
        let t = try KernelTrace(words: Self.buffer(), blocks: 2, capacity: 3)
        #expect(t.events.count == 5 && t.overflow == [1, 0] && t.droppedEvents == 1)
        let g0 = try #require(t.events.first)
        #expect(g0.kind == .gemm0 && g0.block == 0 && g0.warp == nil && g0.expert == 3 && g0.a == 2 && g0.b == 5)
        #expect(g0.label == "GEMM0 e3 rb2 n5")
        let combine = try #require(t.events.first { $0.kind == .combine })
        #expect(combine.block == 1 && combine.warp == 7 && combine.expert == nil && combine.a == 4095)
        #expect(t.origin == 1_000_000_000)
        #expect(t.summary().first?.contains("1 events dropped") == true)
    }

    /// Gaps between a block's consecutive GEMM tiles, per kind pair; warp-level events and other kinds do not count.
    @Test func measuresTheGapsBetweenTiles() throws {
        let us: UInt64 = 1000, o: UInt64 = 5_000_000
        var words: [UInt64] = [6, 0, 0, 0]
        words += Self.event(.gemm0, begin: o, end: o + 10 * us)
        words += Self.event(.release, begin: o + 10 * us, end: o + 11 * us)
        words += Self.event(.gemm0, begin: o + 12 * us, end: o + 20 * us)
        words += Self.event(.gemm1, begin: o + 23 * us, end: o + 30 * us)
        words += Self.event(.combine, warp: 3, begin: o + 30 * us, end: o + 33 * us)
        words += Self.event(.gemm1, begin: o + 34 * us, end: o + 40 * us)
        words += [2, 0, 0, 0]
        words += Self.event(.gemm1, begin: o, end: o + 5 * us)
        words += Self.event(.gemm1, begin: o + 6 * us, end: o + 10 * us)
        words += [UInt64](repeating: 0, count: 16)
        let t = try KernelTrace(words: words, blocks: 2, capacity: 6)
        let gaps = t.tileGaps()
        #expect(gaps.map { "\($0.from.name)>\($0.to.name)" } == ["GEMM0>GEMM0", "GEMM0>GEMM1", "GEMM1>GEMM1"])
        #expect(gaps[0].count == 1 && gaps[0].medianMicros == 2 && gaps[1].medianMicros == 3)
        #expect(gaps[2].count == 2 && gaps[2].medianMicros == 2.5 && gaps[2].meanMicros == 2.5 && gaps[2].totalMicros == 5)
        let summary = t.summary()
        #expect(summary.contains("  between GEMM tiles (count, ticket, ring wait): 5.0 µs a block"))
        #expect(summary.contains("    GEMM1 → GEMM1: 2 × median 2.50 µs, mean 2.50"))
    }

    /// Each release belongs to its block's last GEMM tile before it; a release with no tile before it, and a warp's
    /// event, count for nothing.
    @Test func sharesTheReleasesOutByTheTileBeforeThem() throws {
        let us: UInt64 = 1000, o: UInt64 = 7_000_000
        var words: [UInt64] = [6, 0, 0, 0]
        words += Self.event(.gemm0, begin: o, end: o + 10 * us)
        words += Self.event(.release, begin: o + 10 * us, end: o + 12 * us)
        words += Self.event(.gemm0, begin: o + 12 * us, end: o + 20 * us)
        words += Self.event(.release, begin: o + 20 * us, end: o + 21 * us)
        words += Self.event(.gemm1, begin: o + 23 * us, end: o + 30 * us)
        words += Self.event(.release, begin: o + 30 * us, end: o + 34 * us)
        words += [4, 0, 0, 0]
        words += Self.event(.release, begin: o, end: o + 1 * us)
        words += Self.event(.gemm1, begin: o + 1 * us, end: o + 5 * us)
        words += Self.event(.release, begin: o + 5 * us, end: o + 6 * us)
        words += Self.event(.release, warp: 2, begin: o + 6 * us, end: o + 9 * us)
        words += [UInt64](repeating: 0, count: 8)
        let t = try KernelTrace(words: words, blocks: 2, capacity: 6)
        let shares = t.releaseShares()
        #expect(shares.map(\.after) == [.gemm0, .gemm1])
        #expect(shares[0].count == 2 && shares[0].totalMicros == 3 && shares[0].meanMicros == 1.5
            && shares[0].tileMicros == 18)
        #expect(shares[1].count == 2 && shares[1].totalMicros == 5 && shares[1].tileMicros == 11)
        #expect(abs(shares[1].fractionOfTiles - 5.0 / 11.0) < 1e-12)
        let summary = t.summary()
        #expect(summary.contains("  releases after GEMM0 tiles: 2 × mean 1.5 µs = 3.0 µs, 16.7 % of those tiles' time"))
        #expect(summary.contains("  releases after GEMM1 tiles: 2 × mean 2.5 µs = 5.0 µs, 45.5 % of those tiles' time"))
        // No tiles, no shares.
        let none = try KernelTrace(words: [1, 0, 0, 0] + Self.event(.release, begin: o, end: o + us), blocks: 1, capacity: 1)
        #expect(none.releaseShares().isEmpty)
    }

    @Test func rejectsABufferThatDoesNotMatch() {
        #expect(throws: MoEError.self) { try KernelTrace(words: [0, 0], blocks: 2, capacity: 3) }
        var words = Self.buffer()
        words[4 + 2] = 99 << 56  // an unknown kind
        #expect(throws: MoEError.self) { try KernelTrace(words: words, blocks: 2, capacity: 3) }
    }

    @Test func writesChromeTraceJSONThatParses() throws {
        let t = try KernelTrace(words: Self.buffer(), blocks: 2, capacity: 3)
        let text = t.chromeJSON(metadata: [("preset", "paper-e64")])
        let root = try JSONParser.parse(Array(text.utf8))
        guard case .object(let o) = root, case .array(let events)? = o["traceEvents"] else {
            Issue.record("no traceEvents array")
            return
        }
        let complete = events.filter { if case .object(let e) = $0 { return e["ph"] == .string("X") } else { return false } }
        #expect(complete.count == 5)
        // Each block is a process named "block N"; block-level events on thread 0, warp 7's combine on thread 8.
        let names = events.compactMap { v -> String? in
            guard case .object(let e) = v, e["ph"] == .string("M"), case .object(let args)? = e["args"],
                  case .string(let n)? = args["name"] else { return nil }
            return n
        }
        #expect(names.contains("block 0") && names.contains("block 1") && names.contains("warp 7"))
        let gemm0 = try #require(complete.first { if case .object(let e) = $0 { return e["name"] == .string("GEMM0 e3 rb2 n5") } else { return false } })
        guard case .object(let g) = gemm0, case .object(let args)? = g["args"] else { Issue.record("no args"); return }
        #expect(g["ts"] == .double(1.0) && g["dur"] == .double(2.5) && g["pid"] == .int(0) && g["tid"] == .int(0))
        #expect(args["expert"] == .int(3) && args["row_block"] == .int(2) && args["column_tile"] == .int(5))
        let combine = try #require(complete.first { if case .object(let e) = $0 { return e["cat"] == .string("combine") } else { return false } })
        guard case .object(let c) = combine else { return }
        #expect(c["pid"] == .int(1) && c["tid"] == .int(8))
        guard case .object(let other)? = o["otherData"] else { Issue.record("no otherData"); return }
        #expect(other["dropped_events"] == .int(1) && other["preset"] == .string("paper-e64"))
    }

    @Test func theTracingBuildIsOnlyADefine() throws {
        let plain = try FusedSpecialization(config: Preset.paperE32.config)
        let traced = try FusedSpecialization(config: Preset.paperE32.config, trace: true)
        #expect(plain.defines["FMOE_TRACE"] == nil && traced.defines["FMOE_TRACE"] == "1")
        var d = traced.defines
        d["FMOE_TRACE"] = nil
        #expect(d == plain.defines)
    }

    @Test(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason), arguments: ["sm_90a", "sm_86"])
    func theTracingBuildCompiles(arch name: String) throws {
        let compiler = KernelCompiler(backend: TestEnvironment.nvrtc!, cache: nil)
        let arch = try GPUArchitecture(parsing: name)
        var c = Preset.qwen3_30bA3b.config
        c.precision = .bf16
        c.hiddenSize = 256
        let spec = try FusedSpecialization(config: c, arch: arch, trace: true)
        let k = try compiler.compile(spec.kernelSpec, arch: arch, sources: .embedded)
        let usage = try #require(k.resources.first { $0.name == FusedSpecialization.kernelName })
        // The stamps must not perturb the timeline they record by spilling registers.
        #expect(!usage.spills, "the tracing build spills on \(name): \(usage)")
    }
}
