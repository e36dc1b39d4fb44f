/// The device buffer a tracing build of the fused kernel records into (`trace.cuh`), and its module globals.
///
/// The kernel finds the buffer through two `__device__` globals (`fmoe_trace_buffer`, `fmoe_trace_capacity`) that
/// this sets once after the module is loaded, so the launch parameters are the normal build's.
final class FusedTraceBuffer {
    let buffer: DeviceBuffer<UInt64>
    let blocks: Int
    let capacity: Int

    /// Allocates room for `capacity` events in each of `blocks` blocks and points `module`'s globals at it.
    init(module: CUDAModule, blocks: Int, capacity: Int) throws(CUDAError) {
        guard capacity > 0 && capacity <= 1 << 20 else {
            throw .invalidArgument("trace events per block must be 1 to \(1 << 20); got \(capacity)")
        }
        self.blocks = blocks
        self.capacity = capacity
        buffer = try DeviceBuffer<UInt64>(device: module.device, count: blocks * KernelTrace.wordsPerBlock(capacity: capacity))
        try buffer.fill(byte: 0)
        try Self.write(module, "fmoe_trace_buffer", value: buffer.address)
        try Self.write(module, "fmoe_trace_capacity", value: UInt32(capacity))
    }

    /// Forgets the recorded events.
    func clear() throws(CUDAError) { try buffer.fill(byte: 0) }

    /// Decodes what the last launch recorded.
    func read() throws -> KernelTrace {
        try KernelTrace(words: try buffer.download(), blocks: blocks, capacity: capacity)
    }

    private static func write<V: FixedWidthInteger>(_ module: CUDAModule, _ name: String, value: V) throws(CUDAError) {
        let (address, size) = try module.global(named: name)
        guard size == MemoryLayout<V>.size else {
            throw .invalidArgument("kernel global \(name) has \(size) bytes, not \(MemoryLayout<V>.size): kernel and host disagree")
        }
        var v = value.littleEndian
        try module.device.makeCurrent()
        try withUnsafeBytes(of: &v) { raw throws(CUDAError) in
            try module.device.driver.check(
                module.device.driver.memcpyHtoD(address, raw.baseAddress!, size, nil), "cuMemcpyHtoD_v2(\(name))")
        }
    }
}

extension FusedOperator {
    /// Forgets what a tracing build (`FusedOptions.traceEventsPerBlock` > 0) recorded so far: call it before the
    /// launch to trace. (Launches do not clear the buffer themselves, so their timing is the normal build's.)
    public func clearTrace() throws {
        try tracing(traceBuffer).clear()
        try prefillTraceBuffer?.clear()
    }

    /// The timeline a tracing build recorded since `clearTrace()` (blocks that ran out of room count the rest): the
    /// prefill kernel's when the last launch ran it (`prefillTokens`), else the first kernel's.
    public func recordedTrace() throws -> KernelTrace {
        let ranPrefill = state.withLock { $0.lastRanPrefill }
        let buffer = try tracing(ranPrefill ? prefillTraceBuffer : traceBuffer)
        try device.synchronize()
        return try buffer.read()
    }

    private func tracing(_ buffer: FusedTraceBuffer?) throws -> FusedTraceBuffer {
        guard let buffer else {
            throw MoEError(.invalidConfig, "this operator is not a tracing build: set FusedOptions.traceEventsPerBlock")
        }
        return buffer
    }
}

extension FusedMoE {
    /// `FusedOperator.clearTrace()` of the core.
    public func clearTrace() throws { try core.clearTrace() }

    /// `FusedOperator.recordedTrace()` of the core.
    public func recordedTrace() throws -> KernelTrace { try core.recordedTrace() }
}
