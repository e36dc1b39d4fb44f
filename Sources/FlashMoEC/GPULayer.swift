import CFlashMoEABI
import FlashMoE

/// A layer on the fused GPU operator. Wired to the device-resident forward once it lands (see issue 10).
final class GPULayer: LayerEngine {
    let settings: LayerSettings
    var outputElementBytes: Int { settings.floatOutput ? 4 : settings.config.precision.storage.byteSize }
    var rowAlignment: Int { 16 }

    init(settings: LayerSettings, weights: UnsafePointer<flashmoe_weights_t>?) throws {
        _ = try WeightPointers(checking: weights, config: settings.config)
        throw UnsupportedError("config->backend = FLASHMOE_BACKEND_CUDA is not available in this build yet: use FLASHMOE_BACKEND_CPU")
    }

    func forward(_ arguments: ForwardArguments) throws {}
    func check(synchronize: Bool, stream: UnsafeMutableRawPointer?) throws {}
    func describe(_ info: inout flashmoe_layer_info_t) {}
}
