import CCUDA

/// Page-locked host memory mapped into a device's address space (`cuMemHostAlloc` with `DEVICEMAP`): kernels
/// write it through `deviceAddress`, the host reads it at `pointer` without a copy or a synchronisation.
///
/// FlashMoE uses it for the kernel's error mirror: the last block of a launch copies a nonzero error record here,
/// so the host sees a fault of a launch it never waited for (a CUDA graph replay, an earlier forward) on its next
/// call. The contents are zeroed at creation.
///
/// `@unchecked Sendable`: the addresses never change; concurrent access to the contents is the owner's to order.
public final class HostMappedBuffer: @unchecked Sendable {
    /// The device whose kernels write the memory.
    public let device: CUDADevice
    /// Bytes allocated.
    public let byteCount: Int
    /// The memory on the host.
    let pointer: UnsafeMutableRawPointer
    /// The same memory as the device addresses it.
    public let deviceAddress: CUdeviceptr

    /// Allocates `byteCount` (> 0) zeroed bytes, mapped for `device`.
    public init(device: CUDADevice, byteCount: Int) throws(CUDAError) {
        guard byteCount > 0 else { throw .invalidArgument("a host-mapped buffer needs at least one byte") }
        try device.makeCurrent()
        let driver = device.driver
        var host: UnsafeMutableRawPointer?
        let flags = UInt32(CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_PORTABLE)
        try driver.check(driver.memHostAlloc(&host, byteCount, flags), "cuMemHostAlloc", requestedBytes: byteCount)
        guard let host else { throw .invalidArgument("cuMemHostAlloc returned no memory") }
        var address: CUdeviceptr = 0
        let mapped = driver.memHostGetDevicePointer(&address, host, 0)
        guard mapped == CUDA_SUCCESS else {
            _ = driver.memFreeHost(host)
            throw driver.error(for: mapped, call: "cuMemHostGetDevicePointer_v2")
        }
        host.initializeMemory(as: UInt8.self, repeating: 0, count: byteCount)
        self.device = device
        self.byteCount = byteCount
        self.pointer = host
        self.deviceAddress = address
    }

    deinit {
        _ = try? device.makeCurrent()
        _ = device.driver.memFreeHost(pointer)
    }

    /// The bytes `offset ..< offset + count` as they are now (no synchronisation: a kernel may still be writing).
    public func bytes(at offset: Int = 0, count: Int) -> [UInt8] {
        precondition(offset >= 0 && count >= 0 && offset + count <= byteCount, "range outside the buffer")
        return (0..<count).map { pointer.load(fromByteOffset: offset + $0, as: UInt8.self) }
    }

    /// The first 32-bit word as it is now (the error code of a mirrored record), read without a copy.
    var code: UInt32 { pointer.load(as: UInt32.self) }

    /// Sets every byte to zero (host stores; only when no kernel writes concurrently).
    public func zero() {
        pointer.initializeMemory(as: UInt8.self, repeating: 0, count: byteCount)
    }

    /// Writes `bytes` at `offset` (tests simulate a kernel's record this way).
    func write(_ bytes: [UInt8], at offset: Int = 0) {
        precondition(offset >= 0 && offset + bytes.count <= byteCount, "range outside the buffer")
        for (i, b) in bytes.enumerated() { pointer.storeBytes(of: b, toByteOffset: offset + i, as: UInt8.self) }
    }
}
