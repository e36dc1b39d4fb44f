import CCUDA
import Glibc
import Synchronization

@testable import FlashMoE

/// A CUDA driver with no GPU behind it: it simulates device memory, counts every handle it hands out, keeps the
/// current context per thread (like the real driver) and refuses context-bound calls when none is current, and
/// fails any call the test names with the code the test chooses. Each device has its own primary context, and the
/// links between devices follow a configurable peer matrix (default: every pair of distinct devices can access
/// each other with native atomics); enabled peer access is recorded.
final class FakeDriver: CUDADriverAPI {
    struct Launch {
        var cooperative: Bool
        var grid: (UInt32, UInt32, UInt32)
        var block: (UInt32, UInt32, UInt32)
        var sharedBytes: UInt32
        /// The bytes behind each parameter pointer, `parameterSizes[i]` bytes each.
        var parameters: [[UInt8]]
        /// Whether each parameter pointer was aligned to its size.
        var aligned: [Bool]
    }

    /// A directed pair of devices: `source` accesses `destination`'s memory.
    struct PeerPair: Hashable {
        var source: CUdevice
        var destination: CUdevice
    }

    /// What the fake reports for the link of a `PeerPair`.
    struct PeerModel {
        var access = true
        var nativeAtomics = true
        var performanceRank: Int32 = 0
    }

    struct State {
        var memory: [CUdeviceptr: [UInt8]] = [:]
        var nextAddress: CUdeviceptr = 0x7000_0000
        var retainedContexts = 0
        var current: [pthread_t: UInt] = [:]  // thread → context bit pattern
        var streams: Set<UInt> = []
        var events: Set<UInt> = []
        var modules: Set<UInt> = []
        var nextHandle: UInt = 0x1000
        var failures: [String: CUresult] = [:]
        var launches: [Launch] = []
        var setCurrentCalls = 0
        /// Links that differ from the default `PeerModel()`.
        var peers: [PeerPair: PeerModel] = [:]
        /// Successful `contextEnablePeerAccess` calls, in order.
        var enabledPeers: [PeerPair] = []
        // Device-resident forward (h1)
        /// Every gated call, by method name, in order (`gate` records them).
        var calls: [String] = []
        /// Live page-locked host allocations (address → bytes).
        var hostMemory: [UInt: Int] = [:]
        /// The context each stream was created in.
        var streamContexts: [UInt: UInt] = [:]

        /// IPC (h7): the fake processes this one can exchange handles with, its number among them, and the
        /// mappings it opened (mapped address → the exporter's handle).
        var ipcWorld: FakeIPCWorld?
        var ipcProcess = 0
        var ipcImports: [CUdeviceptr: CUipcMemHandle] = [:]
        var nextImport: CUdeviceptr = 0x9000_0000
    }

    let state = Mutex(State())
    private static let contextBase = 0xC0_0000
    /// The primary context of `device` (distinct per device, so peer access can tell the two sides apart).
    func context(of device: CUdevice) -> CUcontext { OpaquePointer(bitPattern: Self.contextBase + Int(device) << 8)! }
    /// The device whose primary context is `context`.
    private func device(of context: UInt) -> CUdevice { CUdevice((Int(context) - Self.contextBase) >> 8) }
    let deviceCount: Int32
    let totalMemory = 80 << 30
    let freeMemory = 1 << 30
    let attributes: [UInt32: Int32]
    static let defaultAttributes: [UInt32: Int32] = [
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR.rawValue: 9,
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR.rawValue: 0,
        CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT.rawValue: 4,
        CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK.rawValue: 48 << 10,
        CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN.rawValue: 227 << 10,
        CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR.rawValue: 228 << 10,
        CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE.rawValue: 50 << 20,
        CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK.rawValue: 1024,
        CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR.rawValue: 2048,
        CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH.rawValue: 1,
    ]
    /// Blocks per SM the occupancy query reports.
    let blocksPerSM: Int32
    /// Kernel names the fake modules contain.
    let kernels: Set<String>
    /// Sizes of the parameters launches are decoded with.
    let parameterSizes: [Int]

    init(
        devices: Int32 = 1, cooperative: Bool = true, blocksPerSM: Int32 = 2, kernels: Set<String> = ["k"],
        parameterSizes: [Int] = []
    ) {
        deviceCount = devices
        var attributes = Self.defaultAttributes
        attributes[CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH.rawValue] = cooperative ? 1 : 0
        self.attributes = attributes
        self.blocksPerSM = blocksPerSM
        self.kernels = kernels
        self.parameterSizes = parameterSizes
    }

    /// Makes every later call of `method` (the protocol method's name) return `code`.
    func fail(_ method: String, with code: CUresult) { state.withLock { $0.failures[method] = code } }

    var liveAllocations: Int { state.withLock { $0.memory.count } }
    var liveHandles: Int { state.withLock { $0.streams.count + $0.events.count + $0.modules.count } }
    var retainedContexts: Int { state.withLock { $0.retainedContexts } }
    var launches: [Launch] { state.withLock { $0.launches } }
    var setCurrentCalls: Int { state.withLock { $0.setCurrentCalls } }
    /// The (source, destination) pairs peer access was enabled for, in call order.
    var enabledPeers: [PeerPair] { state.withLock { $0.enabledPeers } }

    /// Sets what the link from `source` to `destination` reports (one direction only).
    func setPeer(
        _ source: CUdevice, _ destination: CUdevice, access: Bool, nativeAtomics: Bool, performanceRank: Int32 = 0
    ) {
        let model = PeerModel(access: access, nativeAtomics: nativeAtomics, performanceRank: performanceRank)
        state.withLock { $0.peers[PeerPair(source: source, destination: destination)] = model }
    }

    /// The link of `pair` in `s`; nil for a device and itself or a device that does not exist.
    private func link(_ pair: PeerPair, in s: State) -> PeerModel? {
        let devices = 0..<deviceCount
        guard pair.source != pair.destination, devices.contains(pair.source), devices.contains(pair.destination)
        else { return nil }
        return s.peers[pair] ?? PeerModel()
    }

    /// The link from `source` to `destination` (see `link(_:in:)`).
    private func link(_ source: CUdevice, _ destination: CUdevice) -> PeerModel? {
        state.withLock { link(PeerPair(source: source, destination: destination), in: $0) }
    }

    /// Clears the calling thread's current context (as another library might).
    func clearCurrentContext() { _ = state.withLock { $0.current.removeValue(forKey: pthread_self()) } }

    // MARK: Plumbing

    /// The injected failure for `method`, or, when `needsContext`, INVALID_CONTEXT if none is current here.
    fileprivate func gate(_ method: String, needsContext: Bool = true) -> CUresult? {
        state.withLock { s in
            s.calls.append(method)
            if let code = s.failures[method] { return code }
            if needsContext && s.current[pthread_self()] == nil { return CUDA_ERROR_INVALID_CONTEXT }
            return nil
        }
    }

    private func newHandle(_ keyPath: WritableKeyPath<State, Set<UInt>> & Sendable) -> OpaquePointer {
        let bits = state.withLock { s in
            s.nextHandle += 0x10
            s[keyPath: keyPath].insert(s.nextHandle)
            return s.nextHandle
        }
        return OpaquePointer(bitPattern: bits)!
    }

    private func dropHandle(_ keyPath: WritableKeyPath<State, Set<UInt>> & Sendable, _ handle: OpaquePointer)
        -> CUresult
    {
        let bits = UInt(bitPattern: Int(bitPattern: handle))
        return state.withLock { s in s[keyPath: keyPath].remove(bits) } == nil ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS
    }

    /// Runs `body` on the allocation holding `address ..< address + count` (base address, offset in it).
    private func withMemory(_ address: CUdeviceptr, _ count: Int, _ body: (inout [UInt8], Int) -> Void) -> CUresult {
        state.withLock { s in
            guard
                let base = s.memory.first(where: { address >= $0.key && address + CUdeviceptr(count) <= $0.key + CUdeviceptr($0.value.count) })?.key
            else { return CUDA_ERROR_ILLEGAL_ADDRESS }
            body(&s.memory[base]!, Int(address - base))
            return CUDA_SUCCESS
        }
    }

    // MARK: CUDADriverAPI

    func initialize(_ flags: UInt32) -> CUresult { gate("initialize", needsContext: false) ?? CUDA_SUCCESS }

    func driverGetVersion(_ version: inout Int32) -> CUresult {
        version = 12040
        return CUDA_SUCCESS
    }

    func errorName(_ code: CUresult) -> String? {
        switch code {
        case CUDA_ERROR_OUT_OF_MEMORY: "CUDA_ERROR_OUT_OF_MEMORY"
        case CUDA_ERROR_NO_DEVICE: "CUDA_ERROR_NO_DEVICE"
        case CUDA_ERROR_INVALID_CONTEXT: "CUDA_ERROR_INVALID_CONTEXT"
        case CUDA_ERROR_NO_BINARY_FOR_GPU: "CUDA_ERROR_NO_BINARY_FOR_GPU"
        case CUDA_ERROR_UNSUPPORTED_PTX_VERSION: "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"
        case CUDA_ERROR_NOT_FOUND: "CUDA_ERROR_NOT_FOUND"
        case CUDA_ERROR_ILLEGAL_ADDRESS: "CUDA_ERROR_ILLEGAL_ADDRESS"
        case CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE: "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE"
        case CUDA_ERROR_UNKNOWN: "CUDA_ERROR_UNKNOWN"
        default: nil
        }
    }

    func errorString(_ code: CUresult) -> String? {
        errorName(code).map { _ in "fake text for \(code.rawValue)" }
    }

    func deviceGetCount(_ count: inout Int32) -> CUresult {
        if let code = gate("deviceGetCount", needsContext: false) { return code }
        count = deviceCount
        return CUDA_SUCCESS
    }

    func deviceGet(_ device: inout CUdevice, _ ordinal: Int32) -> CUresult {
        guard ordinal < deviceCount else { return CUDA_ERROR_INVALID_DEVICE }
        device = ordinal
        return CUDA_SUCCESS
    }

    func deviceGetName(_ name: inout String, _ device: CUdevice) -> CUresult {
        name = "Fake GPU \(device)"
        return CUDA_SUCCESS
    }

    func deviceGetAttribute(_ value: inout Int32, _ attribute: CUdevice_attribute, _ device: CUdevice) -> CUresult {
        if let code = gate("deviceGetAttribute", needsContext: false) { return code }
        guard let v = attributes[attribute.rawValue] else { return CUDA_ERROR_INVALID_VALUE }
        value = v
        return CUDA_SUCCESS
    }

    func deviceTotalMem(_ bytes: inout Int, _ device: CUdevice) -> CUresult {
        bytes = totalMemory
        return CUDA_SUCCESS
    }

    func deviceCanAccessPeer(_ canAccess: inout Int32, _ device: CUdevice, _ peer: CUdevice) -> CUresult {
        if let code = gate("deviceCanAccessPeer", needsContext: false) { return code }
        canAccess = link(device, peer)?.access == true ? 1 : 0
        return CUDA_SUCCESS
    }

    func deviceGetP2PAttribute(
        _ value: inout Int32, _ attribute: CUdevice_P2PAttribute, _ source: CUdevice, _ destination: CUdevice
    ) -> CUresult {
        if let code = gate("deviceGetP2PAttribute", needsContext: false) { return code }
        // Like the real driver: a device and itself, or a missing device, is INVALID_DEVICE.
        guard let link = link(source, destination) else { return CUDA_ERROR_INVALID_DEVICE }
        switch attribute {
        case CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK: value = link.performanceRank
        case CU_DEVICE_P2P_ATTRIBUTE_ACCESS_SUPPORTED, CU_DEVICE_P2P_ATTRIBUTE_CUDA_ARRAY_ACCESS_SUPPORTED:
            value = link.access ? 1 : 0
        case CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED: value = link.access && link.nativeAtomics ? 1 : 0
        default: return CUDA_ERROR_INVALID_VALUE
        }
        return CUDA_SUCCESS
    }

    func primaryContextRetain(_ context: inout CUcontext?, _ device: CUdevice) -> CUresult {
        if let code = gate("primaryContextRetain", needsContext: false) { return code }
        state.withLock { $0.retainedContexts += 1 }
        context = self.context(of: device)
        return CUDA_SUCCESS
    }

    func primaryContextRelease(_ device: CUdevice) -> CUresult {
        state.withLock { $0.retainedContexts -= 1 }
        return CUDA_SUCCESS
    }

    func contextGetCurrent(_ context: inout CUcontext?) -> CUresult {
        context = state.withLock { $0.current[pthread_self()] }.flatMap { OpaquePointer(bitPattern: $0) }
        return CUDA_SUCCESS
    }

    func contextSetCurrent(_ context: CUcontext?) -> CUresult {
        if let code = gate("contextSetCurrent", needsContext: false) { return code }
        let bits = UInt(bitPattern: Int(bitPattern: context))
        state.withLock {
            $0.setCurrentCalls += 1
            $0.current[pthread_self()] = bits == 0 ? nil : bits
        }
        return CUDA_SUCCESS
    }

    func contextSynchronize() -> CUresult { gate("contextSynchronize") ?? CUDA_SUCCESS }

    /// Enables access from the current context's device to `peer`'s, as the driver does: INVALID_DEVICE where
    /// there is no path (or the two are one device), PEER_ACCESS_ALREADY_ENABLED the second time.
    func contextEnablePeerAccess(_ peer: CUcontext, _ flags: UInt32) -> CUresult {
        if let code = gate("contextEnablePeerAccess") { return code }
        guard flags == 0 else { return CUDA_ERROR_INVALID_VALUE }
        return state.withLock { s in
            guard let current = s.current[pthread_self()] else { return CUDA_ERROR_INVALID_CONTEXT }
            let pair = PeerPair(
                source: device(of: current), destination: device(of: UInt(bitPattern: Int(bitPattern: peer))))
            guard link(pair, in: s)?.access == true else { return CUDA_ERROR_INVALID_DEVICE }
            if s.enabledPeers.contains(pair) { return CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED }
            s.enabledPeers.append(pair)
            return CUDA_SUCCESS
        }
    }

    func memAlloc(_ address: inout CUdeviceptr, _ bytes: Int) -> CUresult {
        if let code = gate("memAlloc") { return code }
        guard bytes > 0 else { return CUDA_ERROR_INVALID_VALUE }
        address = state.withLock { s in
            let a = s.nextAddress
            s.memory[a] = [UInt8](repeating: 0xEE, count: bytes)
            s.nextAddress += CUdeviceptr((bytes + 511) / 512 * 512 + 512)
            return a
        }
        return CUDA_SUCCESS
    }

    func memFree(_ address: CUdeviceptr) -> CUresult {
        if let code = gate("memFree") { return code }
        return state.withLock { $0.memory.removeValue(forKey: address) } == nil ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS
    }

    func memGetInfo(_ free: inout Int, _ total: inout Int) -> CUresult {
        if let code = gate("memGetInfo") { return code }
        (free, total) = (freeMemory, totalMemory)
        return CUDA_SUCCESS
    }

    func memcpyHtoD(_ destination: CUdeviceptr, _ source: UnsafeRawPointer, _ bytes: Int, _ stream: CUstream?)
        -> CUresult
    {
        if let code = gate("memcpyHtoD") { return code }
        return withMemory(destination, bytes) { memory, offset in
            for i in 0..<bytes { memory[offset + i] = source.load(fromByteOffset: i, as: UInt8.self) }
        }
    }

    func memcpyDtoH(_ destination: UnsafeMutableRawPointer, _ source: CUdeviceptr, _ bytes: Int, _ stream: CUstream?)
        -> CUresult
    {
        if let code = gate("memcpyDtoH") { return code }
        return withMemory(source, bytes) { memory, offset in
            for i in 0..<bytes { destination.storeBytes(of: memory[offset + i], toByteOffset: i, as: UInt8.self) }
        }
    }

    func memcpyDtoD(_ destination: CUdeviceptr, _ source: CUdeviceptr, _ bytes: Int, _ stream: CUstream?) -> CUresult {
        if let code = gate("memcpyDtoD") { return code }
        var copied: [UInt8] = []
        let read = withMemory(source, bytes) { memory, offset in copied = Array(memory[offset..<offset + bytes]) }
        guard read == CUDA_SUCCESS else { return read }
        return withMemory(destination, bytes) { memory, offset in
            memory.replaceSubrange(offset..<offset + bytes, with: copied)
        }
    }

    func memsetD8(_ destination: CUdeviceptr, _ value: UInt8, _ count: Int, _ stream: CUstream?) -> CUresult {
        if let code = gate("memsetD8") { return code }
        return withMemory(destination, count) { memory, offset in
            for i in 0..<count { memory[offset + i] = value }
        }
    }

    func memsetD32(_ destination: CUdeviceptr, _ value: UInt32, _ count: Int, _ stream: CUstream?) -> CUresult {
        if let code = gate("memsetD32") { return code }
        return withMemory(destination, count * 4) { memory, offset in
            for i in 0..<count * 4 { memory[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * (i % 4))) }
        }
    }

    func moduleLoadData(_ module: inout CUmodule?, _ image: UnsafeRawPointer) -> CUresult {
        if let code = gate("moduleLoadData") { return code }
        module = newHandle(\.modules)
        return CUDA_SUCCESS
    }

    func moduleUnload(_ module: CUmodule) -> CUresult {
        if let code = gate("moduleUnload") { return code }
        return dropHandle(\.modules, module)
    }

    func moduleGetFunction(_ function: inout CUfunction?, _ module: CUmodule, _ name: String) -> CUresult {
        if let code = gate("moduleGetFunction") { return code }
        guard kernels.contains(name) else { return CUDA_ERROR_NOT_FOUND }
        function = OpaquePointer(bitPattern: 0xF00 + name.utf8.count)
        return CUDA_SUCCESS
    }

    func moduleGetGlobal(_ address: inout CUdeviceptr, _ bytes: inout Int, _ module: CUmodule, _ name: String)
        -> CUresult
    {
        if let code = gate("moduleGetGlobal") { return code }
        return CUDA_ERROR_NOT_FOUND
    }

    func functionGetAttribute(_ value: inout Int32, _ attribute: CUfunction_attribute, _ function: CUfunction)
        -> CUresult
    {
        if let code = gate("functionGetAttribute") { return code }
        value = Int32(attribute.rawValue) * 10 + 1  // distinct per attribute, to check the mapping
        return CUDA_SUCCESS
    }

    func functionSetAttribute(_ function: CUfunction, _ attribute: CUfunction_attribute, _ value: Int32) -> CUresult {
        gate("functionSetAttribute") ?? CUDA_SUCCESS
    }

    func occupancyMaxActiveBlocksPerMultiprocessor(
        _ blocks: inout Int32, _ function: CUfunction, _ blockSize: Int32, _ dynamicSharedBytes: Int
    ) -> CUresult {
        if let code = gate("occupancy") { return code }
        blocks = blocksPerSM
        return CUDA_SUCCESS
    }

    func launchKernel(
        _ function: CUfunction, grid: (UInt32, UInt32, UInt32), block: (UInt32, UInt32, UInt32),
        sharedBytes: UInt32, stream: CUstream?, parameters: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    ) -> CUresult {
        if let code = gate("launchKernel") { return code }
        record(false, grid, block, sharedBytes, parameters)
        return CUDA_SUCCESS
    }

    func launchCooperativeKernel(
        _ function: CUfunction, grid: (UInt32, UInt32, UInt32), block: (UInt32, UInt32, UInt32),
        sharedBytes: UInt32, stream: CUstream?, parameters: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    ) -> CUresult {
        if let code = gate("launchCooperativeKernel") { return code }
        record(true, grid, block, sharedBytes, parameters)
        return CUDA_SUCCESS
    }

    private func record(
        _ cooperative: Bool, _ grid: (UInt32, UInt32, UInt32), _ block: (UInt32, UInt32, UInt32),
        _ sharedBytes: UInt32, _ parameters: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    ) {
        var values: [[UInt8]] = []
        var aligned: [Bool] = []
        for (i, size) in parameterSizes.enumerated() {
            let pointer = parameters[i]!
            values.append(Array(UnsafeRawBufferPointer(start: pointer, count: size)))
            aligned.append(Int(bitPattern: pointer) % size == 0)
        }
        let launch = Launch(
            cooperative: cooperative, grid: grid, block: block, sharedBytes: sharedBytes, parameters: values,
            aligned: aligned)
        state.withLock { $0.launches.append(launch) }
    }

    func streamCreate(_ stream: inout CUstream?, _ flags: UInt32) -> CUresult {
        if let code = gate("streamCreate") { return code }
        let handle = newHandle(\.streams)
        stream = handle
        state.withLock { s in
            s.streamContexts[UInt(bitPattern: Int(bitPattern: handle))] = s.current[pthread_self()]
        }
        return CUDA_SUCCESS
    }

    func streamDestroy(_ stream: CUstream) -> CUresult { gate("streamDestroy") ?? dropHandle(\.streams, stream) }
    func streamSynchronize(_ stream: CUstream?) -> CUresult { gate("streamSynchronize") ?? CUDA_SUCCESS }

    func eventCreate(_ event: inout CUevent?, _ flags: UInt32) -> CUresult {
        if let code = gate("eventCreate") { return code }
        event = newHandle(\.events)
        return CUDA_SUCCESS
    }

    func eventDestroy(_ event: CUevent) -> CUresult { gate("eventDestroy") ?? dropHandle(\.events, event) }
    func eventRecord(_ event: CUevent, _ stream: CUstream?) -> CUresult { gate("eventRecord") ?? CUDA_SUCCESS }
    func eventSynchronize(_ event: CUevent) -> CUresult { gate("eventSynchronize") ?? CUDA_SUCCESS }

    func eventElapsedTime(_ milliseconds: inout Float, _ start: CUevent, _ end: CUevent) -> CUresult {
        if let code = gate("eventElapsedTime") { return code }
        milliseconds = 1.25
        return CUDA_SUCCESS
    }

    // MARK: Device-resident forward (h1)

    /// Gated calls so far, by method name (see `State.calls`).
    var calls: [String] { state.withLock { $0.calls } }
    /// Forgets the recorded calls (to count those of one operation).
    func clearCalls() { state.withLock { $0.calls = [] } }
    var liveHostAllocations: Int { state.withLock { $0.hostMemory.count } }

    func memHostAlloc(_ pointer: inout UnsafeMutableRawPointer?, _ bytes: Int, _ flags: UInt32) -> CUresult {
        if let code = gate("memHostAlloc") { return code }
        guard bytes > 0, let p = calloc(bytes, 1) else { return CUDA_ERROR_INVALID_VALUE }
        state.withLock { $0.hostMemory[UInt(bitPattern: p)] = bytes }
        pointer = p
        return CUDA_SUCCESS
    }

    /// The fake maps host memory at its own address (as UVA does on 64-bit Linux).
    func memHostGetDevicePointer(_ address: inout CUdeviceptr, _ pointer: UnsafeMutableRawPointer, _ flags: UInt32)
        -> CUresult
    {
        if let code = gate("memHostGetDevicePointer") { return code }
        guard state.withLock({ $0.hostMemory[UInt(bitPattern: pointer)] != nil }) else { return CUDA_ERROR_INVALID_VALUE }
        address = CUdeviceptr(UInt(bitPattern: pointer))
        return CUDA_SUCCESS
    }

    func memFreeHost(_ pointer: UnsafeMutableRawPointer) -> CUresult {
        if let code = gate("memFreeHost", needsContext: false) { return code }
        guard state.withLock({ $0.hostMemory.removeValue(forKey: UInt(bitPattern: pointer)) }) != nil else {
            return CUDA_ERROR_INVALID_VALUE
        }
        free(pointer)
        return CUDA_SUCCESS
    }

    /// A stream's creation context; nil (the legacy stream) is the current context; an unknown handle is invalid.
    func streamGetContext(_ stream: CUstream?, _ context: inout CUcontext?) -> CUresult {
        if let code = gate("streamGetContext") { return code }
        return state.withLock { s in
            let bits: UInt?
            if let stream { bits = s.streamContexts[UInt(bitPattern: Int(bitPattern: stream))] } else {
                bits = s.current[pthread_self()]
            }
            guard let bits else { return CUDA_ERROR_INVALID_HANDLE }
            context = OpaquePointer(bitPattern: bits)
            return CUDA_SUCCESS
        }
    }
}

// MARK: - Inter-process memory (h7's block, keep it together)

/// Fake processes that can open each other's IPC handles: each `FakeDriver` that joins is one process; a handle
/// names its exporter's process and allocation, and opening it in another member maps it at a fresh address.
final class FakeIPCWorld: Sendable {
    private let members = Mutex<[FakeDriver]>([])

    /// Makes `driver` a process of this world.
    func join(_ driver: FakeDriver) {
        let number = members.withLock {
            $0.append(driver)
            return $0.count
        }
        driver.state.withLock {
            $0.ipcWorld = self
            $0.ipcProcess = number
        }
    }

    /// The member numbered `number` (from 1).
    func member(_ number: Int) -> FakeDriver? {
        members.withLock { number >= 1 && number <= $0.count ? $0[number - 1] : nil }
    }
}

extension FakeDriver {
    /// Mappings opened and not yet closed.
    var liveImports: Int { state.withLock { $0.ipcImports.count } }

    /// Whether `address` is the base of a live allocation.
    func isLiveAllocation(_ address: CUdeviceptr) -> Bool { state.withLock { $0.memory[address] != nil } }

    /// The handle's bytes: the allocation's address, then the exporting process's number.
    static func decode(_ handle: CUipcMemHandle) -> (address: CUdeviceptr, process: Int) {
        withUnsafeBytes(of: handle) { raw in
            (raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self), Int(raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
        }
    }

    /// Like the driver: only the base of a live allocation has a handle; a driver outside any world has no IPC.
    func ipcGetMemHandle(_ handle: inout CUipcMemHandle, _ address: CUdeviceptr) -> CUresult {
        if let code = gate("ipcGetMemHandle") { return code }
        let (process, live) = state.withLock { ($0.ipcProcess, $0.memory[address] != nil) }
        guard process > 0 else { return CUDA_ERROR_NOT_SUPPORTED }
        guard live else { return CUDA_ERROR_INVALID_VALUE }
        handle = CUipcMemHandle()
        withUnsafeMutableBytes(of: &handle) { raw in
            raw.storeBytes(of: address, toByteOffset: 0, as: UInt64.self)
            raw.storeBytes(of: UInt64(process), toByteOffset: 8, as: UInt64.self)
        }
        return CUDA_SUCCESS
    }

    /// Maps another member's live allocation at a fresh address; the exporter's own handle cannot be opened in the
    /// exporting process (INVALID_CONTEXT, as the driver), an unknown or freed one is INVALID_VALUE.
    func ipcOpenMemHandle(_ address: inout CUdeviceptr, _ handle: CUipcMemHandle, _ flags: UInt32) -> CUresult {
        if let code = gate("ipcOpenMemHandle") { return code }
        guard flags == CUDA_IPC_LAZY_FLAG else { return CUDA_ERROR_INVALID_VALUE }
        let (exported, process) = Self.decode(handle)
        let (world, mine) = state.withLock { ($0.ipcWorld, $0.ipcProcess) }
        guard let world else { return CUDA_ERROR_NOT_SUPPORTED }
        guard process != mine else { return CUDA_ERROR_INVALID_CONTEXT }
        guard let exporter = world.member(process), exporter.isLiveAllocation(exported) else {
            return CUDA_ERROR_INVALID_VALUE
        }
        address = state.withLock { s in
            let a = s.nextImport
            s.nextImport += 0x10_0000
            s.ipcImports[a] = handle
            return a
        }
        return CUDA_SUCCESS
    }

    func ipcCloseMemHandle(_ address: CUdeviceptr) -> CUresult {
        if let code = gate("ipcCloseMemHandle") { return code }
        return state.withLock { $0.ipcImports.removeValue(forKey: address) } == nil
            ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS
    }
}

/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`, the only flag the fake accepts (the one FlashMoE passes).
private let CUDA_IPC_LAZY_FLAG = UInt32(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)

// MARK: - Tensor maps for TMA (h9's block, keep it together)

extension FakeDriver {
    /// Checks what the real driver checks for a 16-bit tiled map, then writes the arguments into the descriptor
    /// (words 0 … 7: address, dims[0], dims[1], strides[0], box[0], box[1], data type, swizzle) so tests can read
    /// them back. Needs no context, like the driver (encoding is host-only).
    func tensorMapEncodeTiled(
        _ map: inout CUtensorMap, _ dataType: CUtensorMapDataType, _ address: CUdeviceptr, _ dims: [UInt64],
        _ strides: [UInt64], _ box: [UInt32], _ swizzle: CUtensorMapSwizzle, _ l2Promotion: CUtensorMapL2promotion
    ) -> CUresult {
        if let code = gate("tensorMapEncodeTiled", needsContext: false) { return code }
        let elementBytes: UInt32 =
            dataType == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 ? 4 : dataType == CU_TENSOR_MAP_DATA_TYPE_UINT8 ? 1 : 2
        guard (1...5).contains(dims.count), strides.count == dims.count - 1, box.count == dims.count,
            address % 16 == 0, strides.allSatisfy({ $0 % 16 == 0 }), box.allSatisfy({ (1...256).contains($0) }),
            swizzle != CU_TENSOR_MAP_SWIZZLE_128B || box[0] * elementBytes <= 128
        else { return CUDA_ERROR_INVALID_VALUE }
        let fields: [UInt64] = [
            address, dims[0], dims.count > 1 ? dims[1] : 0, strides.first ?? 0, UInt64(box[0]),
            box.count > 1 ? UInt64(box[1]) : 0, UInt64(dataType.rawValue), UInt64(swizzle.rawValue),
            // 3-D maps (the fp8 weight stacks): the matrices, their byte stride and the box's depth.
            dims.count > 2 ? dims[2] : 0, strides.count > 1 ? strides[1] : 0, box.count > 2 ? UInt64(box[2]) : 0,
        ]
        withUnsafeMutableBytes(of: &map) { raw in
            for (i, v) in fields.enumerated() { raw.storeBytes(of: v, toByteOffset: i * 8, as: UInt64.self) }
        }
        return CUDA_SUCCESS
    }
}
