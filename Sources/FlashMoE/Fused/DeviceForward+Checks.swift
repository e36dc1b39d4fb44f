import CCUDA

extension DeviceForward {
    /// Checks a call's arguments against what runs it (`FusedOperator`, a `RankProcessMoE` rank), before any launch;
    /// every failure is a `MoEError` naming the argument and what it expects.
    ///
    /// - Parameters:
    ///   - device: the GPU the launch runs on (the stream must belong to its primary context).
    ///   - maxTokens: the most tokens a call may pass (nil: no limit).
    ///   - faultBuild: whether a test build with fault injection runs it (else `injectFault` is refused).
    ///   - owner: "operator" or "group", for the messages.
    func check(device: CUDADevice, hiddenSize h: Int, maxTokens: Int?, faultBuild: Bool, owner: String) throws {
        func bad(_ m: String) -> MoEError { MoEError(.invalidInput, m) }
        let s = tokens
        guard s >= 0 else { throw bad("tokens must be at least 0, not \(s)") }
        if let maxTokens, s > maxTokens {
            throw bad("tokens = \(s) exceeds the \(owner)'s maxTokens = \(maxTokens): create it with a larger maxTokens")
        }
        if injectFault && !faultBuild {
            throw bad("injectFault needs an operator built with FusedOptions(injectFault: true) (a test build)")
        }
        var context: CUcontext?
        let found = device.driver.streamGetContext(stream, &context)
        guard found == CUDA_SUCCESS else {
            throw bad("stream is not a valid CUDA stream (cuStreamGetCtx: \(device.driver.errorName(found) ?? "\(found.rawValue)"))")
        }
        guard context == device.context else {
            throw bad("stream belongs to another CUDA context than GPU \(device.properties.ordinal)'s primary context: "
                + "pass a stream of that device")
        }
        guard s > 0 else { return }
        guard input != 0 else { throw bad("input is a null pointer: pass x [\(s), \(h)]") }
        guard output != 0 else { throw bad("output is a null pointer: pass y [\(s), \(h)]") }
        guard input % 16 == 0 else { throw bad("input must be 16-byte aligned (address \(input))") }
        guard output % 16 == 0 else { throw bad("output must be 16-byte aligned (address \(output))") }
        // One routing buffer at a time, without building an array on every call.
        func checkRouting(_ name: String, _ p: CUdeviceptr?) throws {
            guard let p else { return }
            guard p != 0 else { throw bad("\(name) is a null pointer: pass nil to keep it in the workspace") }
            guard p % 4 == 0 else { throw bad("\(name) must be 4-byte aligned (address \(p))") }
        }
        try checkRouting("topKIDs", topKIDs)
        try checkRouting("topKWeights", topKWeights)
    }
}
