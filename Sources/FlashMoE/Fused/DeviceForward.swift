import CCUDA

/// The element type a device forward writes its output in.
public enum FusedOutputType: Sendable, Hashable {
    /// FP32, whatever the layer's precision.
    case float32
    /// The precision's storage type: BF16 or FP16 for those layers (as PyTorch expects), FP32 otherwise.
    case storage
}

/// One device-resident forward (`FusedOperator.forward(_:)`): the caller's device memory, the token count and the
/// caller's stream. Every pointer is a device address on the operator's GPU (primary context).
///
/// - `input` [tokens, H] in the precision's storage type (FP32 for fp32/tf32, BF16 or FP16), 16-byte aligned.
/// - `output` [tokens, H] in `outputType`, 16-byte aligned.
/// - `topKIDs` [tokens, k] Int32 and `topKWeights` [tokens, k] Float32, 4-byte aligned; nil keeps them in the
///   operator's workspace. An unrouted rank (fewer finite logits than k) has id −1 and weight 0.
/// - `stream`: the `CUstream` to enqueue on (nil: the legacy default stream of the operator's context).
///
/// Not `Sendable`: it carries a raw stream handle, which belongs to the calling thread's framework.
public struct DeviceForward {
    /// x [tokens, H], storage type.
    public var input: CUdeviceptr
    /// y [tokens, H], `outputType`.
    public var output: CUdeviceptr
    /// S: 0 ≤ S ≤ the operator's `maxTokens` (S = 0 launches nothing).
    public var tokens: Int
    /// Optional [tokens, k] Int32 expert ids (nil: kept in the workspace).
    public var topKIDs: CUdeviceptr?
    /// Optional [tokens, k] Float32 routing weights (nil: kept in the workspace).
    public var topKWeights: CUdeviceptr?
    /// The stream to enqueue the launch on (nil: the legacy default stream).
    public var stream: CUstream?
    /// The output's element type.
    public var outputType: FusedOutputType
    /// Test builds only (`FusedOptions.injectFault`): this launch skips a publication, so a wait expires and the
    /// fault surfaces as a `FusedKernelError` on the next call or `checkErrors`.
    public var injectFault: Bool

    /// A forward of `tokens` rows from `input` to `output`; the routing buffers, stream and output type are optional.
    public init(
        input: CUdeviceptr, output: CUdeviceptr, tokens: Int, topKIDs: CUdeviceptr? = nil,
        topKWeights: CUdeviceptr? = nil, stream: CUstream? = nil, outputType: FusedOutputType = .float32,
        injectFault: Bool = false
    ) {
        self.input = input
        self.output = output
        self.tokens = tokens
        self.topKIDs = topKIDs
        self.topKWeights = topKWeights
        self.stream = stream
        self.outputType = outputType
        self.injectFault = injectFault
    }
}
