import CFlashMoEABI
import FlashMoE

/// A bad argument found at the ABI boundary, before any work: `message` names the argument or struct field and
/// says what it expects (FLASHMOE_ERROR_INVALID_ARGUMENT).
struct ArgumentError: Error, CustomStringConvertible {
    let message: String
    init(_ message: String) { self.message = message }
    var description: String { message }
}

/// Valid arguments this build or machine cannot serve (FLASHMOE_ERROR_UNSUPPORTED).
struct UnsupportedError: Error, CustomStringConvertible {
    let message: String
    init(_ message: String) { self.message = message }
    var description: String { message }
}

/// Host memory that does not suffice (FLASHMOE_ERROR_OUT_OF_MEMORY), found before allocating.
struct HostMemoryError: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}

/// How every error the library can meet becomes a status code and a message: the one mapping all entry points use.
enum ABIStatus {
    /// The status and message for `error`.
    ///
    /// - `ArgumentError`, and `MoEError` other than `.unsupported` (config, shape or input mistakes): INVALID_ARGUMENT.
    /// - `UnsupportedError`, `MoEError.unsupported`, `CUDAError.driverTooOld`: UNSUPPORTED.
    /// - `CUDAError.outOfMemory`, `HostMemoryError`, `DeviceMemoryError` (the estimate did not fit, nothing was
    ///   allocated): OUT_OF_MEMORY.
    /// - `CUDAError.invalidArgument` (e.g. a device ordinal the machine does not have): INVALID_ARGUMENT.
    /// - every other `CUDAError` (no driver, no GPU, a failed driver call, an NVRTC failure): CUDA.
    /// - `FusedKernelError` (the kernel gave up on a wait; the operator has reset itself): KERNEL.
    /// - `DistributedError` (a rank's wait expired; the group is unusable): KERNEL. `PeerMappingError`: CUDA.
    /// - `RendezvousError`: `status(of:)`.
    /// - anything else: INTERNAL, with the error's type in the message.
    static func classify(_ error: any Error) -> (status: flashmoe_status_t, message: String) {
        switch error {
        case let e as ArgumentError: return (FLASHMOE_ERROR_INVALID_ARGUMENT, e.message)
        case let e as UnsupportedError: return (FLASHMOE_ERROR_UNSUPPORTED, e.message)
        case let e as HostMemoryError: return (FLASHMOE_ERROR_OUT_OF_MEMORY, e.message)
        case let e as DeviceMemoryError: return (FLASHMOE_ERROR_OUT_OF_MEMORY, e.description)
        case let e as MoEError:
            return (e.kind == .unsupported ? FLASHMOE_ERROR_UNSUPPORTED : FLASHMOE_ERROR_INVALID_ARGUMENT, e.message)
        case let e as CUDAError:
            switch e {
            case .outOfMemory: return (FLASHMOE_ERROR_OUT_OF_MEMORY, e.description)
            case .driverTooOld: return (FLASHMOE_ERROR_UNSUPPORTED, e.description)
            case .invalidArgument: return (FLASHMOE_ERROR_INVALID_ARGUMENT, e.description)
            default: return (FLASHMOE_ERROR_CUDA, e.description)
            }
        case let e as FusedKernelError:
            return (FLASHMOE_ERROR_KERNEL, e.description + " The layer was reset; the next forward runs normally.")
        case let e as DistributedError:
            return (
                FLASHMOE_ERROR_KERNEL,
                e.description + ". The group is unusable: destroy it on every rank and create it again.")
        case let e as PeerMappingError: return (FLASHMOE_ERROR_CUDA, e.description)
        case let e as RendezvousError: return (status(of: e.kind), e.message)
        default:
            return (FLASHMOE_ERROR_INTERNAL, "unexpected \(type(of: error)): \(error) (a FlashMoE bug: please report it)")
        }
    }

    /// The status of a group error: the caller's mistake (ranks, world size, configs: INVALID_ARGUMENT), this
    /// machine (no driver: CUDA; several drivers or nodes: UNSUPPORTED), or another rank or the all-gather (GROUP).
    static func status(of kind: RendezvousError.Kind) -> flashmoe_status_t {
        switch kind {
        case .rankOutOfRange, .duplicateRank, .worldSizeMismatch, .configMismatch, .invalidWorld, .outOfStep:
            FLASHMOE_ERROR_INVALID_ARGUMENT
        case .noDriver: FLASHMOE_ERROR_CUDA
        case .driverMismatch, .differentNodes: FLASHMOE_ERROR_UNSUPPORTED
        case .timeout, .badAddress, .unreachable, .aborted: FLASHMOE_ERROR_GROUP
        }
    }

    /// Fixed text for a status code.
    static func text(_ status: flashmoe_status_t) -> UnsafePointer<CChar> {
        switch status {
        case FLASHMOE_SUCCESS: StaticText.pointer("success")
        case FLASHMOE_ERROR_INVALID_ARGUMENT: StaticText.pointer("invalid argument")
        case FLASHMOE_ERROR_UNSUPPORTED: StaticText.pointer("unsupported")
        case FLASHMOE_ERROR_CUDA: StaticText.pointer("CUDA error")
        case FLASHMOE_ERROR_OUT_OF_MEMORY: StaticText.pointer("out of memory")
        case FLASHMOE_ERROR_KERNEL: StaticText.pointer("kernel error")
        case FLASHMOE_ERROR_INTERNAL: StaticText.pointer("internal error")
        case FLASHMOE_ERROR_GROUP: StaticText.pointer("group error")
        default: StaticText.pointer("unknown status")
        }
    }

    /// Runs one entry point's body: SUCCESS when it returns, else the classified status, with the message stored
    /// as the calling thread's last error.
    static func run(_ body: () throws -> Void) -> flashmoe_status_t {
        do {
            try body()
            return FLASHMOE_SUCCESS
        } catch {
            let (status, message) = classify(error)
            LastError.set(message)
            return status
        }
    }
}
