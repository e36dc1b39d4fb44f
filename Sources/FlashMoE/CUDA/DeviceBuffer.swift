import CCUDA

/// Device memory holding `count` values of `Element`, freed when the buffer goes away.
///
/// Raw bytes are `DeviceBuffer<UInt8>`. Every copy and fill checks its range against the buffer, and every method
/// makes the device's context current first (as `deinit` does before freeing), so a buffer can be used and
/// dropped on any thread.
///
/// Stream-ordered variants (`stream:` given) use the driver's `…Async` calls. Host memory here is always ordinary
/// pageable Swift memory, for which the driver stages an upload before returning, and completes a download before
/// returning, so the arrays may be reused at once.
///
/// `@unchecked Sendable`: the address and size never change and the driver calls are thread-safe; as with any
/// memory shared with a GPU, ordering concurrent writes to the *contents* is the caller's job (streams, events).
public final class DeviceBuffer<Element: BitwiseCopyable>: @unchecked Sendable {
    /// The device the memory lives on.
    public let device: CUDADevice
    /// The number of elements.
    public let count: Int
    /// The device address of element 0 (0 for an empty buffer, which allocates nothing).
    public let address: CUdeviceptr
    /// Whether `deinit` frees the memory (false for a borrowed view).
    private let owned: Bool

    /// Bytes the buffer spans.
    public var byteCount: Int { count * MemoryLayout<Element>.stride }

    /// Allocates room for `count` elements (contents undefined).
    public init(device: CUDADevice, count: Int) throws(CUDAError) {
        guard count >= 0 else { throw .invalidArgument("a buffer cannot have \(count) elements") }
        let (bytes, overflow) = count.multipliedReportingOverflow(by: MemoryLayout<Element>.stride)
        guard !overflow else { throw .invalidArgument("\(count) × \(Element.self) does not fit in memory") }
        var address: CUdeviceptr = 0
        if bytes > 0 {
            try device.makeCurrent()
            try device.driver.check(device.driver.memAlloc(&address, bytes), "cuMemAlloc_v2", requestedBytes: bytes)
        }
        self.device = device
        self.count = count
        self.address = address
        owned = true
    }

    /// A view of `count` elements at `address` that someone else allocated (e.g. NVSHMEM's symmetric heap) and
    /// frees: this object never frees it.
    public init(device: CUDADevice, borrowing address: CUdeviceptr, count: Int) {
        self.device = device
        self.count = count
        self.address = address
        owned = false
    }

    /// Allocates a buffer and uploads `values` into it.
    public convenience init(device: CUDADevice, copying values: [Element]) throws(CUDAError) {
        try self.init(device: device, count: values.count)
        try upload(values)  // on failure the buffer is released and deinit frees the memory
    }

    deinit {
        guard owned, address != 0 else { return }
        _ = try? device.makeCurrent()
        _ = device.driver.memFree(address)
    }

    /// The device address of element `index` (for kernel arguments into the middle of a buffer).
    public func address(at index: Int) throws(CUDAError) -> CUdeviceptr {
        try checkRange(index, 0, "address")
        return address + CUdeviceptr(index * MemoryLayout<Element>.stride)
    }

    // MARK: Copies

    /// Copies `values` into elements `offset ..< offset + values.count`.
    public func upload(_ values: [Element], at offset: Int = 0, stream: CUDAStream? = nil) throws(CUDAError) {
        var result: Result<Void, CUDAError> = .success(())
        values.withUnsafeBytes { raw in
            result = Result { () throws(CUDAError) in try upload(raw, at: offset, stream: stream) }
        }
        try result.get()
    }

    /// Copies raw host bytes (a whole number of elements) into the buffer starting at element `offset`.
    public func upload(_ bytes: UnsafeRawBufferPointer, at offset: Int = 0, stream: CUDAStream? = nil)
        throws(CUDAError)
    {
        let n = try elementCount(ofBytes: bytes.count)
        try checkRange(offset, n, "upload")
        guard n > 0, let base = bytes.baseAddress else { return }
        try device.makeCurrent()
        try device.driver.check(
            device.driver.memcpyHtoD(try address(at: offset), base, bytes.count, stream?.handle),
            stream == nil ? "cuMemcpyHtoD_v2" : "cuMemcpyHtoDAsync_v2")
    }

    /// Elements `offset ..< offset + count` (all from `offset` when `count` is nil) copied to the host.
    /// With a stream, the copy waits for the work queued on it before, and the call returns when it is done.
    public func download(count: Int? = nil, from offset: Int = 0, stream: CUDAStream? = nil) throws(CUDAError)
        -> [Element]
    {
        let n = count ?? (self.count - offset)
        try checkRange(offset, n, "download")
        return try download(as: Element.self, count: n, from: offset, stream: stream)
    }

    /// `n` values of type `T` read from the bytes that start at element `offset` (a typed view, e.g. the Int32
    /// region of a byte arena); `n · stride(T)` must be a whole number of elements inside the buffer.
    public func download<T: BitwiseCopyable>(as type: T.Type, count n: Int, from offset: Int = 0,
                                             stream: CUDAStream? = nil) throws(CUDAError) -> [T]
    {
        guard n > 0 else { return [] }
        var failure: CUDAError?
        let values = [T](unsafeUninitializedCapacity: n) { buffer, initialized in
            do throws(CUDAError) {
                try download(into: UnsafeMutableRawBufferPointer(buffer), from: offset, stream: stream)
                initialized = n
            } catch {
                failure = error
                initialized = 0
            }
        }
        if let failure { throw failure }
        return values
    }

    /// Copies elements starting at `offset` into raw host memory (a whole number of elements).
    public func download(into bytes: UnsafeMutableRawBufferPointer, from offset: Int = 0, stream: CUDAStream? = nil)
        throws(CUDAError)
    {
        let n = try elementCount(ofBytes: bytes.count)
        try checkRange(offset, n, "download")
        guard n > 0, let base = bytes.baseAddress else { return }
        try device.makeCurrent()
        try device.driver.check(
            device.driver.memcpyDtoH(base, try address(at: offset), bytes.count, stream?.handle),
            stream == nil ? "cuMemcpyDtoH_v2" : "cuMemcpyDtoHAsync_v2")
        // Pageable memory completes before the call returns; synchronizing makes that a guarantee, not a detail.
        if let stream { try stream.synchronize() }
    }

    /// Copies all of `source` (same element type, same or smaller size) into this buffer, device to device.
    public func copy(from source: DeviceBuffer<Element>, stream: CUDAStream? = nil) throws(CUDAError) {
        try copy(fromAddress: source.address, count: source.count, stream: stream)
    }

    /// Copies `count` elements from device address `source` (another allocation, a module global, a peer's
    /// buffer) into the start of this buffer.
    public func copy(fromAddress source: CUdeviceptr, count n: Int, stream: CUDAStream? = nil) throws(CUDAError) {
        try checkRange(0, n, "copy")
        guard n > 0 else { return }
        try device.makeCurrent()
        try device.driver.check(
            device.driver.memcpyDtoD(address, source, n * MemoryLayout<Element>.stride, stream?.handle),
            stream == nil ? "cuMemcpyDtoD_v2" : "cuMemcpyDtoDAsync_v2")
    }

    // MARK: Fills

    /// Sets every byte of the buffer to `value` (`cuMemsetD8`).
    public func fill(byte value: UInt8, stream: CUDAStream? = nil) throws(CUDAError) {
        try fill(byte: value, at: 0, count: byteCount, stream: stream)
    }

    /// Sets the `count` bytes from byte `offset` to `value` (`cuMemsetD8`).
    public func fill(byte value: UInt8, at offset: Int, count n: Int, stream: CUDAStream? = nil) throws(CUDAError) {
        guard offset >= 0, n >= 0, offset <= byteCount, n <= byteCount - offset else {
            throw .invalidArgument("fill of bytes \(offset)..<\(offset + n) is outside the buffer's \(byteCount) bytes")
        }
        guard n > 0 else { return }
        try device.makeCurrent()
        try device.driver.check(
            device.driver.memsetD8(address + UInt64(offset), value, n, stream?.handle),
            stream == nil ? "cuMemsetD8_v2" : "cuMemsetD8Async")
    }

    /// Sets every 32-bit word of the buffer to `value` (`cuMemsetD32`); e.g. `Float(1).bitPattern`.
    public func fill(word value: UInt32, stream: CUDAStream? = nil) throws(CUDAError) {
        guard byteCount % 4 == 0 else {
            throw .invalidArgument("fill(word:) needs a size that is a multiple of 4 bytes, not \(byteCount)")
        }
        guard byteCount > 0 else { return }
        try device.makeCurrent()
        try device.driver.check(
            device.driver.memsetD32(address, value, byteCount / 4, stream?.handle),
            stream == nil ? "cuMemsetD32_v2" : "cuMemsetD32Async")
    }

    // MARK: Checks

    private func elementCount(ofBytes bytes: Int) throws(CUDAError) -> Int {
        let stride = MemoryLayout<Element>.stride
        guard bytes % stride == 0 else {
            throw .invalidArgument("\(bytes) bytes is not a whole number of \(Element.self) (\(stride) bytes each)")
        }
        return bytes / stride
    }

    private func checkRange(_ offset: Int, _ n: Int, _ what: String) throws(CUDAError) {
        guard offset >= 0, n >= 0, offset <= count, n <= count - offset else {
            throw .invalidArgument(
                "\(what) of elements \(offset)..<\(offset + n) is outside the buffer's \(count) elements")
        }
    }
}
