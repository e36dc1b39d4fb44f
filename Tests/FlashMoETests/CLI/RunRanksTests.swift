import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// `flashmoe run --world-size N --rank r --rendezvous …` up to the GPU: option checks, the token split, and a
/// rank that is out of range telling the others through the store.
@Suite struct RunRanksTests {
    static let small = ["--preset", "paper-e32", "--hidden", "48", "--intermediate", "40", "--experts", "6", "--tokens", "10"]

    func run(_ arguments: [String]) throws -> CommandRun<MoEOutput> {
        try flashmoe(RunCommand.self, Self.small + arguments, context: .noGPU())
    }

    func cliKind(_ arguments: [String]) -> CLIError.Kind? {
        do {
            _ = try run(arguments)
            return nil
        } catch { return (error as? CLIError)?.kind }
    }

    @Test func theRankOptionsGoTogetherAndRunOnTheGPU() {
        #expect(cliKind(["--world-size", "2"]) == .missingOption)
        #expect(cliKind(["--rank", "0", "--rendezvous", "dir:/tmp/x"]) == .missingOption)
        #expect(cliKind(["--world-size", "2", "--rank", "0", "--rendezvous", "dir:/tmp/x", "--backend", "cpu"])
            == .conflictingOptions)
        #expect(cliKind(["--world-size", "2", "--rank", "0", "--rendezvous", "dir:/tmp/x", "--calls", "0"])
            == .invalidValue)
        #expect {
            _ = try run(["--world-size", "2", "--rank", "0", "--rendezvous", "localhost:1234"])
        } throws: { error in
            (error as? RendezvousError)?.kind == .badAddress
        }
    }

    @Test func aRankOutOfRangeFailsAndPostsWhy() throws {
        guard case .success(let path) = SystemFiles.makeTemporaryDirectory(prefix: "flashmoe-cli-rdzv") else { return }
        defer { SystemFiles.removeDirectory(path) }
        #expect {
            _ = try run(["--world-size", "2", "--rank", "2", "--rendezvous", "dir:\(path)"])
        } throws: { error in
            (error as? RendezvousError)?.kind == .rankOutOfRange(rank: 2, worldSize: 2)
        }
        // Rank 0, arriving later, stops at once with that reason.
        #expect {
            _ = try run(["--world-size", "2", "--rank", "0", "--rendezvous", "dir:\(path)"])
        } throws: { error in
            guard let e = error as? RendezvousError else { return false }
            return e.kind == .aborted(by: 2) && e.message.contains("started as rank 2")
        }
    }

    @Test func theGlobalTokensSplitUnevenlyAndCompletely() {
        #expect(rankTokenSplit(tokens: 200, ranks: 4) == [20, 40, 60, 80])
        #expect(rankTokenSplit(tokens: 10, ranks: 3) == [1, 3, 6])
        #expect(rankTokenSplit(tokens: 2, ranks: 4) == [0, 0, 0, 2])
        #expect(rankTokenSplit(tokens: 7, ranks: 1) == [7])
    }
}
