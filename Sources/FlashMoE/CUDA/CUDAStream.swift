import CCUDA

/// A CUDA stream: an ordered queue of copies and launches on one device, destroyed when this object goes away.
///
/// `@unchecked Sendable`: the handle never changes and the driver's stream calls are thread-safe; work queued
/// from several threads runs in the order the driver received it.
public final class CUDAStream: @unchecked Sendable {
    /// The device the stream belongs to.
    public let device: CUDADevice
    let handle: CUstream

    /// Creates a stream. A non-blocking stream (the default) does not synchronize with the legacy default stream.
    public init(device: CUDADevice, nonBlocking: Bool = true) throws(CUDAError) {
        try device.makeCurrent()
        var stream: CUstream?
        let flags = UInt32(nonBlocking ? CU_STREAM_NON_BLOCKING : CU_STREAM_DEFAULT)
        try device.driver.check(device.driver.streamCreate(&stream, flags), "cuStreamCreate")
        guard let stream else { throw .invalidArgument("cuStreamCreate returned no stream") }
        self.device = device
        self.handle = stream
    }

    deinit {
        _ = try? device.makeCurrent()
        _ = device.driver.streamDestroy(handle)
    }

    /// Waits until everything queued on the stream has finished.
    public func synchronize() throws(CUDAError) {
        try device.makeCurrent()
        try device.driver.check(device.driver.streamSynchronize(handle), "cuStreamSynchronize")
    }
}
