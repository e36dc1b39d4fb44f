/// One GPU check of the device-resident forward (`flashmoe verify`).
public struct DeviceForwardCheck: Sendable {
    /// What was checked.
    public let name: String
    /// Why it failed, or nil.
    public let failure: String?
    /// What was measured, for the table.
    public let detail: String

    /// Whether the check passed (no `failure`).
    public var passed: Bool { failure == nil }

    /// Runs `body` (which returns the failure, or nil, and the detail) as the check `name`; a thrown error fails it.
    static func run(_ name: String, _ body: () throws -> (String?, String)) -> DeviceForwardCheck {
        do {
            let (failure, detail) = try body()
            return DeviceForwardCheck(name: name, failure: failure, detail: detail)
        } catch {
            return DeviceForwardCheck(name: name, failure: "\(error)", detail: "error")
        }
    }
}

extension Verifier {
    /// The layers `deviceForwardChecks` runs (bf16 gated, fp32 E = 256 k = 2, tf32 gated), to compile ahead.
    public static let deviceForwardConfigs: [MoEConfig] = {
        let gated = MoEConfig(hiddenSize: 128, intermediateSize: 96, experts: 16, topK: 4, ffn: .gated, activation: .silu,
                              precision: .bf16)
        let defect7 = MoEConfig(hiddenSize: 616, intermediateSize: 120, experts: 256, topK: 2, activation: .gelu,
                                router: .deepSeek(groups: 2, groupsKept: 2, scalingFactor: 1), precision: .fp32)
        var tf32 = gated
        tf32.precision = .tf32
        return [gated, defect7, tf32]
    }()

    /// The device forward on a GPU (`FusedOperator.forward(_:)` through `FusedMoE`), on caller buffers and a
    /// non-blocking stream:
    /// - against the host-array forward (same bits, same routing through the caller's id and weight buffers) and
    ///   the oracle (within tolerance), in bf16 (gated), fp32 (plain, E = 256, k = 2: issue 12's defect 7 shape)
    ///   and tf32;
    /// - 24 launches queued back to back with a different input each and one synchronisation at the end: each
    ///   output has the bits of its input's host forward (the device epoch advances with no host involvement);
    /// - the same with the epoch wrapping on the device every 3 launches;
    /// - the storage-type output (bf16 y = the FP32 y rounded to bf16);
    /// - a faulted launch (test build, `DeviceForward.injectFault`) surfacing as a `FusedKernelError` on the next
    ///   call, and (with a launch queued behind it) on `checkErrors(synchronizing:)`, each followed by a clean call
    ///   with the right bits;
    /// - with `FLASHMOE_EXPERIMENTAL_FP8=1`: an fp8 operator's decode and prefill kernels in turn (`kernelsInTurn`).
    public static func deviceForwardChecks(deviceOrdinal: Int, seed: UInt64 = 1) -> [DeviceForwardCheck] {
        var checks: [DeviceForwardCheck] = []
        func check(_ name: String, _ body: () throws -> (String?, String)) {
            checks.append(DeviceForwardCheck.run(name, body))
        }
        let (gated, defect7, tf32) = (deviceForwardConfigs[0], deviceForwardConfigs[1], deviceForwardConfigs[2])
        for (name, config, tokens) in [("bf16 gated", gated, 200), ("fp32 E=256 k=2 S=700", defect7, 700),
                                       ("tf32 gated", tf32, 130)] {
            check("device forward = host forward (\(name))") {
                try compareWithHost(config, tokens: tokens, seed: seed, deviceOrdinal: deviceOrdinal)
            }
        }
        check("24 queued launches, new input each (device epoch)") {
            try queuedLaunches(gated, count: 24, epochWrap: nil, seed: seed, deviceOrdinal: deviceOrdinal)
        }
        check("10 queued launches, epoch wrap every 3 on the device") {
            try queuedLaunches(gated, count: 10, epochWrap: 3, seed: seed, deviceOrdinal: deviceOrdinal)
        }
        check("bf16 output (storage type)") {
            try storageOutput(gated, tokens: 77, seed: seed, deviceOrdinal: deviceOrdinal)
        }
        check("faulted launch, then clean launches") {
            try faultThenClean(gated, tokens: 64, seed: seed, deviceOrdinal: deviceOrdinal)
        }
        if FusedSpecialization.supportsFP8 {
            check("fp8 decode and prefill kernels in turn on one operator") {
                try kernelsInTurn(fp8InTurnConfig, seed: seed, deviceOrdinal: deviceOrdinal)
            }
        }
        return checks
    }

    /// The layer of the fp8 kernels-in-turn check: DeepSeek-V3's router and shared expert at a small size whose
    /// TMA build compiles without spills (NVRTC 13.0), so the operator keeps its prefill kernel
    /// (`FusedPrefillEngine`).
    public static let fp8InTurnConfig = MoEConfig(
        hiddenSize: 256, intermediateSize: 128, experts: 128, topK: 8, ffn: .gated, activation: .silu,
        router: .deepSeek(groups: 8, groupsKept: 4, scalingFactor: 2.5),
        sharedExpert: SharedExpertConfig(intermediateSize: 64), precision: .fp8)

    /// Device buffers and a stream for device forwards of one operator. The stream is non-blocking: it does not
    /// wait for the legacy stream, so every copy and fill that a launch reads or overwrites is ordered before it
    /// explicitly (a `cuMemsetD8` queued on the legacy stream once landed after the kernel's output and erased it).
    private struct DeviceIO {
        let stream: CUDAStream
        let device: CUDADevice

        /// `x` as `type` in a new device buffer; the copy is complete on return (the device is synchronized: a
        /// pageable upload may still be in flight when `cuMemcpyHtoD` returns).
        func upload(_ x: HostTensor, as type: ElementType) throws -> DeviceBuffer<UInt8> {
            let b = try FusedIO.upload(x.converted(to: type), device: device)
            try device.synchronize()
            return b
        }

        /// A new buffer filled with 0xFF on the launch stream (NaN in FP32 and BF16, id -1: an element never
        /// written cannot match).
        func buffer(bytes: Int) throws -> DeviceBuffer<UInt8> {
            let b = try DeviceBuffer<UInt8>(device: device, count: max(bytes, 1))
            try b.fill(byte: 0xFF, stream: stream)
            return b
        }
    }

    private static func operatorAndIO(_ layer: MoELayer, _ options: FusedOptions, maxTokens: Int) throws
        -> (FusedMoE, DeviceIO)
    {
        let op = try FusedMoE(layer: layer, options: options, maxTokens: maxTokens)
        return (op, DeviceIO(stream: try CUDAStream(device: op.device), device: op.device))
    }

    private static func sameBits(_ a: [Float], _ b: [Float]) -> Bool {
        a.count == b.count && zip(a, b).allSatisfy { $0.bitPattern == $1.bitPattern }
    }

    private static func compareWithHost(_ config: MoEConfig, tokens s: Int, seed: UInt64, deviceOrdinal: Int) throws
        -> (String?, String)
    {
        let c = VerificationCase(name: "device", config: config, tokens: s, seed: seed &+ 101)
        let (layer, x) = try makeProblem(c)
        let (op, io) = try operatorAndIO(layer, FusedOptions(deviceOrdinal: deviceOrdinal), maxTokens: s)
        let host = try op.forward(x)
        let (h, k) = (config.hiddenSize, config.topK)
        let xd = try io.upload(x, as: config.precision.storage)
        let (y, ids, w) = (try io.buffer(bytes: s * h * 4), try io.buffer(bytes: s * k * 4), try io.buffer(bytes: s * k * 4))
        try op.forward(DeviceForward(
            input: xd.address, output: y.address, tokens: s, topKIDs: ids.address, topKWeights: w.address,
            stream: io.stream.handle))
        try op.core.checkErrors(synchronizing: io.stream.handle)
        let yd: [Float] = try y.download(as: Float.self, count: s * h)
        let idsd: [Int32] = try ids.download(as: Int32.self, count: s * k)
        let wd: [Float] = try w.download(as: Float.self, count: s * k)
        let device = MoEOutput(
            output: try HostTensor(shape: [s, h], float32: yd),
            routing: Routing(tokens: s, topK: k, expertIDs: idsd, weights: wd, slots: host.routing.slots,
                             expertLoad: host.routing.expertLoad))
        let oracle = try CPUBackend(layer: layer, mode: .oracle).forward(x)
        let r = compare(c, device, device, oracle, layer: layer, input: x, gpuMilliseconds: 0)
        let detail = "rel.err \(r.relativeError) (tol \(r.tolerance)), routing mismatches \(r.routingMismatches)"
        if !sameBits(yd, host.output.floats()) { return ("y differs from the host-array forward's bits", detail) }
        if idsd != host.routing.expertIDs || !sameBits(wd, host.routing.weights) {
            return ("the caller's top-k ids or weights differ from the host-array forward's", detail)
        }
        return (r.failure, detail)
    }

    private static func queuedLaunches(
        _ config: MoEConfig, count n: Int, epochWrap: UInt64?, seed: UInt64, deviceOrdinal: Int
    ) throws -> (String?, String) {
        let s = 130
        var options = FusedOptions(deviceOrdinal: deviceOrdinal)
        if let epochWrap { options.epochWrap = epochWrap }
        let c = VerificationCase(name: "queued", config: config, tokens: s, seed: seed &+ 202)
        let (layer, _) = try makeProblem(c)
        let inputs = try (0..<n).map { i in
            try makeProblem(VerificationCase(name: "x", config: config, tokens: s, seed: seed &+ 300 &+ UInt64(i))).1
        }
        let (op, io) = try operatorAndIO(layer, options, maxTokens: s)
        let h = config.hiddenSize
        let references = try inputs.map { try op.forward($0).output.floats() }
        let xs = try inputs.map { try io.upload($0, as: config.precision.storage) }
        let ys = try inputs.map { _ in try io.buffer(bytes: s * h * 4) }
        for i in 0..<n {
            try op.forward(DeviceForward(input: xs[i].address, output: ys[i].address, tokens: s, stream: io.stream.handle))
        }
        try op.core.checkErrors(synchronizing: io.stream.handle)
        let wrong = try (0..<n).filter { !sameBits(try ys[$0].download(as: Float.self, count: s * h), references[$0]) }
        let detail = "\(n) launches, \(n - wrong.count) with the host forward's bits"
        return (wrong.isEmpty ? nil : "launches \(wrong) differ from their host forward", detail)
    }

    /// fp8 (`FusedPrefillEngine`): launches of decode and prefill sizes queued back to back on one operator, so its
    /// two kernels follow each other on one stream over one workspace and device epoch; each output must have the
    /// bits of a one-kernel operator's forward of the same input, and the largest must meet the oracle. On sm_90a
    /// with the default engines the operator must have both kernels; elsewhere (or with FLASHMOE_TMA set) it runs
    /// the launches on its one kernel and says so.
    private static func kernelsInTurn(_ config: MoEConfig, seed: UInt64, deviceOrdinal: Int) throws -> (String?, String) {
        let sizes = [300, 1, 600, 5, 256, 64, 255, 1000]
        let (layer, _) = try makeProblem(VerificationCase(name: "in turn", config: config, tokens: 1, seed: seed &+ 606))
        let inputs = try sizes.enumerated().map { i, s in
            try makeProblem(VerificationCase(name: "x", config: config, tokens: s, seed: seed &+ 700 &+ UInt64(i))).1
        }
        var single = FusedOptions(deviceOrdinal: deviceOrdinal)
        single.prefillEngineTokens = nil
        let one = try FusedMoE(layer: layer, options: single, maxTokens: sizes.max()!)
        let references = try inputs.map { try one.forward($0).output.floats() }
        let (op, io) = try operatorAndIO(layer, FusedOptions(deviceOrdinal: deviceOrdinal), maxTokens: sizes.max()!)
        // The operator's own rule (FusedPrefillEngine) says whether this layer, target and environment get two.
        let expectsTwo = op.specialization.operatorBuilds(
            sharedMemoryPerBlock: op.device.properties.sharedMemoryPerBlockOptIn).count > 1
        guard let from = op.core.prefillTokens else {
            let why = op.core.prefillSkipReason
                ?? "no prefill kernel for \(op.specialization.arch) with this environment"
            return (expectsTwo ? "the operator has no prefill kernel: \(why)" : nil, "one kernel: \(why)")
        }
        let h = config.hiddenSize
        let xs = try inputs.map { try io.upload($0, as: config.precision.storage) }
        let ys = try sizes.map { try io.buffer(bytes: $0 * h * 4) }
        for (i, s) in sizes.enumerated() {
            try op.forward(DeviceForward(input: xs[i].address, output: ys[i].address, tokens: s, stream: io.stream.handle))
        }
        try op.core.checkErrors(synchronizing: io.stream.handle)
        let outputs = try sizes.enumerated().map { i, s in try ys[i].download(as: Float.self, count: s * h) }
        let wrong = sizes.indices.filter { !sameBits(outputs[$0], references[$0]) }
        let last = sizes.count - 1
        let oracle = try CPUBackend(layer: layer, mode: .oracle).forward(inputs[last])
        let device = try op.forward(inputs[last])
        let r = compare(
            VerificationCase(name: "in turn", config: config, tokens: sizes[last], seed: seed), device, device, oracle,
            layer: layer, input: inputs[last], gpuMilliseconds: 0)
        let prefill = sizes.filter { $0 >= from }.count
        let detail = "S = \(sizes.map(String.init).joined(separator: ", ")): \(prefill) on the prefill kernel (S ≥ \(from)), "
            + "\(sizes.count - wrong.count) of \(sizes.count) with one kernel's bits; S = \(sizes[last]) rel.err \(r.relativeError)"
        if !wrong.isEmpty { return ("launches with S = \(wrong.map { sizes[$0] }) differ from the one-kernel forward", detail) }
        return (r.failure, detail)
    }

    private static func storageOutput(_ config: MoEConfig, tokens s: Int, seed: UInt64, deviceOrdinal: Int) throws
        -> (String?, String)
    {
        let (layer, x) = try makeProblem(VerificationCase(name: "bf16 y", config: config, tokens: s, seed: seed &+ 404))
        let (op, io) = try operatorAndIO(layer, FusedOptions(deviceOrdinal: deviceOrdinal), maxTokens: s)
        let want = try op.forward(x).output.floats().map { BFloat16($0).bitPattern }
        let xd = try io.upload(x, as: config.precision.storage)
        let y = try io.buffer(bytes: s * config.hiddenSize * 2)
        try op.forward(DeviceForward(
            input: xd.address, output: y.address, tokens: s, stream: io.stream.handle, outputType: .storage))
        try op.core.checkErrors(synchronizing: io.stream.handle)
        let got: [UInt16] = try y.download(as: UInt16.self, count: s * config.hiddenSize)
        let differ = zip(got, want).filter { $0 != $1 }.count
        return (differ == 0 ? nil : "\(differ) bf16 outputs differ from the FP32 output rounded", "\(got.count) values")
    }

    private static func faultThenClean(_ config: MoEConfig, tokens s: Int, seed: UInt64, deviceOrdinal: Int) throws
        -> (String?, String)
    {
        let (layer, x) = try makeProblem(VerificationCase(name: "fault", config: config, tokens: s, seed: seed &+ 505))
        let want = try FusedMoE(layer: layer, options: FusedOptions(deviceOrdinal: deviceOrdinal)).forward(x).output.floats()
        let options = FusedOptions(deviceOrdinal: deviceOrdinal, waitBudget: .milliseconds(200), injectFault: true)
        let (op, io) = try operatorAndIO(layer, options, maxTokens: s)
        let xd = try io.upload(x, as: config.precision.storage)
        let y = try io.buffer(bytes: s * config.hiddenSize * 4)
        func call(fault: Bool) throws {
            try op.forward(DeviceForward(
                input: xd.address, output: y.address, tokens: s, stream: io.stream.handle, injectFault: fault))
        }
        func clean() throws -> Bool {
            try y.fill(byte: 0xFF)
            try call(fault: false)
            try op.core.checkErrors(synchronizing: io.stream.handle)
            return sameBits(try y.download(as: Float.self, count: s * config.hiddenSize), want)
        }
        guard try clean() else { return ("the first clean launch differs from the host forward", "") }
        // A fault reported by the next call (before it launches anything).
        try call(fault: true)
        try io.stream.synchronize()
        var seen: [String] = []
        do {
            try call(fault: false)
            return ("the call after a faulted launch did not report the fault", "")
        } catch let e as FusedKernelError {
            seen.append("next call: \(e.phase.map { "\($0)" } ?? "code \(e.code)")")
        }
        guard try clean() else { return ("the clean launch after a reported fault differs", seen.joined(separator: "; ")) }
        // A fault with a launch queued behind it before it ends (as in a graph): the queued launch runs nothing
        // (the abort flag is up), and an explicit check reports the fault.
        try call(fault: true)
        try call(fault: false)
        do {
            try op.core.checkErrors(synchronizing: io.stream.handle)
            return ("checkErrors did not report the faulted launch", seen.joined(separator: "; "))
        } catch let e as FusedKernelError {
            seen.append("checkErrors: \(e.phase.map { "\($0)" } ?? "code \(e.code)")")
        }
        guard try clean() else { return ("the clean launch after checkErrors differs", seen.joined(separator: "; ")) }
        return (nil, seen.joined(separator: "; ") + "; clean launches after each have the right bits")
    }
}
