import Foundation
import Synchronization
import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// nvJitLink standing in for the library: records every call and fails the one it is told to.
final class FakeJitLink: JitLinkAPI, @unchecked Sendable {
    struct Log {
        var calls: [String] = []
        var options: [String] = []
        var inputs: [String] = []
        var destroyed = 0
    }
    let log = Mutex(Log())
    let failing: String?
    let cubin: [UInt8]
    var identity: String { "fake nvJitLink" }

    init(failing: String? = nil, cubin: [UInt8] = [0x7F, 0x45, 0x4C, 0x46, 1, 2]) {
        self.failing = failing
        self.cubin = cubin
    }

    private func call(_ name: String, _ status: UInt32 = 9) -> UInt32 {
        log.withLock { $0.calls.append(name) }
        return failing == name ? status : 0
    }

    func create(_ handle: inout OpaquePointer?, options: [String]) -> UInt32 {
        log.withLock { $0.options = options }
        let status = call("create", 1)
        if status == 0 { handle = OpaquePointer(bitPattern: 0x1000) }
        return status
    }
    func destroy(_ handle: inout OpaquePointer?) -> UInt32 {
        log.withLock { $0.destroyed += 1 }
        handle = nil
        return 0
    }
    func addData(_ handle: OpaquePointer, kind: UInt32, bytes: [UInt8], name: String) -> UInt32 {
        log.withLock { $0.inputs.append("data \(kind) \(name) \(bytes.count)") }
        return call("addData", 12)
    }
    func addFile(_ handle: OpaquePointer, kind: UInt32, path: String) -> UInt32 {
        log.withLock { $0.inputs.append("file \(kind) \(path)") }
        return call("addFile", 12)
    }
    func complete(_ handle: OpaquePointer) -> UInt32 { call("complete", 6) }
    func linkedCubin(_ handle: OpaquePointer) -> (status: UInt32, cubin: [UInt8]) {
        call("cubin") == 0 ? (0, cubin) : (9, [])
    }
    func errorLog(_ handle: OpaquePointer) -> String {
        failing == nil ? "" : "error   : Undefined reference to 'nvshmemi_device_state_d' in 'ltoPtx'"
    }
    func infoLog(_ handle: OpaquePointer) -> String { "ptxas info    : Used 40 registers" }
}

/// An LTO-IR compiler that returns fixed bytes and records its options.
final class FakeLTOCompiler: LTOCompiling, @unchecked Sendable {
    let options = Mutex<[[String]]>([])
    var identity: String { "fake nvrtc" }
    func compileToLTOIR(source: String, name: String, headers: [String: String], options: [String])
        throws(CUDAError) -> (ltoir: [UInt8], log: String)
    {
        self.options.withLock { $0.append(options) }
        return ([1, 2, 3, 4], "")
    }
}

@Suite struct JitLinkerTests {
    @Test func aLinkAddsEveryInputInOrderAndReturnsTheCubinAndInfoLog() throws {
        let fake = FakeJitLink()
        let result = try JitLinker(api: fake).link(
            options: ["-arch=sm_90a", "-lto"],
            inputs: [.data(.ltoir, bytes: [1, 2, 3], name: "moe.cu"), .file(.library, path: "/x/libnvshmem_device.a")])
        #expect(result.cubin == fake.cubin && result.infoLog.contains("40 registers"))
        let log = fake.log.withLock { $0 }
        #expect(log.options == ["-arch=sm_90a", "-lto"])
        #expect(log.inputs == ["data 3 moe.cu 3", "file 6 /x/libnvshmem_device.a"])
        #expect(log.calls == ["create", "addData", "addFile", "complete", "cubin"] && log.destroyed == 1)
    }

    @Test(arguments: [("addFile", "nvJitLinkAddFile"), ("complete", "nvJitLinkComplete"), ("cubin", "nvJitLinkGetLinkedCubin")])
    func aFailingCallIsATypedErrorWithTheLogAndTheHandleIsDestroyed(failing: String, call: String) {
        let fake = FakeJitLink(failing: failing)
        #expect {
            _ = try JitLinker(api: fake).link(
                options: ["-arch=sm_80"], inputs: [.file(.library, path: "/x/libnvshmem_device.a")])
        } throws: { error in
            guard let e = error as? JitLinkError else { return false }
            return e.call == call && e.log.contains("nvshmemi_device_state_d") && !e.hint.isEmpty
        }
        #expect(fake.log.withLock { $0.destroyed } == 1)
    }

    @Test func aRefusedCreateNeedsNoDestroy() {
        let fake = FakeJitLink(failing: "create")
        #expect(throws: JitLinkError.self) { _ = try JitLinker(api: fake).link(options: [], inputs: []) }
        #expect(fake.log.withLock { $0.destroyed } == 0)
        #expect(JitLinkError.name(of: 12) == "NVJITLINK_ERROR_INCORRECT_INPUT_TYPE")
        #expect(JitLinkError.name(of: 99) == "nvJitLinkResult 99")
    }

    @Test func theLocatorHonoursTheOverrideAloneAndElseSearchesLoaderToolkitAndWheels() {
        #expect(NVJitLinkLocator.candidates(environment: ["FLASHMOE_NVJITLINK": "/w/lib/"])
            == ["/w/lib/libnvJitLink.so.13", "/w/lib/libnvJitLink.so.12"])
        #expect(NVJitLinkLocator.candidates(environment: ["FLASHMOE_NVJITLINK": "/w/libnvJitLink.so.13"])
            == ["/w/libnvJitLink.so.13"])
        let all = NVJitLinkLocator.candidates(environment: ["PYTHONPATH": "/site"], glob: { _ in [] })
        #expect(all.prefix(2) == ["libnvJitLink.so.13", "libnvJitLink.so.12"])
        #expect(all.contains("/usr/local/cuda/lib64/libnvJitLink.so.13"))
        #expect(all.contains("/site/nvidia/cu13/lib/libnvJitLink.so.13"))
        let missing = try? NVJitLink.load(environment: ["FLASHMOE_NVJITLINK": "/nonexistent"])
        #expect(missing == nil)
    }
}

@Suite struct NVSHMEMDeviceKitTests {
    @Test func theKitNeedsHeadersDeviceLibraryAndCUDAHeadersWithCCCL() throws {
        let files: Set = [
            "/site/nvidia/nvshmem/include/nvshmem.h", "/site/nvidia/nvshmem/lib/libnvshmem_device.a",
            "/site/nvidia/cu13/include/cuda_runtime.h", "/site/nvidia/cu13/include/cccl/cuda/std/cstdint",
        ]
        let kit = try NVSHMEMDeviceKit.locate(
            environment: ["PYTHONPATH": "/site"], glob: { _ in [] }, exists: { files.contains($0) })
        #expect(kit.includeDirectory == "/site/nvidia/nvshmem/include")
        #expect(kit.deviceLibrary == "/site/nvidia/nvshmem/lib/libnvshmem_device.a")
        #expect(kit.nvrtcOptions == [
            "-I/site/nvidia/nvshmem/include", "-I/site/nvidia/cu13/include", "-I/site/nvidia/cu13/include/cccl",
            "-DNVSHMEM_ENABLE_ALL_DEVICE_INLINING",
        ])
    }

    @Test func theHostLibraryOverrideLeadsToItsHome() {
        let homes = NVSHMEMDeviceKit.homeCandidates(
            environment: ["FLASHMOE_NVSHMEM": "/w/nvidia/nvshmem/lib/libnvshmem_host.so.3"], glob: { _ in [] })
        #expect(homes.first == "/w/nvidia/nvshmem")
        #expect(NVSHMEMDeviceKit.homeCandidates(environment: ["FLASHMOE_NVSHMEM_HOME": "/h/"]) == ["/h"])
    }

    @Test func aMissingPieceListsThePlacesTriedAndWhatToInstall() {
        let homeOnly: Set = ["/h/include/nvshmem.h", "/h/lib/libnvshmem_device.a"]
        #expect {
            _ = try NVSHMEMDeviceKit.locate(
                environment: ["FLASHMOE_NVSHMEM_HOME": "/h", "FLASHMOE_CUDA_INCLUDE": "/c"], exists: { homeOnly.contains($0) })
        } throws: { error in
            "\(error)".contains("cuda_runtime.h") && "\(error)".contains("  /c") && "\(error)".contains("nvidia-cuda-cccl")
        }
        #expect {
            _ = try NVSHMEMDeviceKit.locate(environment: ["FLASHMOE_NVSHMEM_HOME": "/none"], exists: { _ in false })
        } throws: { error in
            "\(error)".contains("libnvshmem_device.a") && "\(error)".contains("nvidia-nvshmem-cu13")
        }
    }
}

@Suite struct NVSHMEMKernelBuilderTests {
    static let kit = NVSHMEMDeviceKit(
        includeDirectory: "/n/include", deviceLibrary: "/n/lib/libnvshmem_device.a", cudaIncludeDirectory: "/c",
        cccl: "/c/cccl")

    @Test func theBuildCompilesLTOIRWithTheDefineAndLinksTheDeviceLibraryThenCaches() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("fmoe-nvshmem-\(UUID())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let compiler = FakeLTOCompiler(), link = FakeJitLink()
        let builder = NVSHMEMKernelBuilder(
            compiler: compiler, linker: JitLinker(api: link), kit: Self.kit, cache: CubinCache(directory: dir))
        let spec = KernelSpec(file: "selftest.cu", defines: ["FMOE_RANKS": "2"], kernels: [])
        let arch = GPUArchitecture(major: 9, minor: 0)
        let first = try builder.build(spec, arch: arch, sources: .embedded)
        #expect(first.cubin == link.cubin && first.cache == .miss)
        let options = compiler.options.withLock { $0 }
        #expect(options.count == 1)
        let o = options[0]
        #expect(o.contains("-dlto") && o.contains("-rdc=true") && o.contains("-DFMOE_NVSHMEM=1") && o.contains("-DFMOE_RANKS=2"))
        #expect(o.contains("-I/n/include") && o.contains("-DNVSHMEM_ENABLE_ALL_DEVICE_INLINING"))
        #expect(!o.contains { $0.hasPrefix("--ptxas-options") })
        let log = link.log.withLock { $0 }
        #expect(log.options == ["-arch=sm_90a", "-lto", "-Xptxas=-v"])
        #expect(log.inputs == ["data 3 selftest.cu 4", "file 6 /n/lib/libnvshmem_device.a"])
        let second = try builder.build(spec, arch: arch, sources: .embedded)
        #expect(second.cache == .hit && second.cubin == first.cubin && compiler.options.withLock { $0.count } == 1)
    }

    @Test func aLinkFailureIsAnNVSHMEMBuildErrorWithTheUndefinedSymbol() {
        let builder = NVSHMEMKernelBuilder(
            compiler: FakeLTOCompiler(), linker: JitLinker(api: FakeJitLink(failing: "complete")), kit: Self.kit,
            cache: nil)
        #expect {
            _ = try builder.build(
                KernelSpec(file: "selftest.cu", kernels: []), arch: GPUArchitecture(major: 8, minor: 0), sources: .embedded)
        } throws: { error in
            guard case .link(let e) = error as? NVSHMEMBuildError else { return false }
            return e.call == "nvJitLinkComplete" && "\(error)".contains("nvshmemi_device_state_d")
        }
    }
}

/// The real thing, where NVRTC, nvJitLink and the NVSHMEM wheel (with CUDA headers) are installed: set
/// FLASHMOE_NVJITLINK, FLASHMOE_NVSHMEM_HOME and FLASHMOE_CUDA_INCLUDE (see docs/multinode.md). No GPU needed.
enum NVSHMEMToolchain {
    static let builder: NVSHMEMKernelBuilder? = {
        guard TestEnvironment.nvrtc != nil else { return nil }
        return try? NVSHMEMKernelBuilder.fromEnvironment(ProcessEnvironment.current())
    }()
    static var reason: Comment {
        if TestEnvironment.nvrtc == nil { return TestEnvironment.nvrtcReason }
        do {
            _ = try NVSHMEMKernelBuilder.fromEnvironment(ProcessEnvironment.current())
            return "available"
        } catch {
            return "needs nvJitLink, the nvidia-nvshmem-cu13 wheel and CUDA headers (docs/multinode.md): \(error)"
        }
    }
}

@Suite(.serialized, .enabled(if: NVSHMEMToolchain.builder != nil, NVSHMEMToolchain.reason))
struct NVSHMEMLinkTests {
    /// The ranks kernel of a small gated bf16 layer over 2 ranks, with the NVSHMEM transport, for both targets
    /// `flashmoe compile` builds (each takes about a minute: NVRTC, then nvJitLink's LTO).
    @Test(arguments: ["sm_90a", "sm_80"])
    func theRanksKernelLinksAgainstNVSHMEMsDeviceLibrary(arch: String) throws {
        var config = try Preset.named("mixtral-8x7b").config
        config.hiddenSize = 256
        config.intermediateSize = 512
        config.precision = .bf16
        let target = try GPUArchitecture(parsing: arch)
        // Specialized for the target: sm_80 holds fewer stages than sm_90a (the kernel checks DYNAMIC_SMEM).
        let spec = try FusedSpecialization(config: config, arch: target, ranks: 2).kernelSpec
        let builder = NVSHMEMToolchain.builder!
        let kernel = try NVSHMEMKernelBuilder(
            compiler: builder.compiler, linker: builder.linker, kit: builder.kit, cache: nil
        ).build(spec, arch: target, sources: .embedded)
        #expect(Array(kernel.cubin.prefix(4)) == [0x7F, 0x45, 0x4C, 0x46])
        let names = Set(kernel.resources.map(\.name))
        #expect(names.contains(FusedSpecialization.ranksKernelName), "linked kernels: \(names)")
    }

    @Test func nvJitLinkRefusesTheWheelsRawBitcodeWhichIsWhyTheStaticLibraryIsLinked() throws {
        let builder = NVSHMEMToolchain.builder!
        let lib = builder.kit.deviceLibrary.replacingOccurrences(of: "libnvshmem_device.a", with: "libnvshmem_device_sm_90.bc")
        guard FileManager.default.fileExists(atPath: lib) else { return }  // a wheel unpacked without the bitcode
        #expect(throws: JitLinkError.self) {
            _ = try builder.linker.link(options: ["-arch=sm_90a", "-lto"], inputs: [.file(.ltoir, path: lib)])
        }
    }
}

@Suite struct NVSHMEMPeerTableTests {
    static let offsets = [[0, 8, 16, 24, 32, 40, 48, 56, 64], [0, 16, 32, 48, 64, 80, 96, 112, 128], [0, 1, 2, 3, 4, 5, 6, 7, 8]]

    @Test func mappedPeersGetTheirMappingAndOthersTheSymmetricAddress() {
        let arena: UInt64 = 0x7000_0000
        let table = NVSHMEMPeerTable(me: 1, arena: arena, controls: [1000, 2000, 3000], offsets: Self.offsets) { _, pe in
            pe == 0 ? 0xA000_0000 : nil  // PE 0 on this node, PE 2 on another
        }
        #expect(table.mapped == [true, true, false])
        #expect(table.arenaBases == [0xA000_0000, arena, arena])
        #expect(table.controlBases == [0xA000_0000 + 1000, arena + 2000, arena + 3000])
        #expect(table.errorRecordAddress == 0xA000_0000 + 1000 + 256)  // rank 0's record, mapped
        let bytes = table.peerTable
        #expect(bytes.count == 3 * FusedParams.peerByteCount)
        // PE 2's receive buffer: this PE's arena plus PE 2's offset (the symmetric address NVSHMEM calls take).
        let recv2 = bytes[2 * 80..<2 * 80 + 8].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * $1.offset) }
        #expect(recv2 == arena + 0)
        let rowOrigin2 = bytes[2 * 80 + 8..<2 * 80 + 16].enumerated().reduce(UInt64(0)) {
            $0 | UInt64($1.element) << (8 * $1.offset)
        }
        #expect(rowOrigin2 == arena + 1)
    }

    @Test func anUnmappedRankZeroLeavesEachRankItsOwnErrorRecord() {
        let table = NVSHMEMPeerTable(me: 2, arena: 0x5000, controls: [10, 20, 30], offsets: Self.offsets) { _, _ in nil }
        #expect(table.mapped == [false, false, true])
        #expect(table.errorRecordAddress == 0x5000 + 30 + 256)
    }

    @Test func theCompileCommandTakesTheTransportAndChecksTheRankCount() throws {
        var command = try FlashMoECommand.parseAsRoot(["compile", "--transport", "nvshmem", "--nvshmem-ranks", "1"])
        #expect { try command.run() } throws: { "\($0)".contains("--nvshmem-ranks must be at least 2") }
        #expect(throws: (any Error).self) { _ = try FlashMoECommand.parseAsRoot(["compile", "--transport", "nccl"]) }
    }
}
