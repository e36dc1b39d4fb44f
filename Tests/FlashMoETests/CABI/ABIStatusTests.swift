import CFlashMoEABI
@testable import FlashMoE
@testable import FlashMoEC
import Testing

@Suite struct ABIStatusTests {
    @Test func aLayerThatDoesNotFitIsOutOfMemoryNotABug() throws {
        // FusedMemoryCheck refuses before allocating; the C ABI and Python once reported that as INTERNAL ("a
        // FlashMoE bug"), seen creating a DeepSeek-V3-shaped fp8 layer on an H100 beside its torch tensors.
        let estimate = FusedMemoryEstimate(weightBytes: 21 << 30, workspaceBytes: 1 << 30, controlBytes: 0, tokens: 4096)
        let error = DeviceMemoryError(
            deviceOrdinal: 0, deviceName: "GPU", estimate: estimate, freeBytes: 20 << 30, totalBytes: 80 << 30,
            tokensThatFit: nil, suggestions: ["free the memory other processes hold (nvidia-smi)"])
        let (status, message) = ABIStatus.classify(error)
        #expect(status == FLASHMOE_ERROR_OUT_OF_MEMORY)
        #expect(message.contains("nothing was allocated") && !message.contains("bug"))
    }

    @Test func unknownErrorsStayInternal() {
        struct Unexpected: Error {}
        #expect(ABIStatus.classify(Unexpected()).status == FLASHMOE_ERROR_INTERNAL)
    }
}
