import CCUDA
import CFlashMoEABI
import FlashMoE
import Synchronization

/// One rank of an expert-parallel group behind a `flashmoe_group_t`: the `RankProcessMoE` built over the caller's
/// all-gather, and the settings it was created from. Calls on one rank are serialised by `calls`.
final class GroupHandle: Sendable {
    let settings: LayerSettings
    let group: GroupSettings
    let rank: RankProcessMoE
    let calls = Mutex(())

    /// Creates this process's rank (collective: see `flashmoe_group_create`). Once the group config is valid
    /// (the all-gather can be called), a rank that fails a check of its own still takes part in the next step,
    /// with the reason, so every other rank fails at once instead of waiting in the all-gather.
    init(
        config: UnsafePointer<flashmoe_config_t>?, weights: UnsafePointer<flashmoe_weights_t>?,
        groupConfig: UnsafePointer<flashmoe_group_config_t>?
    ) throws {
        let group = try GroupSettings(groupConfig)
        let allGather = group.allGather
        let exchange = try AllGatherExchange(rank: group.rank, worldSize: group.worldSize) { try allGather($0) }
        let settings: LayerSettings, pointers: WeightPointers
        do {
            settings = try LayerSettings(config)
            try group.check(experts: settings.config.experts)
            guard settings.backend == .cuda else {
                throw UnsupportedError(
                    "config->backend is FLASHMOE_BACKEND_CPU, but an expert-parallel group runs on GPUs only: use "
                        + "FLASHMOE_BACKEND_CUDA (or one flashmoe_layer_t with every expert on the CPU)")
            }
            pointers = try WeightPointers(checking: weights, config: settings.config)
        } catch {
            exchange.abort("rank \(group.rank): \(ABIStatus.classify(error).message)")
            throw error
        }
        rank = try RankProcessMoE.create(
            rendezvous: exchange, config: settings.config, weights: .device(pointers, allExperts: group.allExperts),
            maxTokens: settings.maxTokens, options: settings.fusedOptions)
        self.settings = settings
        self.group = group
    }

    /// Runs `body` with the rank, one call at a time.
    func serialized<R>(_ body: (RankProcessMoE) throws -> R) throws -> R {
        try calls.withLock { _ in try body(rank) }
    }

    /// Fills the fields of `*info` other than `size`.
    func describe(_ info: UnsafeMutablePointer<flashmoe_group_info_t>) throws {
        try serialized { rank in
            let experts = rank.placement.experts(of: rank.rank)
            info.pointee.max_tokens = Int64(rank.maxTokens)
            info.pointee.weight_bytes = Int64(rank.weightBytes)
            info.pointee.workspace_bytes = Int64(rank.arenaBytes)
            info.pointee.world_size = Int32(rank.placement.ranks)
            info.pointee.rank = Int32(rank.rank)
            info.pointee.first_expert = Int32(experts.lowerBound)
            info.pointee.local_experts = Int32(experts.count)
            info.pointee.device = Int32(settings.device)
            info.pointee.grid_blocks = Int32(rank.blocksPerRank)
            info.pointee.gate_split = Int32(rank.lastGateSplit)
            info.pointee.reserved = 0
        }
    }
}
