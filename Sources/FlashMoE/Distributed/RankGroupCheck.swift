/// What every rank of a one-process-per-GPU group posts before anything is allocated, and the checks that make a
/// mismatch a typed error on every rank (each rank runs the same checks on the same records, so all of them
/// reach the same verdict and none launches).
public struct RankGroupCheck: Sendable, Hashable {
    /// SHA-256 of the layer's config, every weight's shape and type, and the router's values (every rank routes
    /// its own tokens, so their routers must be the same bits).
    public var layerHash: String
    /// The config in words, to show both sides of a mismatch.
    public var layerSummary: String
    /// `cuDriverGetVersion` (e.g. 13000).
    public var driverVersion: Int
    /// The node (IPC memory needs all ranks on one).
    public var host: String
    /// The largest own token count a call may have.
    public var maxTokens: Int

    /// The record of `layer` on this process.
    public init(layer: MoELayer, driverVersion: Int, host: String, maxTokens: Int) {
        layerHash = Self.hash(layer)
        layerSummary = "\(layer.config)"
        self.driverVersion = driverVersion
        self.host = host
        self.maxTokens = maxTokens
    }

    init(_ r: RendezvousRecord) {
        layerHash = r["layer"] ?? ""
        layerSummary = r["summary"] ?? ""
        driverVersion = r.int("driver") ?? 0
        host = r["host"] ?? ""
        maxTokens = r.int("max_tokens") ?? 0
    }

    var record: RendezvousRecord {
        RendezvousRecord([
            "layer": layerHash, "summary": layerSummary, "driver": "\(driverVersion)", "host": host,
            "max_tokens": "\(maxTokens)",
        ])
    }

    /// The layer's fingerprint (see `layerHash`).
    public static func hash(_ layer: MoELayer) -> String {
        var h = SHA256()
        h.update("\(layer.config)\n")
        let w = layer.weights
        let tensors: [(String, HostTensor?)] = [
            ("router", w.router), ("selection_bias", w.selectionBias), ("w1", w.w1), ("w3", w.w3), ("w2", w.w2),
            ("b1", w.b1), ("b2", w.b2),
        ]
        for (name, t) in tensors {
            h.update("\(name): \(t.map { "\($0.shape) \($0.elementType)" } ?? "none")\n")
        }
        w.router.withUnsafeBytes { h.update($0) }
        w.selectionBias?.withUnsafeBytes { h.update($0) }
        return hexString(h.finalize())
    }

    /// Posts this rank's record and checks every rank's against rank 0's: same layer, driver, node and token limit.
    /// Returns every rank's record.
    ///
    /// - Throws: `RendezvousError` (`configMismatch`, `driverMismatch`, `differentNodes`, `invalidWorld`), naming
    ///   the first rank that differs from rank 0, and whatever the all-gather throws.
    public func exchange(_ rendezvous: any RankExchange) throws -> [RankGroupCheck] {
        let all = try rendezvous.allGather("layer check", record.bytes).map { RankGroupCheck(RendezvousRecord(bytes: $0)) }
        try Self.verify(all)
        return all
    }

    /// The checks of `exchange` on the records of every rank (index = rank).
    public static func verify(_ all: [RankGroupCheck]) throws(RendezvousError) {
        guard let first = all.first else { return }
        for (q, other) in all.enumerated().dropFirst() {
            if other.layerHash != first.layerHash {
                let detail = other.layerSummary == first.layerSummary
                    ? "the configs read the same, so the weights' shapes, types or router values differ (another "
                        + "--seed or checkpoint?)"
                    : "rank 0 has \(first.layerSummary); rank \(q) has \(other.layerSummary)"
                throw RendezvousError(
                    .configMismatch(rank: 0, other: q),
                    "rank \(q)'s layer differs from rank 0's (hash \(other.layerHash.prefix(12)) against "
                        + "\(first.layerHash.prefix(12))): \(detail). Start every rank with the same layer")
            }
            if other.driverVersion != first.driverVersion {
                throw RendezvousError(
                    .driverMismatch(rank: 0, other: q),
                    "rank \(q) runs CUDA driver \(other.driverVersion), rank 0 runs \(first.driverVersion): every rank "
                        + "must use the same driver (one node, one libcuda.so.1)")
            }
            if other.host != first.host {
                throw RendezvousError(
                    .differentNodes(rank: 0, other: q),
                    "rank \(q) runs on \(other.host), rank 0 on \(first.host): one process per GPU maps its peers' "
                        + "memory with CUDA IPC, which needs every rank on one node (between nodes: NVSHMEM, not built yet)")
            }
            if other.maxTokens != first.maxTokens {
                throw RendezvousError(
                    .configMismatch(rank: 0, other: q),
                    "rank \(q) allows \(other.maxTokens) tokens per call, rank 0 \(first.maxTokens): the receive "
                        + "buffers are sized alike on every rank, so give every rank the same maximum")
            }
        }
    }
}
