import Testing

@testable import FlashMoE

/// The CPU workers' helpers: results in input order whatever the chunking.
@Suite struct ParallelTests {
    /// Sizes around the chunk minimum and its multiples, so the last chunk is short, exact or alone.
    @Test(arguments: [0, 1, 7, 1 << 16, (1 << 16) + 1, 3 * (1 << 16) - 5, 1_000_003])
    func parallelMapIsMapInOrder(count: Int) {
        let values = (0..<count).map { Float($0 % 9973) * 0.37 - 1000 }
        #expect(parallelMap(values) { BFloat16($0) } == values.map { BFloat16($0) })
        #expect(parallelMap(values, minimumChunk: 3) { Double($0) * 2 } == values.map { Double($0) * 2 })
    }

    /// Conversions between the storage types use it: the values are the element-wise ones.
    @Test func tensorConversionsKeepEveryElement() throws {
        let values = (0..<200_001).map { Float($0) * 1e-3 - 100 }
        let t = try HostTensor(shape: [200_001], values: values, as: .bfloat16)
        #expect(t.floats() == values.map { BFloat16($0).float })
        let h = try HostTensor(shape: [200_001], values: values, as: .float16)
        #expect(h.floats() == values.map { Float(Float16($0)) })
    }
}
