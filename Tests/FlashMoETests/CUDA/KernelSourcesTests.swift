import Foundation
import Testing

@testable import FlashMoE

@Suite struct KernelSourcesTests {
    @Test func embeddedFilesAreListedAndReadable() throws {
        let sources = KernelSources.embedded
        let names = try sources.fileNames()
        #expect(names.contains("common.cuh") && names.contains("selftest.cu"))
        let selftest = try sources.text(of: "selftest.cu")
        #expect(selftest.contains("fmoe_selftest_axpy") && selftest.contains("#include \"common.cuh\""))
        #expect(try sources.allFiles().count == names.count)
        #expect(throws: CUDAError.self) { _ = try sources.text(of: "missing.cu") }
    }

    /// Every kernel file in the repository is embedded, byte for byte (a header missing from sources.c would
    /// compile here through the folder but fail on the GPU host).
    @Test func everyRepositoryKernelFileIsEmbedded() throws {
        let folder = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Sources/CKernels/kernels")
        let onDisk = try KernelSources.directory(folder.path).fileNames().sorted()
        #expect(try KernelSources.embedded.fileNames() == onDisk)
        for name in onDisk {
            #expect(try KernelSources.embedded.text(of: name) == KernelSources.directory(folder.path).text(of: name))
        }
    }

    /// Kernel files stay small enough to read: none passes about 400 lines (expert_tiles.cuh reached 579 in round 17
    /// before its decode tiles moved to decode_tiles.cuh). A file that grows past the limit is split by what it holds.
    @Test func noKernelFileOutgrowsTheLimit() throws {
        let limit = 420
        for name in try KernelSources.embedded.fileNames() {
            let text = try KernelSources.embedded.text(of: name)
            let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
            #expect(lines.count <= limit, "\(name): \(lines.count) lines (limit \(limit)); split it by what it holds")
        }
    }

    @Test func theEmbeddedCopyMatchesTheRepositoryFile() throws {
        let file = URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Sources/CKernels/kernels/selftest.cu")
        #expect(try KernelSources.embedded.text(of: "selftest.cu") == String(contentsOf: file, encoding: .utf8))
    }

    @Test func theEnvironmentSelectsAFolder() throws {
        #expect(KernelSources.current(environment: [:]) == .embedded)
        #expect(KernelSources.current(environment: ["FLASHMOE_KERNEL_DIR": ""]) == .embedded)
        let scratch = try ScratchDirectory()
        try Data("edited".utf8).write(to: URL(fileURLWithPath: scratch.path + "/selftest.cu"))
        let sources = KernelSources.current(environment: ["FLASHMOE_KERNEL_DIR": scratch.path])
        #expect(try sources.text(of: "selftest.cu") == "edited")
        #expect(throws: CUDAError.self) { _ = try sources.text(of: "../etc/passwd") }
        #expect(throws: CUDAError.self) { _ = try KernelSources.directory(scratch.path + "/none").fileNames() }
    }

    @Test func theCatalogAlwaysStartsWithTheSelfTest() {
        let specs = KernelCatalog.specializations(for: Preset.all.map(\.config))
        #expect(specs.first == KernelCatalog.selfTest && Set(specs).count == specs.count)
        #expect(KernelCatalog.selfTest.description == "selftest.cu")
        #expect(KernelSpec(file: "m.cu", defines: ["B": "2", "A": "1"], kernels: []).description == "m.cu [A=1 B=2]")
    }

    /// `flashmoe compile --trace`: the tracing builds `bench --trace` loads, an fp8 layer's traced prefill build
    /// included.
    @Test func theCatalogHasTheTracingBuilds() throws {
        let sm90a = GPUArchitecture(major: 9, minor: 0)
        let bf16 = MoEConfig(hiddenSize: 256, intermediateSize: 128, experts: 8, topK: 2, precision: .bf16)
        var fp8 = bf16
        fp8.precision = .fp8
        let traced = KernelCatalog.traced(for: [bf16, fp8], arch: sm90a, experimentalFP8: true)
        #expect(traced.allSatisfy { $0.defines["FMOE_TRACE"] == "1" })
        #expect(traced.first == (try FusedSpecialization(config: bf16, arch: sm90a, trace: true)).kernelSpec)
        let fp8Builds = try FusedSpecialization(config: fp8, arch: sm90a, trace: true, experimentalFP8: true)
            .operatorBuilds().map(\.kernelSpec)
        #expect(Array(traced.dropFirst()) == fp8Builds)
        #expect(KernelCatalog.traced(for: [fp8], arch: sm90a, experimentalFP8: false).isEmpty)
    }
}
