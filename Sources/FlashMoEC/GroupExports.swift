import CCUDA
import CFlashMoEABI
import FlashMoE

// The C entry points of include/flashmoe.h for expert-parallel groups (one process per GPU). Each runs inside
// `ABIStatus.run` and checks every argument before it reads or writes through a caller's pointer.

/// `flashmoe_expert_range`: the experts rank `rank` of `world_size` owns.
@_cdecl("flashmoe_expert_range")
public func flashmoe_expert_range(
    _ experts: Int32, _ worldSize: Int32, _ rank: Int32, _ first: UnsafeMutablePointer<Int32>?,
    _ count: UnsafeMutablePointer<Int32>?
) -> flashmoe_status_t {
    ABIStatus.run {
        let firstOut = try Check.output(first, "first"), countOut = try Check.output(count, "count")
        let e = try Check.atLeast(experts, 1, "experts", "E")
        let world = try Check.atLeast(worldSize, 1, "world_size", "ranks in the group")
        guard world <= e else {
            throw ArgumentError("world_size (\(world)) exceeds experts (\(e)): every rank needs at least one expert")
        }
        guard rank >= 0, Int(rank) < world else {
            throw ArgumentError("rank is \(rank) but must be between 0 and world_size - 1 (\(world - 1))")
        }
        let range = try ExpertPlacement(experts: e, ranks: world).experts(of: Int(rank))
        firstOut.pointee = Int32(range.lowerBound)
        countOut.pointee = Int32(range.count)
    }
}

/// `flashmoe_group_create`: checks its arguments, meets the other ranks through the caller's all-gather and
/// creates this process's rank; writes the handle to `*group` (NULL on failure, when `group` itself is valid).
@_cdecl("flashmoe_group_create")
public func flashmoe_group_create(
    _ config: UnsafePointer<flashmoe_config_t>?, _ weights: UnsafePointer<flashmoe_weights_t>?,
    _ groupConfig: UnsafePointer<flashmoe_group_config_t>?, _ group: UnsafeMutablePointer<flashmoe_group_t?>?
) -> flashmoe_status_t {
    ABIStatus.run {
        let out = try Check.output(group, "group")
        out.pointee = nil
        let handle = try GroupHandle(config: config, weights: weights, groupConfig: groupConfig)
        out.pointee = Handles.groups.register(handle)
    }
}

/// `flashmoe_group_forward`: one forward of this rank's tokens, enqueued on `stream`.
@_cdecl("flashmoe_group_forward")
public func flashmoe_group_forward(
    _ group: flashmoe_group_t?, _ x: UnsafeRawPointer?, _ y: UnsafeMutableRawPointer?, _ tokens: Int64,
    _ tokensPerRank: UnsafePointer<Int64>?, _ topkIDs: UnsafeMutablePointer<Int32>?,
    _ topkWeights: UnsafeMutablePointer<Float>?, _ stream: UnsafeMutableRawPointer?
) -> flashmoe_status_t {
    ABIStatus.run {
        let handle = try Handles.groups.lookup(group)
        try handle.serialized { rank in
            let s = handle.settings, world = handle.group.worldSize
            guard tokens >= 0, tokens <= Int64(s.maxTokens) else {
                throw ArgumentError(
                    "tokens is \(tokens) but must be between 0 and config->max_tokens (\(s.maxTokens)) of this group")
            }
            let h = s.config.hiddenSize, storage = s.config.precision.storage
            let xAddress = try Check.rows(x, "x", tokens: tokens, alignment: 16, "[tokens, \(h)] \(storage)")
            let yType = s.floatOutput ? "float32" : "\(storage)"
            let yAddress = try Check.rows(
                UnsafeRawPointer(y), "y", tokens: tokens, alignment: 16, "[tokens, \(h)] \(yType)")
            if let topkIDs { try Check.aligned(UInt(bitPattern: topkIDs), "topk_ids", 4, "int32") }
            if let topkWeights { try Check.aligned(UInt(bitPattern: topkWeights), "topk_weights", 4, "float32") }
            var counts: [Int]?
            if let tokensPerRank {
                try Check.aligned(UInt(bitPattern: tokensPerRank), "tokens_per_rank", 8, "int64")
                let given = (0..<world).map { Int(tokensPerRank[$0]) }
                if let (q, n) = given.enumerated().first(where: { $0.element < 0 || $0.element > s.maxTokens }) {
                    throw ArgumentError(
                        "tokens_per_rank[\(q)] is \(n) but must be between 0 and config->max_tokens (\(s.maxTokens))")
                }
                guard given[handle.group.rank] == Int(tokens) else {
                    throw ArgumentError(
                        "tokens_per_rank[\(handle.group.rank)] is \(given[handle.group.rank]) but this rank passes "
                            + "tokens = \(tokens): entry `rank` must be this call's own count")
                }
                counts = given
            }
            try rank.forward(
                DeviceForward(
                    input: xAddress, output: yAddress, tokens: Int(tokens),
                    topKIDs: topkIDs.map { UInt64(UInt(bitPattern: $0)) },
                    topKWeights: topkWeights.map { UInt64(UInt(bitPattern: $0)) },
                    stream: stream.map(OpaquePointer.init), outputType: s.floatOutput ? .float32 : .storage),
                tokensPerRank: counts)
        }
    }
}

/// `flashmoe_group_check`: a kernel error the group recorded, after waiting for `stream` when asked.
@_cdecl("flashmoe_group_check")
public func flashmoe_group_check(_ group: flashmoe_group_t?, _ synchronize: Int32, _ stream: UnsafeMutableRawPointer?)
    -> flashmoe_status_t
{
    ABIStatus.run {
        let handle = try Handles.groups.lookup(group)
        try handle.serialized { rank in
            if synchronize != 0 {
                try rank.checkErrors(synchronizing: stream.map(OpaquePointer.init))
            } else {
                try rank.checkErrors()
            }
        }
    }
}

/// `flashmoe_group_info`: fills `*info` (the caller sets `info->size`).
@_cdecl("flashmoe_group_info")
public func flashmoe_group_info(_ group: flashmoe_group_t?, _ info: UnsafeMutablePointer<flashmoe_group_info_t>?)
    -> flashmoe_status_t
{
    ABIStatus.run {
        let handle = try Handles.groups.lookup(group)
        try handle.describe(try Check.sizedOutput(info, "info", type: "flashmoe_group_info_t"))
    }
}

/// `flashmoe_group_destroy`: leaves the group (collective unless it failed) and frees the rank; NULL is a no-op.
@_cdecl("flashmoe_group_destroy")
public func flashmoe_group_destroy(_ group: flashmoe_group_t?) -> flashmoe_status_t {
    ABIStatus.run {
        guard let group else { return }
        let handle = try Handles.groups.lookup(group)
        try Handles.groups.destroy(group)
        try handle.serialized { try $0.close() }
    }
}
