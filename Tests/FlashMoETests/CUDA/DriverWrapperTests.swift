import CCUDA
import Foundation
import Synchronization
import Testing

@testable import FlashMoE

/// The CUDA wrappers against the fake driver: error mapping, per-thread contexts, leak-freedom, argument packing
/// and argument checks. No GPU needed.
@Suite struct DriverWrapperTests {
    // MARK: Error mapping

    @Test func outOfMemoryNamesTheRequestedSizeAndFreeMemory() throws {
        let fake = FakeDriver()
        let device = try CUDADevice(driver: fake)
        fake.fail("memAlloc", with: CUDA_ERROR_OUT_OF_MEMORY)
        #expect(throws: CUDAError.outOfMemory(call: "cuMemAlloc_v2", requestedBytes: 4 << 30, freeBytes: 1 << 30)) {
            _ = try DeviceBuffer<Float>(device: device, count: 1 << 30)
        }
        let text = CUDAError.outOfMemory(call: "cuMemAlloc_v2", requestedBytes: 4 << 30, freeBytes: 1 << 30)
            .description
        #expect(text.contains("4 GiB") && text.contains("1 GiB free"))
    }

    @Test(arguments: [CUDA_ERROR_NO_BINARY_FOR_GPU, CUDA_ERROR_UNSUPPORTED_PTX_VERSION])
    func imageTheDriverCannotRunIsDriverTooOld(code: CUresult) throws {
        let fake = FakeDriver()
        let device = try CUDADevice(driver: fake)
        fake.fail("moduleLoadData", with: code)
        do throws(CUDAError) {
            _ = try CUDAModule(device: device, cubin: [1, 2, 3])
            Issue.record("loading should fail")
        } catch {
            guard case .driverTooOld(let call, let name, let version, _) = error else {
                Issue.record("expected driverTooOld, got \(error)")
                return
            }
            #expect(call.hasPrefix("cuModuleLoadData") && name == fake.errorName(code) && version == 12040)
            #expect(error.description.contains("driver too old") && error.description.contains("CUDA 12.4"))
            #expect(error.description.contains("update the NVIDIA driver"))
        }
    }

    @Test func anInvalidImageNamesTheArchitectureToCompileFor() throws {
        let fake = FakeDriver()
        let device = try CUDADevice(driver: fake)
        fake.fail("moduleLoadData", with: CUDA_ERROR_INVALID_IMAGE)
        #expect {
            _ = try CUDAModule(device: device, cubin: [1])
        } throws: { error in
            (error as? CUDAError)?.description.contains("compile it for sm_90a") ?? false
        }
    }

    @Test func noDeviceFromTheDriverIsNoDevice() {
        let fake = FakeDriver()
        fake.fail("deviceGetCount", with: CUDA_ERROR_NO_DEVICE)
        #expect {
            _ = try CUDADevice(driver: fake)
        } throws: { error in
            guard case .noDevice(let detail) = error as? CUDAError else { return false }
            return detail.contains("cuDeviceGetCount") && detail.contains("CUDA_VISIBLE_DEVICES")
        }
    }

    @Test func zeroDevicesIsNoDeviceAndAWrongOrdinalNamesTheRange() {
        #expect {
            _ = try CUDADevice(driver: FakeDriver(devices: 0))
        } throws: { error in
            if case .noDevice = error as? CUDAError { true } else { false }
        }
        #expect(throws: CUDAError.invalidArgument("there is no GPU 3: this machine has 2 (0...1)")) {
            _ = try CUDADevice(ordinal: 3, driver: FakeDriver(devices: 2))
        }
    }

    @Test func otherCodesCarryTheDriverNameTextAndAHint() {
        let fake = FakeDriver()
        let known = fake.error(for: CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, call: "cuLaunchCooperativeKernel")
        #expect(
            known.description
                == "cuLaunchCooperativeKernel failed: CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE (720): fake text for 720. "
                + "the grid has more blocks than can be co-resident: size it with CUDAFunction.cooperativeGridLimit")
        let unknown = fake.error(for: CUresult(rawValue: 12345), call: "cuSomething")
        #expect(unknown == .driver(call: "cuSomething", code: 12345, name: "CUDA error 12345", text: "unknown error", hint: nil))
        #expect(fake.error(for: CUDA_ERROR_UNKNOWN, call: "cuInit").description.contains("kernel module"))
        #expect(fake.error(for: CUDA_ERROR_STUB_LIBRARY, call: "cuInit").description.contains("stub"))
        // Out-of-memory without a requested size (a launch, say) stays a plain driver error.
        if case .driver = fake.error(for: CUDA_ERROR_OUT_OF_MEMORY, call: "cuLaunchKernel") {} else {
            Issue.record("expected a plain driver error")
        }
    }

    @Test func aMissingKernelSaysWhichName() throws {
        let fake = FakeDriver(kernels: ["present"])
        let module = try CUDAModule(device: CUDADevice(driver: fake), cubin: [0])
        #expect {
            _ = try module.function(named: "absent")
        } throws: { error in
            let text = (error as? CUDAError)?.description ?? ""
            return text.contains("CUDA_ERROR_NOT_FOUND") && text.contains("'absent'") && text.contains("extern \"C\"")
        }
    }

    // MARK: Contexts

    @Test func theFakeRefusesContextBoundCallsWithoutACurrentContext() {
        let fake = FakeDriver()
        var address: CUdeviceptr = 0
        #expect(fake.memAlloc(&address, 16) == CUDA_ERROR_INVALID_CONTEXT)
    }

    @Test func everyEntryPointMakesTheContextCurrent() throws {
        let fake = FakeDriver()
        let device = try CUDADevice(driver: fake)
        fake.clearCurrentContext()  // another library (or thread hop) left no context current
        let buffer = try DeviceBuffer<Int32>(device: device, copying: [1, 2, 3])
        fake.clearCurrentContext()
        #expect(try buffer.download() == [1, 2, 3])
        let calls = fake.setCurrentCalls
        _ = try buffer.download()  // already current: no second cuCtxSetCurrent
        #expect(fake.setCurrentCalls == calls)
    }

    @Test func buffersWorkFromAnotherThread() throws {
        let fake = FakeDriver()
        let device = try CUDADevice(driver: fake)
        let buffer = try DeviceBuffer<Float>(device: device, copying: [1, 2, 3, 4])
        let result = Mutex<[Float]?>(nil)
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            result.withLock { $0 = try? buffer.download() }
            done.signal()
        }
        thread.start()
        done.wait()
        #expect(result.withLock { $0 } == [1, 2, 3, 4])
    }

    // MARK: Leak-freedom

    @Test func everyHandleIsReleasedWhenTheObjectsGoAway() throws {
        let fake = FakeDriver(kernels: ["k"], parameterSizes: [8])
        do {
            let device = try CUDADevice(driver: fake)
            let a = try DeviceBuffer<Float>(device: device, copying: [1, 2])
            let stream = try CUDAStream(device: device)
            let (start, end) = (try CUDAEvent(device: device), try CUDAEvent(device: device))
            let kernel = try CUDAModule(device: device, cubin: [0]).function(named: "k")
            try start.record(on: stream)
            try kernel.launch(grid: 1, block: 32, stream: stream, arguments: [.buffer(a)])
            try end.record(on: stream)
            #expect(try end.elapsedMilliseconds(since: start) == 1.25)
            #expect(fake.liveAllocations == 1 && fake.liveHandles == 4 && fake.retainedContexts == 1)
        }
        #expect(fake.liveAllocations == 0 && fake.liveHandles == 0 && fake.retainedContexts == 0)
    }

    @Test func aFailedUploadFreesTheNewBuffer() throws {
        let fake = FakeDriver()
        let device = try CUDADevice(driver: fake)
        fake.fail("memcpyHtoD", with: CUDA_ERROR_ILLEGAL_ADDRESS)
        #expect(throws: CUDAError.self) { _ = try DeviceBuffer<Float>(device: device, copying: [1, 2, 3]) }
        #expect(fake.liveAllocations == 0)
    }

    @Test func aDeviceThatFailsAfterRetainingItsContextReleasesIt() {
        let fake = FakeDriver()
        fake.fail("contextSetCurrent", with: CUDA_ERROR_UNKNOWN)
        #expect(throws: CUDAError.self) { _ = try CUDADevice(driver: fake) }
        #expect(fake.retainedContexts == 0)
    }

    @Test func aFailedKernelLookupUnloadsTheModule() throws {
        let fake = FakeDriver(kernels: [])
        let device = try CUDADevice(driver: fake)
        #expect(throws: CUDAError.self) { _ = try CUDAModule(device: device, cubin: [0]).function(named: "k") }
        #expect(fake.liveHandles == 0)
    }

    @Test func aFailedLaunchLeavesNothingBehind() throws {
        let fake = FakeDriver(kernels: ["k"])
        let device = try CUDADevice(driver: fake)
        fake.fail("launchKernel", with: CUDA_ERROR_ILLEGAL_ADDRESS)
        do {
            let buffer = try DeviceBuffer<UInt8>(device: device, count: 64)
            let kernel = try CUDAModule(device: device, cubin: [0]).function(named: "k")
            #expect(throws: CUDAError.self) { try kernel.launch(grid: 1, block: 1, arguments: [.buffer(buffer)]) }
        }
        #expect(fake.liveAllocations == 0 && fake.liveHandles == 0)
    }

    // MARK: Launches

    @Test func kernelArgumentsArePackedAlignedInOrder() throws {
        let fake = FakeDriver(kernels: ["k"], parameterSizes: [4, 8, 1, 8, 4])
        let device = try CUDADevice(driver: fake)
        let buffer = try DeviceBuffer<Float>(device: device, count: 8)
        let kernel = try CUDAModule(device: device, cubin: [0]).function(named: "k")
        let args: [KernelArgument] = [
            .float(2.5), .buffer(buffer), KernelArgument(bytesOf: UInt8(7)), .int64(-3), .int32(42),
        ]
        try kernel.launch(grid: Dim3(3, 2), block: 128, sharedBytes: 1024, arguments: args)
        let launch = try #require(fake.launches.first)
        #expect(launch.parameters == args.map(\.bytes))
        #expect(launch.aligned.allSatisfy { $0 })
        #expect(launch.grid == (3, 2, 1) && launch.block == (128, 1, 1) && launch.sharedBytes == 1024)
        #expect(!launch.cooperative)
    }

    @Test func cooperativeLaunchesAreSizedByOccupancy() throws {
        let fake = FakeDriver(blocksPerSM: 3, kernels: ["k"])
        let kernel = try CUDAModule(device: CUDADevice(driver: fake), cubin: [0]).function(named: "k")
        #expect(try kernel.cooperativeGridLimit(blockSize: 256) == 12)  // 3 per SM × 4 SMs
        try kernel.launchCooperative(grid: 12, block: 256, arguments: [])
        #expect(fake.launches.last?.cooperative == true)
        #expect {
            try kernel.launchCooperative(grid: 13, block: 256, arguments: [])
        } throws: { error in
            (error as? CUDAError)?.description.contains("at most 12 blocks") ?? false
        }
    }

    @Test func cooperativeLaunchNeedsDeviceSupportAndRoomForOneBlock() throws {
        let unsupported = FakeDriver(cooperative: false, kernels: ["k"])
        let k1 = try CUDAModule(device: CUDADevice(driver: unsupported), cubin: [0]).function(named: "k")
        #expect(throws: CUDAError.invalidArgument("Fake GPU 0 does not support cooperative launches")) {
            try k1.launchCooperative(grid: 1, block: 32, arguments: [])
        }
        let full = FakeDriver(blocksPerSM: 0, kernels: ["k"])
        let k2 = try CUDAModule(device: CUDADevice(driver: full), cubin: [0]).function(named: "k")
        #expect(throws: CUDAError.self) { _ = try k2.cooperativeGridLimit(blockSize: 1024) }
    }

    @Test func badLaunchShapesAreRejectedBeforeTheDriver() throws {
        let fake = FakeDriver(kernels: ["k"])
        let kernel = try CUDAModule(device: CUDADevice(driver: fake), cubin: [0]).function(named: "k")
        #expect(throws: CUDAError.self) { try kernel.launch(grid: 0, block: 32, arguments: []) }
        #expect(throws: CUDAError.self) { try kernel.launch(grid: 1, block: Dim3(32, 0), arguments: []) }
        #expect(throws: CUDAError.self) { try kernel.launch(grid: 1, block: 32, sharedBytes: -1, arguments: []) }
        #expect(fake.launches.isEmpty)
    }

    @Test func functionAttributesMapEachField() throws {
        let fake = FakeDriver(kernels: ["k"])
        let kernel = try CUDAModule(device: CUDADevice(driver: fake), cubin: [0]).function(named: "k")
        let a = try kernel.attributes()  // the fake answers 10 × attribute + 1
        #expect(a.maxThreadsPerBlock == 1 && a.staticSharedBytes == 11 && a.constantBytes == 21)
        #expect(a.localBytesPerThread == 31 && a.registers == 41 && a.ptxVersion == 51 && a.binaryVersion == 61)
        #expect(a.maxDynamicSharedBytes == 81)
        try kernel.setMaxDynamicSharedMemory(200 << 10)
        #expect(throws: CUDAError.self) { try kernel.setMaxDynamicSharedMemory(228 << 10) }
    }

    // MARK: Buffers and devices

    @Test func bufferCopiesFillsAndRangeChecks() throws {
        let device = try CUDADevice(driver: FakeDriver())
        let a = try DeviceBuffer<UInt32>(device: device, count: 6)
        try a.fill(word: 0xDEAD_BEEF)
        try a.upload([1, 2], at: 4)
        #expect(try a.download() == [0xDEAD_BEEF, 0xDEAD_BEEF, 0xDEAD_BEEF, 0xDEAD_BEEF, 1, 2])
        #expect(try a.download(count: 2, from: 3) == [0xDEAD_BEEF, 1])
        let b = try DeviceBuffer<UInt32>(device: device, count: 8)
        try b.fill(byte: 0)
        try b.copy(from: a, stream: CUDAStream(device: device))
        #expect(try b.download(from: 4) == [1, 2, 0, 0])
        #expect(try a.address(at: 2) == a.address + 8)

        #expect(throws: CUDAError.self) { try a.upload([1, 2, 3], at: 4) }
        #expect(throws: CUDAError.self) { _ = try a.download(count: 1, from: 6) }
        #expect(throws: CUDAError.self) { _ = try a.download(count: -1) }
        #expect(throws: CUDAError.self) { try a.copy(from: b) }
        #expect(throws: CUDAError.self) { try DeviceBuffer<UInt8>(device: device, count: 6).fill(word: 1) }
        #expect(throws: CUDAError.self) { _ = try DeviceBuffer<UInt8>(device: device, count: -1) }
        #expect(throws: CUDAError.self) { _ = try DeviceBuffer<Double>(device: device, count: Int.max / 4) }
        let empty = try DeviceBuffer<Float>(device: device, count: 0)
        #expect(empty.address == 0)
        #expect(try empty.download() == [])
    }

    @Test func devicePropertiesAndArchitecture() throws {
        let fake = FakeDriver(devices: 2)
        let device = try CUDADevice(ordinal: 1, driver: fake)
        let p = device.properties
        #expect(p.name == "Fake GPU 1" && p.ordinal == 1 && p.multiprocessorCount == 4)
        #expect(p.computeCapability == ComputeCapability(major: 9, minor: 0) && p.architecture.name == "sm_90a")
        #expect(p.sharedMemoryPerBlockOptIn == 227 << 10 && p.l2CacheBytes == 50 << 20 && p.cooperativeLaunch)
        #expect(try device.memoryInfo() == (free: 1 << 30, total: 80 << 30))
        let other = try CUDADevice(ordinal: 0, driver: fake)
        #expect(try device.canAccessPeer(other))
        try device.enablePeerAccess(to: other)
        fake.fail("contextEnablePeerAccess", with: CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED)
        try device.enablePeerAccess(to: other)  // already enabled is fine
        try device.synchronize()
    }
}
