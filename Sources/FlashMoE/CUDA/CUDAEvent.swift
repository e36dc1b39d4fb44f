import CCUDA

/// A CUDA event: a marker recorded into a stream, to wait on or to time the work between two of them.
///
/// `@unchecked Sendable`: the handle never changes and the driver's event calls are thread-safe.
public final class CUDAEvent: @unchecked Sendable {
    /// The device the event belongs to.
    public let device: CUDADevice
    /// Whether the event records time (needed for `elapsedMilliseconds`).
    public let timing: Bool
    let handle: CUevent

    /// Creates an event; `timing: false` makes recording and waiting cheaper.
    public init(device: CUDADevice, timing: Bool = true) throws(CUDAError) {
        try device.makeCurrent()
        var event: CUevent?
        let flags = UInt32(timing ? CU_EVENT_DEFAULT : CU_EVENT_DISABLE_TIMING)
        try device.driver.check(device.driver.eventCreate(&event, flags), "cuEventCreate")
        guard let event else { throw .invalidArgument("cuEventCreate returned no event") }
        self.device = device
        self.timing = timing
        self.handle = event
    }

    deinit {
        _ = try? device.makeCurrent()
        _ = device.driver.eventDestroy(handle)
    }

    /// Records the event after the work queued so far on `stream` (nil: the legacy default stream).
    public func record(on stream: CUDAStream? = nil) throws(CUDAError) {
        try device.makeCurrent()
        try device.driver.check(device.driver.eventRecord(handle, stream?.handle), "cuEventRecord")
    }

    /// Waits until the work before the event's last record has finished.
    public func synchronize() throws(CUDAError) {
        try device.makeCurrent()
        try device.driver.check(device.driver.eventSynchronize(handle), "cuEventSynchronize")
    }

    /// Milliseconds between `start`'s record and this event's record (both must have completed; resolution about
    /// half a microsecond).
    public func elapsedMilliseconds(since start: CUDAEvent) throws(CUDAError) -> Double {
        guard timing && start.timing else {
            throw .invalidArgument("both events must be created with timing: true to measure elapsed time")
        }
        try device.makeCurrent()
        var ms: Float = 0
        try device.driver.check(device.driver.eventElapsedTime(&ms, start.handle, handle), "cuEventElapsedTime")
        return Double(ms)
    }
}
