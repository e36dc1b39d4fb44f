/// Which kernel launch runs which ranks: one launch per entry of `devices` (a GPU ordinal), the ranks split over
/// the launches in contiguous blocks, the first R mod L launches one rank larger.
///
/// `[0]` runs every rank in one cooperative launch on GPU 0. `[0, 1, 2, 3]` is four GPUs, one launch each, whose
/// ranks reach each other through peer-mapped memory. An ordinal may repeat: `[0, 0]` makes two launches on GPU 0
/// that run side by side on separate streams and talk through the same flags and stores as two GPUs would, which
/// is how the per-GPU launch path is tested on one GPU.
public struct RankLaunchPlan: Sendable, Hashable {
    /// The GPU of each launch.
    public let devices: [Int]
    /// Ranks R over all launches.
    public let ranks: Int

    /// Checks that every launch gets at least one rank and that the ordinals are valid numbers.
    public init(ranks: Int, devices: [Int]) throws(MoEError) {
        guard !devices.isEmpty else { throw MoEError(.invalidConfig, "give at least one GPU to run the ranks on") }
        if let bad = devices.first(where: { $0 < 0 }) {
            throw MoEError(.invalidConfig, "GPU ordinals are 0 or more (got \(bad))")
        }
        guard ranks >= devices.count else {
            throw MoEError(
                .invalidConfig,
                "\(devices.count) launches need at least \(devices.count) ranks (got \(ranks)): use more ranks or fewer GPUs")
        }
        self.devices = devices
        self.ranks = ranks
    }

    /// Launches L.
    public var launches: Int { devices.count }

    private var blocks: ContiguousBlocks { ContiguousBlocks(count: ranks, parts: launches) }

    /// The ranks launch `l` runs.
    public func ranks(of l: Int) -> Range<Int> { blocks.block(l) }

    /// The launch that runs rank `r`.
    public func launch(of r: Int) -> Int { blocks.part(of: r) }

    /// Ranks of all launches on GPU `ordinal` (they share its SMs).
    public func ranks(onDevice ordinal: Int) -> Int {
        devices.indices.filter { devices[$0] == ordinal }.reduce(0) { $0 + ranks(of: $1).count }
    }

    /// Whether launch `l` shares its GPU with another launch.
    public func sharesDevice(_ l: Int) -> Bool { devices.filter { $0 == devices[l] }.count > 1 }
}
