import Foundation
import Testing

@testable import FlashMoE
@testable import FlashMoECLI

/// Real compiles with NVRTC (no GPU needed).
@Suite(.enabled(if: TestEnvironment.nvrtc != nil, TestEnvironment.nvrtcReason))
struct NVRTCTests {
    var nvrtc: NVRTC { TestEnvironment.nvrtc! }

    @Test(arguments: ["sm_80", "sm_90a"])
    func selfTestKernelsCompileToACubin(arch: String) throws {
        let compiler = KernelCompiler(backend: nvrtc, cache: nil)
        let kernel = try compiler.compile(
            KernelCatalog.selfTest, arch: GPUArchitecture(parsing: arch), sources: .embedded)
        #expect(Array(kernel.cubin.prefix(4)) == [0x7F, 0x45, 0x4C, 0x46])  // an ELF image
        #expect(Set(kernel.resources.map(\.name)) == Set(KernelCatalog.selfTest.kernels))
        for usage in kernel.resources {
            #expect(usage.arch == arch && usage.registers > 0 && !usage.spills)
        }
    }

    @Test func aBrokenKernelGivesCompileFailedWithTheLog() {
        let request = CompileRequest(
            name: "broken.cu", source: CUDASelfTest.brokenSource, arch: GPUArchitecture(major: 9, minor: 0))
        #expect {
            _ = try KernelCompiler(backend: nvrtc, cache: nil).compile(request)
        } throws: { error in
            guard case .compileFailed(let program, let arch, let log) = error as? CUDAError else { return false }
            return program == "broken.cu" && arch == "sm_90a" && log.contains("fmoe_undeclared_identifier")
                && log.contains("error")
        }
    }

    @Test func headersAreIncludableByName() throws {
        let source = "#include \"twice.cuh\"\nextern \"C\" __global__ void k(float* y) { y[0] = twice(y[1]); }"
        let arch = GPUArchitecture(major: 8, minor: 0)
        let compiler = KernelCompiler(backend: nvrtc, cache: nil)
        let ok = try compiler.compile(
            CompileRequest(name: "k.cu", source: source, headers: ["twice.cuh": "float twice(float x) { return 2 * x; }"], arch: arch))
        #expect(ok.resources.map(\.name) == ["k"])
        #expect {
            _ = try compiler.compile(CompileRequest(name: "k.cu", source: source, arch: arch))
        } throws: { error in
            if case .compileFailed(_, _, let log) = error as? CUDAError { log.contains("twice.cuh") } else { false }
        }
    }

    @Test func anArchitectureNVRTCDoesNotKnowIsATypedError() {
        #expect {
            _ = try KernelCompiler(backend: nvrtc, cache: nil).compile(
                CompileRequest(name: "k.cu", source: "", arch: GPUArchitecture(major: 1, minor: 0)))
        } throws: { error in
            (error as? CUDAError)?.description.contains("gpu-architecture") ?? false
        }
    }

    @Test func theCompilerChecksOfTheSelfTestPass() {
        for step in CUDASelfTest.compilerChecks(backend: nvrtc, arch: GPUArchitecture(major: 9, minor: 0), sources: .embedded) {
            #expect(step.passed, "\(step)")
        }
    }

    /// The library found through FLASHMOE_NVRTC is also found through a PYTHONPATH-style site folder, and
    /// through an explicit file path, when it came from a pip wheel. (Once loaded, the loader also answers the
    /// bare soname, so the site-folder search is checked on the candidate list.)
    @Test func discoveryFindsThePipWheelInEveryWay() throws {
        let suffix = "/nvidia/cu13/lib/libnvrtc.so.13"
        try #require(nvrtc.path.hasSuffix(suffix), "NVRTC is not from a cu13 pip wheel: \(nvrtc.path)")
        let site = String(nvrtc.path.dropLast(suffix.count))
        let environment = ["PYTHONPATH": "/nowhere:\(site)"]
        #expect(NVRTCLocator.candidates(environment: environment).contains(nvrtc.path))
        let viaPythonPath = try NVRTC.load(environment: environment)
        #expect(viaPythonPath.path == nvrtc.path && viaPythonPath.builtins.hasSuffix("libnvrtc-builtins.so.13.0"))
        #expect(try NVRTC.load(environment: ["FLASHMOE_NVRTC": nvrtc.path]).path == nvrtc.path)
        #expect(nvrtc.supportedArchitectures.contains(90) && nvrtc.identity.contains("nvrtc \(nvrtc.version.major)."))
    }

    @Test func compileReportFailsWithTheLogForABrokenKernelFolder() throws {
        let scratch = try ScratchDirectory()
        try Data(CUDASelfTest.brokenSource.utf8).write(to: URL(fileURLWithPath: scratch.path + "/selftest.cu"))
        var lines: [String] = []
        let ok = CompileReport.run(
            specs: [KernelCatalog.selfTest], archs: [GPUArchitecture(major: 8, minor: 0)],
            compiler: KernelCompiler(backend: nvrtc, cache: nil), sources: .directory(scratch.path), lineInfo: false
        ) { lines.append($0) }
        #expect(!ok)
        #expect(lines.joined().contains("FAIL") && lines.joined().contains("fmoe_undeclared_identifier"))
    }

    @Test func compileReportNamesAKernelTheFileDoesNotDefine() {
        var lines: [String] = []
        let spec = KernelSpec(file: "selftest.cu", kernels: ["fmoe_selftest_axpy", "fmoe_missing"])
        let ok = CompileReport.run(
            specs: [spec], archs: [GPUArchitecture(major: 9, minor: 0)],
            compiler: KernelCompiler(backend: nvrtc, cache: nil), sources: .embedded, lineInfo: true
        ) { lines.append($0) }
        #expect(!ok && lines.contains { $0.contains("no kernel named fmoe_missing") })
    }

    @Test func theCompileCommandRunsInProcess() throws {
        var command = try FlashMoECommand.parseAsRoot(["compile", "--arch", "sm_90a", "--preset", "paper-e64", "--no-cache"])
        try command.run()
        var bad = try FlashMoECommand.parseAsRoot(["compile", "--arch", "sm_9x"])
        #expect(throws: CUDAError.self) { try bad.run() }
    }
}
