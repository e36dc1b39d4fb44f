import CCUDA
import Testing

@testable import FlashMoE

/// The device-resident forward's host side over a fake driver (no GPU, no NVRTC): one launch and nothing else per
/// call, typed argument errors before any launch, the error mirror read and the device state reset.
@Suite struct FusedOperatorTests {
    /// A fake GPU with the fused kernel "loaded": the operator, its fake driver and device.
    struct Rig {
        let fake: FakeDriver
        let device: CUDADevice
        let op: FusedOperator
        let x: DeviceBuffer<UInt8>
        let y: DeviceBuffer<UInt8>
        let stream: CUDAStream
    }

    static let config = MoEConfig(hiddenSize: 64, intermediateSize: 96, experts: 8, topK: 2)

    static func rig(maxTokens: Int? = 256, options: FusedOptions = FusedOptions(), devices: Int32 = 1) throws -> Rig {
        let fake = FakeDriver(
            devices: devices, kernels: [FusedSpecialization.kernelName], parameterSizes: [FusedParams.byteCount])
        let device = try CUDADevice(ordinal: 0, driver: fake)
        let kernel = try FusedKernel.loaded(on: device, entry: FusedSpecialization.kernelName)
        let spec = try FusedSpecialization(config: config, injectFault: options.injectFault ? 1 : 0)
        let layer = try MoELayer(config: config, weights: MoEWeights.random(config: config, seed: 3))
        let weights = try FusedDeviceWeights(layer: layer, device: device, packRows: kernel.packRows)
        let op = try FusedOperator(
            specialization: spec, options: options, maxTokens: maxTokens, kernel: kernel, weights: weights)
        let bytes = 256 * config.hiddenSize * 4
        return Rig(
            fake: fake, device: device, op: op, x: try DeviceBuffer(device: device, count: bytes),
            y: try DeviceBuffer(device: device, count: bytes), stream: try CUDAStream(device: device))
    }

    /// Calls that would break stream ordering, graph capture or the no-allocation promise.
    static let forbidden: Set<String> = [
        "memAlloc", "memFree", "memcpyHtoD", "memcpyDtoH", "memcpyDtoD", "memsetD8", "memsetD32",
        "contextSynchronize", "streamSynchronize", "eventSynchronize", "memHostAlloc",
    ]

    static func field(_ launch: FakeDriver.Launch, _ name: String, bytes n: Int = 8) -> UInt64 {
        let offset = FusedParams.offsets[FusedParams.fieldNames.firstIndex(of: name)!]
        return (0..<n).reduce(UInt64(0)) { $0 | UInt64(launch.parameters[0][offset + $1]) << (8 * $1) }
    }

    @Test func aDeviceForwardIsOneLaunchAndNothingElse() throws {
        let r = try Self.rig()
        #expect(r.op.workspaceBytes > 0)  // allocated at creation for maxTokens
        r.fake.clearCalls()
        let call = DeviceForward(input: r.x.address, output: r.y.address, tokens: 100, stream: r.stream.handle)
        try r.op.forward(call)
        try r.op.forward(call)
        let calls = r.fake.calls
        #expect(calls.filter { $0 == "launchCooperativeKernel" }.count == 2)
        #expect(calls.filter { Self.forbidden.contains($0) }.isEmpty, "\(calls)")
        let launches = r.fake.launches
        #expect(launches.count == 2 && launches.allSatisfy(\.cooperative))
        // The epoch is not a launch argument: the same call encodes the same bytes, so a captured launch replays.
        #expect(launches[0].parameters == launches[1].parameters)
        let l = launches[0]
        #expect(Self.field(l, "x") == r.x.address && Self.field(l, "y") == r.y.address)
        #expect(Self.field(l, "tokens", bytes: 4) == 100 && Self.field(l, "epoch") == 0)
        #expect(Self.field(l, "err_mirror") == r.op.mirror.deviceAddress && Self.field(l, "max_tokens", bytes: 4) == 256)
        #expect(Self.field(l, "y_storage", bytes: 4) == 0 && Self.field(l, "inject_fault", bytes: 4) == 0)
        #expect(Self.field(l, "epoch_wrap") == UInt64(UInt32.max))
    }

    /// Setup copies and fills go to the legacy stream, which a caller's non-blocking stream does not wait for: the
    /// device must be synchronized after the last of them and before the first launch (a fill once landed after
    /// the kernel and erased its output), at creation and when a lazily sized workspace is allocated.
    @Test func setupCopiesAndFillsAreCompleteBeforeTheFirstLaunch() throws {
        let setup: Set<String> = ["memcpyHtoD", "memcpyDtoD", "memsetD8", "memsetD32"]
        func check(_ calls: [String]) {
            let lastSetup = calls.lastIndex { setup.contains($0) }
            let launch = calls.firstIndex(of: "launchCooperativeKernel")
            let sync = calls.lastIndex { $0 == "contextSynchronize" }
            #expect(lastSetup != nil && launch != nil && sync != nil, "\(calls)")
            if let lastSetup, let launch, let sync { #expect(lastSetup < sync && sync < launch, "\(calls)") }
        }
        let sized = try Self.rig()
        try sized.op.forward(DeviceForward(input: sized.x.address, output: sized.y.address, tokens: 10, stream: sized.stream.handle))
        check(sized.fake.calls)
        let lazy = try Self.rig(maxTokens: nil)
        lazy.fake.clearCalls()
        try lazy.op.forward(DeviceForward(input: lazy.x.address, output: lazy.y.address, tokens: 10, stream: lazy.stream.handle))
        check(lazy.fake.calls)
    }

    @Test func callerRoutingBuffersAndOutputTypeReachTheKernel() throws {
        let r = try Self.rig()
        let ids = try DeviceBuffer<Int32>(device: r.device, count: 256 * 2)
        let w = try DeviceBuffer<Float>(device: r.device, count: 256 * 2)
        try r.op.forward(DeviceForward(
            input: r.x.address, output: r.y.address, tokens: 7, topKIDs: ids.address, topKWeights: w.address,
            stream: r.stream.handle, outputType: .storage))
        let l = try #require(r.fake.launches.last)
        #expect(Self.field(l, "ids") == ids.address && Self.field(l, "weights") == w.address)
        #expect(Self.field(l, "y_storage", bytes: 4) == 1)
    }

    @Test func zeroTokensLaunchNothing() throws {
        let r = try Self.rig()
        try r.op.forward(DeviceForward(input: 0, output: 0, tokens: 0, stream: r.stream.handle))
        #expect(r.fake.launches.isEmpty)
    }

    @Test func badArgumentsThrowBeforeAnyLaunch() throws {
        let r = try Self.rig(devices: 2)
        let (x, y, s) = (r.x.address, r.y.address, r.stream.handle)
        func expectRefused(_ call: DeviceForward, mentioning word: String) {
            #expect {
                try r.op.forward(call)
            } throws: { error in
                (error as? MoEError)?.kind == .invalidInput && "\(error)".contains(word)
            }
        }
        expectRefused(DeviceForward(input: x, output: y, tokens: 257, stream: s), mentioning: "maxTokens")
        expectRefused(DeviceForward(input: x, output: y, tokens: -1, stream: s), mentioning: "tokens")
        expectRefused(DeviceForward(input: 0, output: y, tokens: 4, stream: s), mentioning: "input")
        expectRefused(DeviceForward(input: x, output: 0, tokens: 4, stream: s), mentioning: "output")
        expectRefused(DeviceForward(input: x + 4, output: y, tokens: 4, stream: s), mentioning: "aligned")
        expectRefused(DeviceForward(input: x, output: y, tokens: 4, topKIDs: 0, stream: s), mentioning: "topKIDs")
        expectRefused(DeviceForward(input: x, output: y, tokens: 4, topKWeights: y + 2, stream: s), mentioning: "topKWeights")
        expectRefused(DeviceForward(input: x, output: y, tokens: 4, stream: s, injectFault: true), mentioning: "injectFault")
        // A handle the driver does not know, and a stream of the other GPU.
        expectRefused(DeviceForward(input: x, output: y, tokens: 4, stream: OpaquePointer(bitPattern: 0xBAD0)), mentioning: "stream")
        let other = try CUDADevice(ordinal: 1, driver: r.fake)
        let foreign = try CUDAStream(device: other)
        expectRefused(DeviceForward(input: x, output: y, tokens: 4, stream: foreign.handle), mentioning: "stream")
        #expect(r.fake.launches.isEmpty)
    }

    /// A record as the kernel's last block mirrors it: code, phase, index, rank, expected, seen.
    static func record(code: UInt32, phase: UInt32, index: UInt32) -> [UInt8] {
        var b: [UInt8] = []
        for v in [code, phase, index, 0] { withUnsafeBytes(of: v.littleEndian) { b += $0 } }
        for v in [UInt64(7) << 32, UInt64(6) << 32] { withUnsafeBytes(of: v.littleEndian) { b += $0 } }
        return b
    }

    @Test func aMirroredKernelErrorIsThrownOnceAndTheStateReset() throws {
        let r = try Self.rig()
        let call = DeviceForward(input: r.x.address, output: r.y.address, tokens: 3, stream: r.stream.handle)
        try r.op.forward(call)
        try r.op.control.fill(byte: 0x5A)  // stands for counters left mid-protocol
        r.op.mirror.write(Self.record(code: 1, phase: 3, index: 9))
        #expect {
            try r.op.forward(call)
        } throws: { error in
            let e = error as? FusedKernelError
            return e?.phase == .task && e?.index == 9 && e?.expected == UInt64(7) << 32
        }
        #expect(r.fake.launches.count == 1)  // the faulting call launched nothing
        #expect(r.op.mirror.bytes(count: 64).allSatisfy { $0 == 0 })
        #expect(try r.op.control.download().allSatisfy { $0 == 0 })  // device epoch and counters restart
        try r.op.forward(call)  // the next call runs
        #expect(r.fake.launches.count == 2)
        // checkErrors reads the mirror without synchronising.
        r.op.mirror.write(Self.record(code: 1, phase: 6, index: 2))
        r.fake.clearCalls()
        #expect(throws: FusedKernelError.self) { try r.op.checkErrors() }
        try r.op.checkErrors()
    }

    @Test func synchronousErrorsWaitForTheStreamAfterEachForward() throws {
        let r = try Self.rig(options: FusedOptions(synchronousErrors: true))
        r.fake.clearCalls()
        try r.op.forward(DeviceForward(input: r.x.address, output: r.y.address, tokens: 5, stream: r.stream.handle))
        let calls = r.fake.calls
        let launch = try #require(calls.firstIndex(of: "launchCooperativeKernel"))
        #expect(calls[launch...].contains("streamSynchronize"))
    }

    @Test func aLazyOperatorSizesItsWorkspaceOnDemand() throws {
        let r = try Self.rig(maxTokens: nil)
        #expect(r.op.workspaceBytes == 0)
        try r.op.forward(DeviceForward(input: r.x.address, output: r.y.address, tokens: 200, stream: r.stream.handle))
        #expect(r.op.workspaceBytes > 0 && r.fake.launches.count == 1)
    }

    @Test func theErrorMirrorIsFreedWithTheOperator() throws {
        let fake: FakeDriver
        do {
            let r = try Self.rig()
            fake = r.fake
            #expect(fake.liveHostAllocations == 1)
        }
        #expect(fake.liveHostAllocations == 0)
    }
}
