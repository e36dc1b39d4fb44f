import CFlashMoEABI
import FlashMoE

/// A layer on the CPU backend: the caller's host weights copied into a `MoELayer` at creation, each forward the
/// fast FP32 path (`CPUBackend`, all cores) run before the call returns; y is always float32.
final class CPULayer: LayerEngine {
    let settings: LayerSettings
    private let backend: CPUBackend
    private let weightBytes: Int

    var outputElementBytes: Int { 4 }
    var rowAlignment: Int { 1 }  // each pointer is checked against its own element size

    init(settings: LayerSettings, weights: UnsafePointer<flashmoe_weights_t>?) throws {
        let c = settings.config
        if settings.injectFault {
            throw ArgumentError("config->flags: FLASHMOE_FLAG_INJECT_FAULT is for GPU layers; the CPU backend has no kernel")
        }
        let pointers = try WeightPointers(checking: weights, config: c)
        try Self.checkMemory(c)
        let layer = try MoELayer(config: c, weights: try MoEWeights(copyingHost: pointers, config: c))
        backend = try CPUBackend(layer: layer, mode: .fast, storageRows: settings.storageReturns)
        weightBytes = layer.weights.byteCount
        self.settings = settings
    }

    /// Refuses weights that could not fit in this machine's memory (the copy here plus the backend's packed FP32
    /// copy), before allocating anything: an allocation that fails would end the process.
    private static func checkMemory(_ c: MoEConfig) throws(HostMemoryError) {
        let (e, h, i) = (c.experts, c.hiddenSize, c.intermediateSize)
        let mult = c.ffn == .gated ? 3 : 2
        let elements = (e + 1) * h + e * i * h * mult + (c.sharedExpert?.intermediateSize ?? 0) * h * mult + e * (h + i)
        let (need, overflow) = elements.multipliedReportingOverflow(by: c.precision.storage.byteSize + 4)
        guard let physical = HostCopy.physicalMemoryBytes else { return }
        if overflow || need > physical {
            throw HostMemoryError(
                message: "the CPU backend needs about \(overflow ? "more than 2^63" : String(need / (1 << 20))) MiB "
                    + "for these weights (the copy and a packed FP32 copy) but this machine has \(physical / (1 << 20)) MiB: "
                    + "use a smaller layer or the GPU backend")
        }
    }

    func forward(_ a: ForwardArguments) throws {
        guard a.stream == nil else {
            throw ArgumentError(
                "stream must be NULL for a CPU layer (config->backend = FLASHMOE_BACKEND_CPU runs on the host, synchronously)")
        }
        guard a.tokens > 0 else { return }
        let c = settings.config
        let (h, k) = (c.hiddenSize, c.topK)
        let input = try HostCopy.tensor(a.x, shape: [a.tokens, h], type: c.precision.storage)
        let out = try backend.forward(input)
        // y, ids and weights are float32 / int32 arrays of exactly these counts (the backend's own shapes).
        let y = UnsafeMutableRawPointer(bitPattern: UInt(a.y))!
        out.output.withUnsafeBytes { y.copyMemory(from: $0.baseAddress!, byteCount: a.tokens * h * 4) }
        if let ids = a.ids {
            out.routing.expertIDs.withUnsafeBufferPointer { ids.update(from: $0.baseAddress!, count: a.tokens * k) }
        }
        if let weights = a.weights {
            out.routing.weights.withUnsafeBufferPointer { weights.update(from: $0.baseAddress!, count: a.tokens * k) }
        }
    }

    func check(synchronize: Bool, stream: UnsafeMutableRawPointer?) throws {
        guard stream == nil else {
            throw ArgumentError("stream must be NULL for a CPU layer (its forwards finish before they return)")
        }
    }

    func describe(_ info: inout flashmoe_layer_info_t) {
        info.max_tokens = Int64(settings.maxTokens)
        info.weight_bytes = Int64(weightBytes)
        info.workspace_bytes = 0
        info.backend = Int32(FLASHMOE_BACKEND_CPU.rawValue)
        info.device = -1
        info.grid_blocks = 0
        info.reserved = 0
    }
}
