import Synchronization
import Testing

@testable import FlashMoE

/// The soak on the CPU backend (the GPU runs `flashmoe soak --backend cuda`): every shape checked against the
/// oracle once, later calls bit-identical; and the soak must notice changed bits and moving memory.
@Suite struct SoakTests {
    static func layers(seed: UInt64) throws -> [SoakLayer] {
        try Soak.standardLayers(seed: seed).enumerated().map { i, layer in
            SoakLayer(name: "layer \(i)", backend: try CPUBackend(layer: layer, mode: .fast))
        }
    }

    @Test func theCPUBackendGivesTheSameBitsEveryCall() throws {
        let soak = Soak(layers: try Self.layers(seed: 3), tokenCounts: [0, 1, 37, 129], seed: 3)
        let report = soak.run(calls: 48, freeMemory: nil)
        #expect(report.passed, "\(report.failure ?? "")")
        #expect(report.calls == 48 && report.shapes == 16 && report.mismatches == 0)
        #expect(report.freeAfterWarmUp == nil && report.memoryDrift == 0)
    }

    @Test func callsCycleEveryLayerAndTokenCount() throws {
        let soak = Soak(layers: try Self.layers(seed: 1), tokenCounts: [5, 6, 7], seed: 1)
        let shapes = (0..<12).map { soak.shape(ofCall: $0) }
        #expect(Set(shapes.map { "\($0.layer),\($0.tokens)" }).count == 12)
        #expect(soak.shape(ofCall: 12) == soak.shape(ofCall: 0))
    }

    @Test func changingBitsAreCaught() throws {
        let layer = try Soak.standardLayers(seed: 2)[0]
        let cpu = try CPUBackend(layer: layer, mode: .fast)
        let calls = Counter()
        // From the third forward on (the first call of the shape makes two: the second checks the bits), the
        // output moves by one ulp in one element: the four later calls all differ from the first.
        let drifting = SoakLayer(name: "drifting", layer: layer) { x in
            var out = try cpu.forward(x)
            if calls.next() >= 2, out.output.count > 0 {
                var y = out.output.floats()
                y[0] = y[0].nextUp
                out.output = try HostTensor(shape: out.output.shape, float32: y)
            }
            return out
        }
        let report = Soak(layers: [drifting], tokenCounts: [3], seed: 2).run(calls: 5, freeMemory: nil)
        #expect(!report.passed && report.mismatches == 4)
        #expect(report.failure?.contains("other bits") == true)
    }

    @Test func memoryThatMovesAfterTheWarmUpIsCaught() throws {
        let layer = try Self.layers(seed: 4)[2]
        let probes = Counter()
        var soak = Soak(layers: [layer], tokenCounts: [1, 2], seed: 4)
        soak.probeInterval = 2
        // Free memory falls by 4 MiB a probe: a leak.
        let report = soak.run(calls: 10, freeMemory: { (1 << 30) - probes.next() * (4 << 20) })
        #expect(!report.passed)
        #expect(report.failure?.contains("free device memory moved") == true)
        var flat = soak
        flat.memoryTolerance = 0
        let steady = flat.run(calls: 10, freeMemory: { 1 << 30 })
        #expect(steady.passed && steady.freeAfterWarmUp == 1 << 30 && steady.memoryDrift == 0)
    }
}

/// A thread-safe call counter for the closures above.
private final class Counter: Sendable {
    private let value = Atomic<Int>(0)
    /// The count before this call.
    func next() -> Int { value.add(1, ordering: .relaxed).oldValue }
}
