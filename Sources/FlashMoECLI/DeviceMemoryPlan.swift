import FlashMoE

extension BackendPlan {
    /// A CUDA plan after checking the GPU's free memory for the layer at `tokens` tokens, before any weights are
    /// made: `--backend cuda` refuses with the `DeviceMemoryError` (what fits, what to change); `auto` falls back
    /// to the CPU with the reason, after `beforeCPUFallback` (the host memory check) accepts it.
    func checkingDeviceMemory(
        config: MoEConfig, tokens: Int, device: Int, context: MachineContext, progress: Progress,
        beforeCPUFallback: (BackendPlan) throws -> Void
    ) throws -> BackendPlan {
        guard kind == .cuda else { return self }
        do {
            try context.checkDeviceMemory(config, tokens, device)
            return self
        } catch {
            guard requested == .auto else { throw error }
            let fallback = BackendPlan(
                kind: .cpu, requested: .auto, reason: "auto: the layer does not fit in GPU \(device)'s memory")
            progress.logger.notice("\(fallback.reason): \(error); running on the CPU")
            try beforeCPUFallback(fallback)
            return fallback
        }
    }
}
