/// Options of the GPU operator.
public struct FusedOptions: Sendable, Hashable {
    /// The CUDA device to run on.
    public var deviceOrdinal: Int
    /// The time budget of every device-side wait. A wait that expires ends the launch with a `FusedKernelError`
    /// instead of a hung GPU. Generous by default: legitimate waits last microseconds to milliseconds.
    public var waitBudget: Duration
    /// Shared-memory pipeline stages (nil: the most, up to 4, that fit the GPU's shared memory per block; see
    /// `FusedSharedMemory.choose`).
    public var stages: Int?
    /// Fill the output with NaN before every launch of the host-array forward, so an element the kernel fails to
    /// write cannot pass a check.
    public var poisonOutput: Bool
    /// Build the test kernel that can skip one publication so a wait must expire (see `FusedKernelError`). The
    /// host-array forward then faults on every call; a device forward faults only when `DeviceForward.injectFault`
    /// asks for it, so a test can fault one call and run the next one cleanly.
    public var injectFault: Bool
    /// Timing builds only: stop after routing (1) or placement (2). The output is not valid.
    public var stopAfterPhase: Int
    /// The gate's K split (nil: chosen from the token count and the grid). Fixing it makes runs with different
    /// grids (for example ranks on one GPU) sum the gate's partial products alike, for bitwise comparisons. 0 asks
    /// for the decode gate, a dot-product task per router row (`gate_gemv.cuh`), which bf16, fp16 and fp8 kernels
    /// run for launches of at most 8 tokens (the automatic choice there); other launches take 0 as 1.
    public var gateSplit: Int?
    /// Ranks: build the kernel that records each rank's phase boundaries (`DistributedMoE.phaseTimes()`).
    public var recordPhaseTimes: Bool
    /// Launches after which the epoch restarts at 1. The kernel's flags carry the epoch in 32 bits. One GPU: the
    /// launch that reaches it clears the epoch-tagged words on the device and restarts the device epoch, with no
    /// host involvement (so CUDA graph replays wrap too). Ranks: the host waits for the device, zeroes the counters
    /// and flags once and starts over. Tests lower it to wrap the epoch within a few calls.
    public var epochWrap: UInt64
    /// Debug: after every device forward, wait for the stream and report a kernel error at once (instead of on
    /// the next call or `checkErrors`). The host-array forward always synchronises.
    public var synchronousErrors: Bool
    /// 16-bit layers: the routed experts' output rows are kept in the storage type (bf16/fp16) instead of FP32 —
    /// on one GPU the rows GEMM1 writes and the combine reads, with ranks the rows sent back to the token's rank
    /// (half those bytes either way). y then differs from FP32 rows' by one rounding of each expert output
    /// (`flashmoe verify` measures it), the same rounding on one GPU and with ranks, so one rank with this option
    /// gives the ranks' bits with it; routing, drops and slots are unchanged. Off by default.
    public var storageReturns: Bool = false
    /// Tracing builds: events each block can record (0: a normal build). See `FusedMoE.recordedTrace()`.
    public var traceEventsPerBlock: Int = 0
    /// Precision fp8 on sm_90a: launches of at least this many tokens run a second kernel, the TMA engine's build
    /// (`FusedPrefillEngine`), and smaller ones the cp.async tiles' kernel; nil: every launch runs the one kernel.
    /// The two give the same bits. The default is at or above where the TMA build overtakes at every preset
    /// (Benchmarks/RESULTS.md, round 27).
    public var prefillEngineTokens: Int? = FusedOptions.defaultPrefillEngineTokens

    /// `prefillEngineTokens`' default.
    public static let defaultPrefillEngineTokens = 256

    /// Options with the given values (defaults: device 0, 5 s waits, automatic stages and gate split, a normal
    /// build); `epochWrap` is raised to at least 1. `storageReturns`, `traceEventsPerBlock` and
    /// `prefillEngineTokens` are set afterwards.
    public init(
        deviceOrdinal: Int = 0, waitBudget: Duration = .seconds(5), stages: Int? = nil, poisonOutput: Bool = false,
        injectFault: Bool = false, stopAfterPhase: Int = 0, gateSplit: Int? = nil,
        epochWrap: UInt64 = UInt64(UInt32.max), recordPhaseTimes: Bool = false, synchronousErrors: Bool = false
    ) {
        self.recordPhaseTimes = recordPhaseTimes
        self.epochWrap = max(epochWrap, 1)
        self.deviceOrdinal = deviceOrdinal
        self.waitBudget = waitBudget
        self.stages = stages
        self.poisonOutput = poisonOutput
        self.injectFault = injectFault
        self.stopAfterPhase = stopAfterPhase
        self.gateSplit = gateSplit
        self.synchronousErrors = synchronousErrors
    }
}
