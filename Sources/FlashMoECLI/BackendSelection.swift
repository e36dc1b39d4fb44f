import ArgumentParser
import FlashMoE
import Logging

/// The `--backend` choices.
enum BackendKind: String, CaseIterable, ExpressibleByArgument {
    /// CUDA when a GPU is usable and the operator starts, else the CPU.
    case auto
    /// The fast FP32 CPU backend.
    case cpu
    /// The Float64 CPU reference.
    case oracle
    /// The fused GPU operator.
    case cuda
}

/// What the commands need to know about the GPU: whether it is usable (and why not) and the GPUs' names.
struct GPUStatus: Sendable {
    /// One line saying why CUDA cannot be used, or nil when it can.
    var unusableReason: String?
    /// The name of each visible GPU, by ordinal.
    var deviceNames: [String]

    init(unusableReason: String?, deviceNames: [String]) {
        self.unusableReason = unusableReason
        self.deviceNames = deviceNames
    }

    /// The status of a probe.
    init(_ availability: GPUAvailability) {
        unusableReason = availability.unusableReason
        if case .success(let list) = availability.devices {
            deviceNames = list.map(\.name)
        } else {
            deviceNames = []
        }
    }
}

/// The machine as `run` and `bench` see it. `live` is the real one; tests pass their own.
struct MachineContext: Sendable {
    /// Probes the GPU (called at most once per command).
    var gpu: @Sendable () -> GPUStatus
    /// Builds the CUDA backend (`makeCUDABackend` in the real context).
    var makeCUDA: @Sendable (MoELayer, Int) throws -> any BenchmarkableBackend
    /// Memory available to this process in bytes, or nil when unknown.
    var availableMemory: @Sendable () -> Int?
    /// The CPU's model name, or nil when unknown.
    var cpuModel: @Sendable () -> String?
    /// Throws a `DeviceMemoryError` when a layer at a token count would not fit on a GPU (config, tokens, GPU).
    var checkDeviceMemory: @Sendable (MoEConfig, Int, Int) throws -> Void = { _, _, _ in }

    /// This machine.
    static let live = MachineContext(
        gpu: { GPUStatus(GPUAvailability.probe()) },
        makeCUDA: { try makeCUDABackend(layer: $0, deviceOrdinal: $1) },
        availableMemory: { HostMachine.availableMemoryBytes() },
        cpuModel: { HostMachine.cpuModelName() },
        checkDeviceMemory: { try FusedMemoryCheck.check(config: $0, tokens: $1, devices: [$2]) })
}

/// The backend a command will build, decided before the weights exist (so memory can be checked first).
struct BackendPlan: Sendable, Equatable {
    /// What will be built: never `.auto`.
    var kind: BackendKind
    /// What was asked for.
    var requested: BackendKind
    /// Why this backend, in a few words ("auto: GPU 0 (NAME) is usable", "auto: CUDA not usable: …").
    var reason: String
    /// The GPU's name when the plan is CUDA.
    var deviceName: String? = nil

    /// Decides `requested` against the GPU status; `.cuda` throws when no GPU `device` is usable.
    static func decide(_ requested: BackendKind, device: Int, gpu: () -> GPUStatus) throws(CLIError) -> BackendPlan {
        switch requested {
        case .cpu: return BackendPlan(kind: .cpu, requested: requested, reason: "--backend cpu")
        case .oracle: return BackendPlan(kind: .oracle, requested: requested, reason: "--backend oracle")
        case .cuda, .auto:
            let status = gpu()
            var problem = status.unusableReason
            if problem == nil && !status.deviceNames.indices.contains(device) {
                problem =
                    "there is no GPU \(device) (\(status.deviceNames.count) visible): choose --device "
                    + "0...\(max(0, status.deviceNames.count - 1))"
            }
            if let problem {
                guard requested == .auto else {
                    throw CLIError(
                        .backendUnavailable,
                        "--backend cuda cannot run here: \(problem). Use --backend cpu, or see `flashmoe info`")
                }
                return BackendPlan(kind: .cpu, requested: .auto, reason: "auto: CUDA not usable: \(problem)")
            }
            let name = status.deviceNames[device]
            return BackendPlan(
                kind: .cuda, requested: requested,
                reason: requested == .auto ? "auto: GPU \(device) (\(name)) is usable" : "--backend cuda",
                deviceName: name)
        }
    }

    /// Builds the planned backend for `layer`. With `auto`, a CUDA backend that fails to start falls back to the
    /// CPU: `beforeCPUFallback` runs first (the memory check for the CPU's copy of the weights) and the returned
    /// plan says why.
    func build(
        layer: MoELayer, device: Int, context: MachineContext, progress: Progress,
        beforeCPUFallback: (BackendPlan) throws -> Void
    ) throws -> (backend: any BenchmarkableBackend, plan: BackendPlan) {
        switch kind {
        case .cuda:
            do {
                let backend = try progress.step("starting the CUDA backend") { try context.makeCUDA(layer, device) }
                return (backend, self)
            } catch {
                guard requested == .auto else { throw error }
                let line = String(describing: error).split(separator: "\n").first.map(String.init) ?? ""
                let fallback = BackendPlan(
                    kind: .cpu, requested: .auto, reason: "auto: the CUDA backend failed to start (\(line))")
                progress.logger.notice("\(fallback.reason); running on the CPU")
                progress.logger.debug("the CUDA backend's error in full: \(error)")
                try beforeCPUFallback(fallback)
                return try fallback.build(
                    layer: layer, device: device, context: context, progress: progress, beforeCPUFallback: { _ in })
            }
        case .cpu, .auto:
            let backend = try progress.step("packing the weights for the CPU backend") {
                try CPUBackend(layer: layer, mode: .fast)
            }
            return (backend, self)
        case .oracle:
            return (try CPUBackend(layer: layer, mode: .oracle), self)
        }
    }
}
