/// A Hugging Face checkpoint that cannot be loaded or written as an MoE layer. The message names the file,
/// field or tensor and says what to change.
public struct CheckpointError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of problem it is, for callers and tests that branch on it.
    public enum Kind: String, Sendable, Hashable {
        /// config.json is missing, unreadable, or lacks / mistypes a field.
        case invalidConfig
        /// `model_type` is not one of the supported families.
        case unknownFamily
        /// The checkpoint uses a feature this loader does not implement (or the layer does not fit the family).
        case unsupported
        /// The layer index is not below `num_hidden_layers`.
        case layerOutOfRange
        /// The layer exists but has a dense MLP, not an MoE block.
        case denseLayer
        /// A tensor the layer needs is absent.
        case missingTensor
        /// A tensor's shape disagrees with config.json.
        case shapeMismatch
        /// A safetensors file or index could not be read, or a tensor has a dtype that is not floating point.
        case safetensors
        /// An FP8 block scale (`weight_scale_inv`) is NaN or ±∞.
        case invalidScale
    }

    /// The category of the problem.
    public let kind: Kind
    /// What is wrong and what to change.
    public let message: String

    /// An error of `kind` with a message for the user.
    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    init(_ error: SafetensorsError) {
        self.init(.safetensors, error.message)
    }

    /// `message` alone (it already says what is wrong and what to change).
    public var description: String { message }
}
