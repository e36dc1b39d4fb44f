import CFlashMoEABI
import FlashMoE

// The C entry points of include/flashmoe.h. Each one runs inside `ABIStatus.run`, so no Swift error crosses the
// boundary, and checks every argument before it reads or writes through a caller's pointer.

/// `flashmoe_version`: FLASHMOE_VERSION of the header this library was built with.
@_cdecl("flashmoe_version")
public func flashmoe_version() -> Int32 { Int32(LibraryVersion.number) }

/// `flashmoe_status_string`: fixed text for a status code (never NULL).
@_cdecl("flashmoe_status_string")
public func flashmoe_status_string(_ status: flashmoe_status_t) -> UnsafePointer<CChar> { ABIStatus.text(status) }

/// `flashmoe_last_error`: the calling thread's message for its last failed call ("" when none).
@_cdecl("flashmoe_last_error")
public func flashmoe_last_error() -> UnsafePointer<CChar> { LastError.current() }

/// `flashmoe_layer_create`: checks the config and weights, builds the layer and writes its handle to `*layer`
/// (NULL on failure, when `layer` itself is valid).
@_cdecl("flashmoe_layer_create")
public func flashmoe_layer_create(
    _ config: UnsafePointer<flashmoe_config_t>?, _ weights: UnsafePointer<flashmoe_weights_t>?,
    _ layer: UnsafeMutablePointer<flashmoe_layer_t?>?
) -> flashmoe_status_t {
    ABIStatus.run {
        let out = try Check.output(layer, "layer")
        out.pointee = nil
        let settings = try LayerSettings(config)
        let engine: any LayerEngine
        switch settings.backend {
        case .cpu: engine = try CPULayer(settings: settings, weights: weights)
        case .cuda: engine = try GPULayer(settings: settings, weights: weights)
        }
        out.pointee = Handles.layers.register(LayerHandle(engine: engine))
    }
}

/// `flashmoe_layer_forward`: one forward over `tokens` rows of x.
@_cdecl("flashmoe_layer_forward")
public func flashmoe_layer_forward(
    _ layer: flashmoe_layer_t?, _ x: UnsafeRawPointer?, _ y: UnsafeMutableRawPointer?, _ tokens: Int64,
    _ topkIDs: UnsafeMutablePointer<Int32>?, _ topkWeights: UnsafeMutablePointer<Float>?,
    _ stream: UnsafeMutableRawPointer?
) -> flashmoe_status_t {
    ABIStatus.run {
        let handle = try Handles.layers.lookup(layer)
        try handle.serialized { engine in
            let s = engine.settings
            guard tokens >= 0, tokens <= Int64(s.maxTokens) else {
                throw ArgumentError(
                    "tokens is \(tokens) but must be between 0 and config->max_tokens (\(s.maxTokens)) of this layer")
            }
            let storage = s.config.precision.storage
            func address(_ p: UnsafeRawPointer?, _ name: String, _ alignment: Int, _ what: String) throws(ArgumentError)
                -> UInt64
            { try Check.rows(p, name, tokens: tokens, alignment: alignment, what) }
            let h = s.config.hiddenSize
            let xAddress = try address(
                x, "x", max(storage.byteSize, engine.rowAlignment), "[tokens, \(h)] \(storage)")
            let yType = engine.outputElementBytes == 4 ? "float32" : "\(storage)"
            let yAddress = try address(
                UnsafeRawPointer(y), "y", max(engine.outputElementBytes, engine.rowAlignment), "[tokens, \(h)] \(yType)")
            if let topkIDs { try Check.aligned(UInt(bitPattern: topkIDs), "topk_ids", 4, "int32") }
            if let topkWeights { try Check.aligned(UInt(bitPattern: topkWeights), "topk_weights", 4, "float32") }
            try engine.forward(
                ForwardArguments(
                    x: xAddress, y: yAddress, tokens: Int(tokens), ids: topkIDs, weights: topkWeights, stream: stream))
        }
    }
}

/// `flashmoe_layer_check`: a kernel error an earlier forward left, after waiting for `stream` when asked.
@_cdecl("flashmoe_layer_check")
public func flashmoe_layer_check(_ layer: flashmoe_layer_t?, _ synchronize: Int32, _ stream: UnsafeMutableRawPointer?)
    -> flashmoe_status_t
{
    ABIStatus.run {
        let handle = try Handles.layers.lookup(layer)
        try handle.serialized { try $0.check(synchronize: synchronize != 0, stream: stream) }
    }
}

/// `flashmoe_layer_info`: fills `*info` (the caller sets `info->size`).
@_cdecl("flashmoe_layer_info")
public func flashmoe_layer_info(_ layer: flashmoe_layer_t?, _ info: UnsafeMutablePointer<flashmoe_layer_info_t>?)
    -> flashmoe_status_t
{
    ABIStatus.run {
        let handle = try Handles.layers.lookup(layer)
        let out = try Check.sizedOutput(info, "info", type: "flashmoe_layer_info_t")
        try handle.serialized { engine in engine.describe(&out.pointee) }
    }
}

/// `flashmoe_layer_destroy`: frees the layer; NULL is a no-op.
@_cdecl("flashmoe_layer_destroy")
public func flashmoe_layer_destroy(_ layer: flashmoe_layer_t?) -> flashmoe_status_t {
    ABIStatus.run { try Handles.layers.destroy(layer) }
}
