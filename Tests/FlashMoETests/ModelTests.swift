import Testing
@testable import FlashMoE

@Suite struct ModelTests {
    @Test func presetsValidate() throws {
        for p in Preset.all { try p.config.validate() }
    }
}
