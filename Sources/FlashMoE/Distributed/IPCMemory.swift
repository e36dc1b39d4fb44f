import CCUDA

/// A `cuIpcGetMemHandle` handle: 64 opaque bytes that another process on the same node opens to map a device
/// allocation of this one. It names the whole allocation, so it is taken of a buffer's base address.
public struct IPCHandle: Sendable, Hashable {
    /// The handle's bytes (always 64).
    public let bytes: [UInt8]

    /// The handle of these 64 bytes (as received from a peer).
    public init(bytes: [UInt8]) throws(MoEError) {
        guard bytes.count == IPCHandle.byteCount else {
            throw MoEError(.invalidInput, "an IPC memory handle has \(IPCHandle.byteCount) bytes, not \(bytes.count)")
        }
        self.bytes = bytes
    }

    /// `sizeof(CUipcMemHandle)`.
    public static let byteCount = MemoryLayout<CUipcMemHandle>.size

    init(_ handle: CUipcMemHandle) {
        bytes = withUnsafeBytes(of: handle) { Array($0) }
    }

    var driverHandle: CUipcMemHandle {
        var handle = CUipcMemHandle()
        withUnsafeMutableBytes(of: &handle) { $0.copyBytes(from: bytes) }
        return handle
    }
}

extension DeviceBuffer {
    /// A handle through which another process on this node can map this buffer (`cuIpcGetMemHandle`). The buffer
    /// must outlive every mapping of it.
    public func ipcHandle() throws(CUDAError) -> IPCHandle {
        guard address != 0 else { throw .invalidArgument("an empty buffer has no memory to share") }
        try device.makeCurrent()
        var handle = CUipcMemHandle()
        try device.driver.check(device.driver.ipcGetMemHandle(&handle, address), "cuIpcGetMemHandle")
        return IPCHandle(handle)
    }
}

/// Another process's device allocation mapped into this one (`cuIpcOpenMemHandle`, with peer access enabled
/// lazily when the allocation lives on another GPU), unmapped when this object goes away.
///
/// `@unchecked Sendable`: the address never changes and the driver calls are thread-safe.
public final class IPCMapping: @unchecked Sendable {
    /// The device whose context holds the mapping (this process's GPU).
    public let device: CUDADevice
    /// Where the peer's allocation appears in this process.
    public let address: CUdeviceptr
    /// The size the peer announced for it.
    public let byteCount: Int

    /// Maps the allocation `handle` names into `device`'s context.
    public init(device: CUDADevice, handle: IPCHandle, byteCount: Int) throws(CUDAError) {
        try device.makeCurrent()
        var address: CUdeviceptr = 0
        try device.driver.check(
            device.driver.ipcOpenMemHandle(&address, handle.driverHandle, UInt32(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)),
            "cuIpcOpenMemHandle_v2",
            hint: "both processes must run on one node, see each other's GPU (CUDA_VISIBLE_DEVICES) and the "
                + "exporting process must still be alive")
        self.device = device
        self.address = address
        self.byteCount = byteCount
    }

    deinit {
        _ = try? device.makeCurrent()
        _ = device.driver.ipcCloseMemHandle(address)
    }
}
