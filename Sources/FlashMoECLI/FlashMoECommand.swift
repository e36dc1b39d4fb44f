import ArgumentParser
import FlashMoE

/// The `flashmoe` command line: run, verify, bench, info, compile.
public struct FlashMoECommand: ParsableCommand {
    /// The command's name `flashmoe`, its one-line abstract and its subcommands, `RunCommand` through `SoakCommand`.
    public static let configuration = CommandConfiguration(
        commandName: "flashmoe",
        abstract: "FlashMoE: a whole Mixture-of-Experts layer in one GPU kernel, with a CPU oracle.",
        subcommands: [
            RunCommand.self, VerifyCommand.self, BenchCommand.self, InfoCommand.self, CompileCommand.self,
            SelfTestCommand.self, FuzzCommand.self, SoakCommand.self,
        ])

    /// The command with no options of its own (ArgumentParser requires the empty initializer).
    public init() {}
}
