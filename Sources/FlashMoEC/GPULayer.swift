import CCUDA
import CFlashMoEABI
import FlashMoE
import Synchronization

/// A layer on the fused GPU operator (`FusedOperator`): weights copied from the caller's device memory at creation
/// (`FusedOperator.init(config:pointers:options:maxTokens:)`), the workspace sized for `max_tokens` once, and each
/// forward one kernel launch enqueued on the caller's stream over the caller's device pointers.
final class GPULayer: LayerEngine {
    let settings: LayerSettings
    private let op: FusedOperator
    /// FLASHMOE_FLAG_INJECT_FAULT: the first forward runs with an injected fault, later ones run normally.
    private let faultArmed: Mutex<Bool>

    var outputElementBytes: Int { settings.floatOutput ? 4 : settings.config.precision.storage.byteSize }
    var rowAlignment: Int { 16 }

    init(settings: LayerSettings, weights: UnsafePointer<flashmoe_weights_t>?) throws {
        let pointers = try WeightPointers(checking: weights, config: settings.config)
        do {
            op = try FusedOperator(
                config: settings.config, pointers: pointers, options: settings.fusedOptions,
                maxTokens: settings.maxTokens)
        } catch CUDAError.invalidArgument(let message) where message.hasPrefix("there is no GPU") {
            throw ArgumentError("config->device is \(settings.device): \(message)")
        }
        faultArmed = Mutex(settings.injectFault)
        self.settings = settings
    }

    func forward(_ a: ForwardArguments) throws {
        let inject = faultArmed.withLock { $0 } && a.tokens > 0
        try op.forward(
            DeviceForward(
                input: a.x, output: a.y, tokens: a.tokens, topKIDs: a.ids.map { UInt64(UInt(bitPattern: $0)) },
                topKWeights: a.weights.map { UInt64(UInt(bitPattern: $0)) }, stream: a.stream.map(OpaquePointer.init),
                outputType: settings.floatOutput ? .float32 : .storage, injectFault: inject))
        if inject { faultArmed.withLock { $0 = false } }  // disarmed once a faulting launch was enqueued
    }

    func check(synchronize: Bool, stream: UnsafeMutableRawPointer?) throws {
        if synchronize {
            try op.checkErrors(synchronizing: stream.map(OpaquePointer.init))
        } else {
            try op.checkErrors()
        }
    }

    func describe(_ info: inout flashmoe_layer_info_t) {
        info.max_tokens = Int64(settings.maxTokens)
        info.weight_bytes = Int64(op.weightBytes)
        info.workspace_bytes = Int64(op.workspaceBytes)
        info.backend = Int32(FLASHMOE_BACKEND_CUDA.rawValue)
        info.device = Int32(settings.device)
        info.grid_blocks = Int32(op.gridBlocks)
        info.reserved = 0
    }
}
