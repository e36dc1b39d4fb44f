import CCUDA

/// What every rank of a one-process-per-GPU group posts before anything is allocated, and the checks that make a
/// mismatch a typed error on every rank (each rank runs the same checks on the same records, so all of them
/// reach the same verdict and none launches).
public struct RankGroupCheck: Sendable, Hashable {
    /// SHA-256 of the layer's config and every weight's shape and type (computable without a GPU).
    public var configHash: String
    /// SHA-256 of the config, every weight's shape and type, and the router's values (every rank routes its own
    /// tokens, so their routers must be the same bits). Empty when this rank could not read its router (no driver).
    public var layerHash: String
    /// The config in words, to show both sides of a mismatch.
    public var layerSummary: String
    /// `cuDriverGetVersion` (e.g. 13000); 0 when this rank has no usable CUDA driver.
    public var driverVersion: Int
    /// Why this rank has no usable driver ("" when it has one).
    public var driverProblem: String
    /// The node (IPC memory needs all ranks on one).
    public var host: String
    /// The largest own token count a call may have.
    public var maxTokens: Int

    /// The record of `layer` on this process.
    public init(layer: MoELayer, driverVersion: Int, host: String, maxTokens: Int) {
        configHash = Self.configHash(layer.config, shapes: Self.shapes(layer))
        layerHash = Self.hash(layer)
        layerSummary = "\(layer.config)"
        self.driverVersion = driverVersion
        driverProblem = ""
        self.host = host
        self.maxTokens = maxTokens
    }

    /// The record of a layer whose weights live in device memory (the C ABI's groups): the weights' shapes follow
    /// from `config`; `routerValues` are the router's bytes and then the selection bias's, as read from the device
    /// (nil when this rank has no driver: `driverProblem` says why, and `driverVersion` is 0).
    public init(
        config: MoEConfig, routerValues: [UInt8]?, driverVersion: Int, driverProblem: String = "", host: String,
        maxTokens: Int
    ) {
        configHash = Self.configHash(config, shapes: "device weights of the config's shapes")
        if let routerValues {
            var h = SHA256()
            h.update("\(configHash)\n")
            routerValues.withUnsafeBytes { h.update($0) }
            layerHash = hexString(h.finalize())
        } else {
            layerHash = ""
        }
        layerSummary = "\(config)"
        self.driverVersion = driverVersion
        self.driverProblem = driverProblem
        self.host = host
        self.maxTokens = maxTokens
    }

    init(_ r: RendezvousRecord) {
        configHash = r["config"] ?? ""
        layerHash = r["layer"] ?? ""
        layerSummary = r["summary"] ?? ""
        driverVersion = r.int("driver") ?? 0
        driverProblem = r["driver_problem"] ?? ""
        host = r["host"] ?? ""
        maxTokens = r.int("max_tokens") ?? 0
    }

    var record: RendezvousRecord {
        RendezvousRecord([
            "config": configHash, "layer": layerHash, "summary": layerSummary, "driver": "\(driverVersion)",
            "driver_problem": driverProblem, "host": host, "max_tokens": "\(maxTokens)",
        ])
    }

    private static func configHash(_ config: MoEConfig, shapes: String) -> String {
        var h = SHA256()
        h.update("\(config)\n\(shapes)\n")
        return hexString(h.finalize())
    }

    private static func tensors(_ layer: MoELayer) -> [(String, HostTensor?)] {
        let w = layer.weights
        return [
            ("router", w.router), ("selection_bias", w.selectionBias), ("w1", w.w1), ("w3", w.w3), ("w2", w.w2),
            ("b1", w.b1), ("b2", w.b2),
        ]
    }

    private static func shapes(_ layer: MoELayer) -> String {
        tensors(layer).map { name, t in "\(name): \(t.map { "\($0.shape) \($0.elementType)" } ?? "none")" }
            .joined(separator: "\n")
    }

    /// The layer's fingerprint (see `layerHash`).
    public static func hash(_ layer: MoELayer) -> String {
        var h = SHA256()
        h.update("\(layer.config)\n")
        for (name, t) in tensors(layer) {
            h.update("\(name): \(t.map { "\($0.shape) \($0.elementType)" } ?? "none")\n")
        }
        layer.weights.router.withUnsafeBytes { h.update($0) }
        layer.weights.selectionBias?.withUnsafeBytes { h.update($0) }
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
        for (q, other) in all.enumerated().dropFirst() where other.configHash != first.configHash {
            throw mismatch(first, other, q, detail: "rank 0 has \(first.layerSummary); rank \(q) has \(other.layerSummary)")
        }
        let missing = all.enumerated().filter { $0.element.driverVersion == 0 }
        if let (q, r) = missing.first {
            throw RendezvousError(
                .noDriver(ranks: missing.map(\.offset)),
                "rank\(missing.count == 1 ? "" : "s") \(missing.map { String($0.offset) }.joined(separator: ", ")) "
                    + "of the group \(missing.count == 1 ? "has" : "have") no usable CUDA driver (rank \(q): "
                    + "\(r.driverProblem.isEmpty ? "unknown" : r.driverProblem)): an expert-parallel group runs on GPUs only")
        }
        for (q, other) in all.enumerated().dropFirst() {
            if other.layerHash != first.layerHash {
                throw mismatch(
                    first, other, q,
                    detail: "the configs and shapes are the same, so the router values differ (another --seed or "
                        + "checkpoint?)")
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
                        + "memory with CUDA IPC, which needs every rank on one node (between nodes: --transport nvshmem, docs/multinode.md)")
            }
            if other.maxTokens != first.maxTokens {
                throw RendezvousError(
                    .configMismatch(rank: 0, other: q),
                    "rank \(q) allows \(other.maxTokens) tokens per call, rank 0 \(first.maxTokens): the receive "
                        + "buffers are sized alike on every rank, so give every rank the same maximum")
            }
        }
    }

    private static func mismatch(_ first: RankGroupCheck, _ other: RankGroupCheck, _ q: Int, detail: String)
        -> RendezvousError
    {
        RendezvousError(
            .configMismatch(rank: 0, other: q),
            "rank \(q)'s layer differs from rank 0's (hash \(other.layerHash.prefix(12)) against "
                + "\(first.layerHash.prefix(12))): \(detail). Start every rank with the same layer")
    }
}

extension RankGroupCheck {
    /// This process's record for a rank of `config` from `weights`: the driver's version (or why there is none:
    /// then the record still carries the config, so the group reports a config mismatch before a missing driver),
    /// this node, `maxTokens`, and the router's values (host weights: the layer's; device weights: read from GPU
    /// `options.deviceOrdinal`).
    static func local(
        config: MoEConfig, weights: RankProcessMoE.Weights, maxTokens: Int, options: FusedOptions
    ) throws -> RankGroupCheck {
        let host = Rendezvous.hostName()
        let driver: CUDADriver
        var version: Int32 = 0
        do {
            driver = try CUDADriver.shared.get()
            try driver.check(driver.driverGetVersion(&version), "cuDriverGetVersion")
        } catch {
            return RankGroupCheck(
                config: config, routerValues: nil, driverVersion: 0, driverProblem: "\(error)", host: host,
                maxTokens: maxTokens)
        }
        switch weights {
        case .host(let layer):
            return RankGroupCheck(layer: layer, driverVersion: Int(version), host: host, maxTokens: maxTokens)
        case .device(let pointers, _):
            let device = try CUDADevice(ordinal: options.deviceOrdinal, driver: driver)
            let e = config.experts
            var values = try device.read(pointers.router, bytes: e * config.hiddenSize * config.precision.storage.byteSize,
                                         field: "router")
            if let bias = pointers.selectionBias { values += try device.read(bias, bytes: e * 4, field: "selection_bias") }
            return RankGroupCheck(
                config: config, routerValues: values, driverVersion: Int(version), host: host, maxTokens: maxTokens)
        }
    }
}

extension CUDADevice {
    /// `bytes` bytes of this GPU's memory at `address` (the weight `field`, named when the copy fails).
    func read(_ address: UInt64, bytes: Int, field: String) throws -> [UInt8] {
        try makeCurrent()
        var out = [UInt8](repeating: 0, count: bytes)
        let result = out.withUnsafeMutableBytes { driver.memcpyDtoH($0.baseAddress!, address, bytes, nil) }
        guard result == CUDA_SUCCESS else {
            throw CUDAError.invalidArgument(
                "weights->\(field) (0x\(String(address, radix: 16))) could not be read as device memory of GPU "
                    + "\(properties.ordinal) (\(driver.error(for: result, call: "cuMemcpyDtoH_v2"))): pass a device "
                    + "pointer of that GPU holding the whole tensor")
        }
        return out
    }
}
