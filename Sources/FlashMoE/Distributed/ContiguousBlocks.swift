/// `count` items split into `parts` contiguous blocks in order, the first `count mod parts` blocks one item larger:
/// experts over ranks (`ExpertPlacement`, and `rank_first` in moe.cu) and ranks over kernel launches
/// (`RankLaunchPlan`). Needs 1 ≤ parts ≤ count (the owners check it).
struct ContiguousBlocks: Sendable, Hashable {
    let count: Int
    let parts: Int

    /// The first item of block `p` (p = parts gives count).
    func first(of p: Int) -> Int { p * (count / parts) + min(p, count % parts) }

    /// The items of block `p`.
    func block(_ p: Int) -> Range<Int> { first(of: p)..<first(of: p + 1) }

    /// The block that holds item `i`.
    func part(of i: Int) -> Int {
        var p = 0
        while p + 1 < parts && first(of: p + 1) <= i { p += 1 }
        return p
    }
}
