import CCUDA

/// One self-test check: what it tested, whether it passed, and what it measured or why it failed.
public struct SelfTestStep: Sendable, CustomStringConvertible {
    /// What the check tested, e.g. "broken kernel is reported with the NVRTC log".
    public let name: String
    /// Whether the check passed (false when it threw).
    public let passed: Bool
    /// What it measured or why it failed (the error's text when it threw).
    public let detail: String

    /// `ok   name: detail` or `FAIL name: detail`, status words padded to one width.
    public var description: String { "\(passed ? "ok  " : "FAIL") \(name): \(detail)" }
}

/// End-to-end checks of the CUDA layer, shared by `flashmoe selftest` and the GPU test suite.
///
/// `compilerChecks` need only NVRTC (they run on machines without a GPU); `deviceChecks` round-trip data through
/// the self-test kernels on a real GPU.
public enum CUDASelfTest {
    /// A source with a deliberate error (an undeclared identifier), to check that NVRTC's log reaches the user.
    public static let brokenSource = """
        extern "C" __global__ void fmoe_selftest_broken(float* y) {
            y[threadIdx.x] = fmoe_undeclared_identifier;
        }
        """

    /// NVRTC-only checks for `arch`: a broken kernel gives `compileFailed` with the log; the cubin cache misses,
    /// then hits, then detects a truncated entry and recompiles (in a scratch cache directory, so the first
    /// compile is always a miss; the timings show what the cache saves).
    public static func compilerChecks(backend: any CUDACompiling, arch: GPUArchitecture, sources: KernelSources)
        -> [SelfTestStep]
    {
        var steps: [SelfTestStep] = []
        let broken = CompileRequest(name: "broken.cu", source: brokenSource, arch: arch)
        steps.append(
            step("broken kernel is reported with the NVRTC log") { () throws(CUDAError) in
                do throws(CUDAError) {
                    _ = try KernelCompiler(backend: backend, cache: nil).compile(broken)
                    return (false, "it compiled, but it has an undeclared identifier")
                } catch .compileFailed(_, _, let log) where log.contains("fmoe_undeclared_identifier") {
                    let firstError = log.split(separator: "\n").first { $0.contains("error") } ?? "?"
                    return (true, "compileFailed: \(firstError)")
                }
            })
        steps.append(
            step("cubin cache: miss, hit, corrupt entry recompiled") { () throws(CUDAError) in
                let dir: String
                switch SystemFiles.makeTemporaryDirectory(prefix: "flashmoe-selftest-cache") {
                case .success(let d): dir = d
                case .failure(let e): return (false, e.description)
                }
                defer { SystemFiles.removeDirectory(dir) }
                let compiler = KernelCompiler(backend: backend, cache: CubinCache(directory: dir))
                let first = try compiler.compile(KernelCatalog.selfTest, arch: arch, sources: sources)
                let second = try compiler.compile(KernelCatalog.selfTest, arch: arch, sources: sources)
                truncateToHalf(CubinCache(directory: dir).path(for: first.key))
                let third = try compiler.compile(KernelCatalog.selfTest, arch: arch, sources: sources)
                let ok =
                    first.cache == .miss && second.cache == .hit && second.cubin == first.cubin
                    && third.cubin == first.cubin && { if case .replacedCorrupt = third.cache { true } else { false } }()
                return (
                    ok,
                    "compile \(ms(first.time)) (\(first.cache)), cached \(ms(second.time)) (\(second.cache)), "
                        + "after truncation \(ms(third.time)) (\(third.cache)); cubin \(first.cubin.count) bytes"
                )
            })
        return steps
    }

    /// GPU checks on `device`: compile (through `compiler`'s cache) and load the self-test kernels, read a module
    /// global, round-trip axpy synchronously and on a stream (timed with events), fill and copy device memory,
    /// and a cooperative launch of the largest co-resident grid.
    public static func deviceChecks(device: CUDADevice, compiler: KernelCompiler, sources: KernelSources)
        -> [SelfTestStep]
    {
        let arch = device.properties.architecture
        var module: CUDAModule?
        var steps = [
            step("compile and load selftest.cu for \(arch)") { () throws(CUDAError) in
                let kernel = try compiler.compile(KernelCatalog.selfTest, arch: arch, sources: sources)
                module = try CUDAModule(device: device, cubin: kernel.cubin)
                let regs = kernel.resources.map { "\($0.name) \($0.registers) regs" }.joined(separator: ", ")
                return (true, "\(ms(kernel.time)) (cache \(kernel.cache)); \(regs)")
            }
        ]
        guard let module else { return steps }
        steps.append(
            step("module global") { () throws(CUDAError) in
                let global = try module.global(named: "fmoe_selftest_marker")
                let buffer = try DeviceBuffer<UInt32>(device: device, count: 1)
                try buffer.copy(fromAddress: global.address, count: 1)
                let value = try buffer.download()[0]
                return (value == 0x464D_4F45 && global.byteCount == 4, "read 0x\(String(value, radix: 16))")
            })
        steps.append(step("axpy round trip") { () throws(CUDAError) in try axpy(module, device) })
        steps.append(step("memset and device-to-device copy") { () throws(CUDAError) in try fillAndCopy(device) })
        steps.append(step("cooperative launch") { () throws(CUDAError) in try cooperative(module, device) })
        if arch.computeCapability.major >= 9 {
            steps.append(step("tensor map (TMA) encode") { () throws(CUDAError) in try tensorMap(device) })
        }
        return steps
    }

    /// The sm_90a engine's descriptor (TensorMap) encodes for a real allocation, and the driver itself refuses a
    /// box TMA cannot copy (so the call reached cuTensorMapEncodeTiled, not a stand-in).
    private static func tensorMap(_ device: CUDADevice) throws(CUDAError) -> (Bool, String) {
        let buffer = try DeviceBuffer<UInt16>(device: device, count: 256 * 128)
        let map = try TensorMap(
            driver: device.driver, element: .bf16, address: buffer.address, rows: 256, columns: 128, rowStride: 128,
            boxRows: 256)
        var raw = CUtensorMap()
        let refused = device.driver.tensorMapEncodeTiled(
            &raw, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, buffer.address, [128, 256], [256], [128, 256],
            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE)
        let encoded = map.words.contains { $0 != 0 }
        return (
            encoded && refused != CUDA_SUCCESS,
            "256×128 bf16, box 256×64: \(encoded ? "encoded" : "all zero"); a 256-byte swizzled box row: "
                + (refused == CUDA_SUCCESS ? "accepted (expected a refusal)" : "refused (\(refused.rawValue))"))
    }

    private static func axpy(_ module: CUDAModule, _ device: CUDADevice) throws(CUDAError) -> (Bool, String) {
        let kernel = try module.function(named: "fmoe_selftest_axpy")
        let n = 1_000_003  // not a multiple of the block size
        let x = (0..<n).map { Float($0 % 1000) * 0.5 }
        let y = (0..<n).map { Float($0 % 7) }
        let expected = (0..<n).map { 2 * x[$0] + y[$0] }  // exact in FP32 for these values
        let xs = try DeviceBuffer(device: device, copying: x)
        let ys = try DeviceBuffer(device: device, copying: y)
        let args: [KernelArgument] = [.float(2), .buffer(xs), .buffer(ys), .int32(Int32(n))]
        try kernel.launch(grid: 1024, block: 256, arguments: args)
        let syncResult = try ys.download()

        let stream = try CUDAStream(device: device)
        let (start, end) = (try CUDAEvent(device: device), try CUDAEvent(device: device))
        try ys.upload(y, stream: stream)
        try start.record(on: stream)
        try kernel.launch(grid: Dim3((n + 255) / 256), block: 256, stream: stream, arguments: args)
        try end.record(on: stream)
        let streamResult = try ys.download(stream: stream)
        let elapsed = try end.elapsedMilliseconds(since: start)
        let attributes = try kernel.attributes()
        let ok = syncResult == expected && streamResult == expected
        let wrong = zip(syncResult, expected).filter { $0 != $1 }.count
        return (
            ok,
            ok
                ? "\(n) elements exact; kernel \(formatDecimal(elapsed, 3)) ms on a stream; \(attributes.registers) regs, "
                    + "sm_\(attributes.binaryVersion)"
                : "\(wrong) of \(n) elements wrong"
        )
    }

    private static func fillAndCopy(_ device: CUDADevice) throws(CUDAError) -> (Bool, String) {
        let a = try DeviceBuffer<Float>(device: device, count: 4099)
        let b = try DeviceBuffer<Float>(device: device, count: 4099)
        try a.fill(word: Float(1.5).bitPattern)
        try b.copy(from: a)
        let copied = try b.download()
        try a.fill(byte: 0)
        let zeros = try a.download()
        let (free, total) = try device.memoryInfo()
        let ok = copied.allSatisfy { $0 == 1.5 } && zeros.allSatisfy { $0 == 0 }
        return (ok, "memory \(formatByteCount(free)) free of \(formatByteCount(total))")
    }

    private static func cooperative(_ module: CUDAModule, _ device: CUDADevice) throws(CUDAError) -> (Bool, String) {
        guard device.properties.cooperativeLaunch else { return (false, "the GPU does not support it") }
        let kernel = try module.function(named: "fmoe_selftest_grid_barrier")
        let blockSize = 128
        let grid = try kernel.cooperativeGridLimit(blockSize: blockSize)
        let arrived = try DeviceBuffer<UInt32>(device: device, count: 1)
        let seen = try DeviceBuffer<UInt32>(device: device, count: grid)
        try arrived.fill(byte: 0)
        try seen.fill(byte: 0)
        try kernel.launchCooperative(
            grid: Dim3(grid), block: Dim3(blockSize),
            arguments: [.buffer(arrived), .buffer(seen), .uint32(2_000_000)])
        let counts = try seen.download()
        let short = counts.filter { $0 != UInt32(grid) }.count
        let perSM = grid / device.properties.multiprocessorCount
        return (
            short == 0,
            short == 0
                ? "\(grid) blocks (\(perSM) per SM × \(device.properties.multiprocessorCount) SMs) all co-resident"
                : "\(short) of \(grid) blocks did not see every other block arrive"
        )
    }

    private static func step(_ name: String, _ body: () throws(CUDAError) -> (Bool, String)) -> SelfTestStep {
        do throws(CUDAError) {
            let (passed, detail) = try body()
            return SelfTestStep(name: name, passed: passed, detail: detail)
        } catch {
            return SelfTestStep(name: name, passed: false, detail: error.description)
        }
    }

    private static func ms(_ d: Duration) -> String { "\(formatDecimal(d.milliseconds, 2)) ms" }

    private static func truncateToHalf(_ path: String) {
        guard case .success(let bytes) = SystemFiles.read(path) else { return }
        _ = SystemFiles.writeAtomically(Array(bytes.prefix(bytes.count / 2)), to: path)
    }
}
