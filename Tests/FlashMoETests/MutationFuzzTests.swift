import Dispatch
import Foundation
import Synchronization
import Testing
@testable import FlashMoE

/// The mutation fuzzer of the IO layer: safetensors files (in memory), config.json (in memory) and whole
/// checkpoint directories (config.json + safetensors, single-file or sharded with an index, read from disk), each
/// derived from a valid seed by one to three mutations (`MutationEngine`). Every input must end in a valid load or
/// a typed error with a message, never a trap, and nothing sized from an input's contents may be allocated past the
/// input's size (`ReadAllocation`'s recorder).
///
/// Input i is a pure function of (seed, i). Environment: FLASHMOE_MUTATION_SEED (default 0x5AFE7E45),
/// FLASHMOE_MUTATION_INPUTS (default 100,000), FLASHMOE_MUTATION_SECONDS (the time cap, default 180: a stop for a
/// run that stalls, not a speed target — 100,000 inputs take about 25 s on CI's 2 cores, and 60 s was missed once
/// on that machine while it also compiled kernels),
/// FLASHMOE_MUTATION_INDEX=N (run input N alone and print its outcome: a trap's replay). A trap kills the test
/// process; FLASHMOE_MUTATION_TRACE=1 runs the inputs one at a time, printing each index first.
@Suite struct MutationFuzzTests {
    static let environment = ProcessInfo.processInfo.environment
    static let seed = environment["FLASHMOE_MUTATION_SEED"].flatMap { UInt64($0) } ?? 0x5AFE_7E45
    static let minimumInputs = 100_000
    static let target = environment["FLASHMOE_MUTATION_INPUTS"].flatMap { Int($0) } ?? minimumInputs
    static let cap = environment["FLASHMOE_MUTATION_SECONDS"].flatMap { Double($0) } ?? 180
    static let chunk = 500

    /// Which reader input i goes to: 60 % safetensors in memory, 37 % config.json in memory, 3 % a checkpoint
    /// directory on disk (written, then one layer loaded: the slowest target by far).
    static func run(_ i: Int, _ corpus: MutationCorpus, dir: String) -> MutationTargets.Outcome {
        var r = MutationRandom(seed: seed, index: i)
        let lane = i % 100
        if lane < 60 {
            return MutationTargets.decode(MutationEngine.mutateSafetensors(r.pick(corpus.safetensorsParts), &r))
        }
        if lane < 97 {
            let c = r.below(corpus.configs.count)
            var bytes = r.chance(0.8) ? MutationEngine.mutateJSON(corpus.configParts[c], &r) : corpus.configs[c]
            if r.chance(0.3) { MutationEngine.mutateBytes(&bytes, hot: bytes.count, &r) }
            return MutationTargets.config(bytes)
        }
        var ckpt = r.pick(corpus.checkpoints)
        func mutateOneShard(_ r: inout MutationRandom) {
            let names = ckpt.safetensorsParts.keys.sorted()
            let n = r.pick(names)
            if let parts = ckpt.safetensorsParts[n] { ckpt.files[n] = MutationEngine.mutateSafetensors(parts, &r) }
        }
        switch r.below(4) {
        case 0, 1: ckpt.config = MutationEngine.mutateJSON(ckpt.configParts, &r)
        case 2:
            if let index = ckpt.index, let parts = ckpt.indexParts, r.chance(0.5) {
                ckpt.files[index] = MutationEngine.mutateJSON(parts, &r)
            } else {
                mutateOneShard(&r)
            }
        default:
            ckpt.config = MutationEngine.mutateJSON(ckpt.configParts, &r)
            mutateOneShard(&r)
        }
        let layer = r.chance(0.9) ? 1 : r.pick([-1, 0, 2, 1 << 20])
        let precision = r.pick(Precision.allCases)
        return MutationTargets.load(ckpt.files, config: ckpt.config, layer: layer, precision: precision, in: dir)
    }

    /// Tallies of a run.
    struct Tally: Sendable {
        var inputs = 0
        var classes: [String: Int] = [:]
        var defects: [String] = []
        /// Seconds spent per reader (the label's prefix).
        var seconds: [String: Double] = [:]
    }

    @Test func mutatedInputsEndInATypedErrorOrAValidLoad() throws {
        let corpus = try MutationCorpus.load()
        if let one = Self.environment["FLASHMOE_MUTATION_INDEX"].flatMap({ Int($0) }) {
            let outcome = try withTemporaryDirectory { Self.run(one, corpus, dir: $0) }
            print("mutation input \(one) (seed \(Self.seed)): \(outcome.label) \(outcome.defect ?? "")")
            #expect(outcome.defect == nil)
            return
        }
        let trace = Self.environment["FLASHMOE_MUTATION_TRACE"] == "1"
        let tally = Mutex(Tally())
        let next = Atomic<Int>(0)
        let clock = ContinuousClock()
        let start = clock.now
        let chunks = (Self.target + Self.chunk - 1) / Self.chunk
        let workers = trace ? 1 : max(1, min(ProcessInfo.processInfo.activeProcessorCount, 8))
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
            // Each worker owns a scratch directory for the checkpoint inputs.
            try? withTemporaryDirectory { dir in
                while clock.now - start < .seconds(Self.cap) {
                    let c = next.add(1, ordering: .relaxed).oldValue
                    guard c < chunks else { return }
                    var local = Tally()
                    for i in c * Self.chunk..<min(Self.target, (c + 1) * Self.chunk) {
                        if trace { print("mutation input \(i)") }
                        let t0 = clock.now
                        let outcome = Self.run(i, corpus, dir: dir)
                        let reader = String(outcome.label.prefix(while: { $0 != ":" }))
                        local.seconds[reader, default: 0] += Self.seconds(clock.now - t0)
                        local.inputs += 1
                        local.classes[outcome.label, default: 0] += 1
                        if let d = outcome.defect { local.defects.append("input \(i): \(outcome.label): \(d)") }
                    }
                    tally.withLock { t in
                        t.inputs += local.inputs
                        t.classes.merge(local.classes, uniquingKeysWith: +)
                        t.seconds.merge(local.seconds, uniquingKeysWith: +)
                        t.defects += local.defects
                    }
                }
            }
        }
        let elapsed = clock.now - start
        let result = tally.withLock { $0 }
        let seconds = Self.seconds(elapsed)
        let rate = Double(result.inputs) / max(seconds, 1e-9)
        print(
            "mutation fuzzer: \(result.inputs) inputs in \(String(format: "%.1f", seconds)) s "
                + "(\(Int(rate)) inputs/s on \(workers) threads, seed \(Self.seed), cap \(Int(Self.cap)) s: "
                + "\(Int(rate * Self.cap)) inputs fit in the cap); \(result.defects.count) defects")
        let perReader = result.seconds.sorted { $0.key < $1.key }.map { "\($0.key) \(String(format: "%.1f", $0.value)) s" }
        print("  time per reader (all threads): " + perReader.joined(separator: ", "))
        for (label, n) in result.classes.sorted(by: { $0.key < $1.key }) { print("  \(n)\t\(label)") }
        for d in result.defects.prefix(20) { print("  DEFECT \(d)") }

        #expect(result.defects.isEmpty, "\(result.defects.prefix(5))")
        #expect(
            result.inputs >= Self.minimumInputs || Self.target < Self.minimumInputs,
            "only \(result.inputs) inputs within the \(Self.cap) s cap (\(Int(rate)) inputs/s)")
        // The fuzzer must reach both valid loads and many distinct typed errors in every reader.
        for reader in ["safetensors", "config", "checkpoint"] {
            let kinds = result.classes.keys.filter { $0.hasPrefix(reader + ":") }
            #expect(kinds.count >= 4, "\(reader) outcomes: \(kinds.sorted())")
        }
        #expect((result.classes["safetensors: loaded"] ?? 0) > 0 && (result.classes["checkpoint: loaded"] ?? 0) > 0)
    }

    static func seconds(_ d: Duration) -> Double {
        Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
    }

    /// Every seed is valid: the fuzzer starts one mutation away from a load, not from garbage.
    @Test func seedsLoad() throws {
        let corpus = try MutationCorpus.load()
        for s in corpus.safetensors { #expect(MutationTargets.decode(s).label == "safetensors: loaded") }
        for c in corpus.configs { #expect(MutationTargets.config(c).label == "config: valid") }
        try withTemporaryDirectory { dir in
            for c in corpus.checkpoints {
                let outcome = MutationTargets.load(c.files, config: c.config, layer: 1, precision: .fp32, in: dir)
                #expect(outcome.label == "checkpoint: loaded" && outcome.defect == nil, "\(outcome)")
            }
        }
    }
}
