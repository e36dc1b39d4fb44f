import CFlashMoEABI
import FlashMoE

/// A checked `flashmoe_group_config_t`: the rank's place in its group and the caller's all-gather.
struct GroupSettings {
    let worldSize: Int
    let rank: Int
    /// Whether the per-expert weight tensors hold every expert (else this rank's share).
    let allExperts: Bool
    let allGather: CAllGather

    init(_ pointer: UnsafePointer<flashmoe_group_config_t>?) throws(ArgumentError) {
        let g = try Check.versionedStruct(
            pointer, "group_config", initMacro: "FLASHMOE_GROUP_CONFIG_INIT", version: { $0.version })
        worldSize = try Check.atLeast(g.world_size, 1, "group_config->world_size", "ranks in the group")
        guard g.rank >= 0, Int(g.rank) < worldSize else {
            throw ArgumentError(
                "group_config->rank is \(g.rank) but must be between 0 and world_size - 1 (\(worldSize - 1))")
        }
        rank = Int(g.rank)
        allExperts = try Check.enumeration(
            g.weights, "group_config->weights",
            [(0, "FLASHMOE_GROUP_WEIGHTS_ALL", true), (1, "FLASHMOE_GROUP_WEIGHTS_SHARD", false)])
        guard let fn = g.allgather else {
            throw ArgumentError("group_config->allgather is NULL: pass the all-gather the ranks meet through")
        }
        allGather = CAllGather(function: fn, context: g.ctx, worldSize: worldSize)
    }

    /// Throws unless every rank can own an expert.
    func check(experts: Int) throws(ArgumentError) {
        guard worldSize <= experts else {
            throw ArgumentError(
                "group_config->world_size (\(worldSize)) exceeds config->experts (\(experts)): every rank needs at "
                    + "least one expert, so use at most \(experts) ranks")
        }
    }
}

/// The caller's C all-gather as the `AllGatherExchange` closure. `@unchecked Sendable`: the context pointer is
/// the caller's; the library calls it only on the thread of a collective call, as the header promises.
struct CAllGather: @unchecked Sendable {
    let function: flashmoe_allgather_fn
    let context: UnsafeMutableRawPointer?
    let worldSize: Int

    /// Every rank's block of `bytes.count` bytes, in rank order (`bytes` is never empty).
    func callAsFunction(_ bytes: [UInt8]) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: bytes.count * worldSize)
        let status = bytes.withUnsafeBytes { send in
            out.withUnsafeMutableBytes { recv in function(context, send.baseAddress, bytes.count, recv.baseAddress) }
        }
        guard status == 0 else { throw ArgumentError("the caller's all-gather returned \(status)") }
        return out
    }
}
