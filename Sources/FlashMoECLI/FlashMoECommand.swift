import ArgumentParser
import FlashMoE

/// The `flashmoe` command line: run, verify, bench, info, compile.
public struct FlashMoECommand: ParsableCommand {
    public static let configuration = CommandConfiguration(
        commandName: "flashmoe",
        abstract: "FlashMoE: a whole Mixture-of-Experts layer in one GPU kernel, with a CPU oracle.",
        subcommands: [
            RunCommand.self, VerifyCommand.self, BenchCommand.self, InfoCommand.self, CompileCommand.self,
            SelfTestCommand.self, FuzzCommand.self, SoakCommand.self,
        ])

    public init() {}
}
