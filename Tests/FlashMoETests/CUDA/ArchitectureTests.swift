import Testing

@testable import FlashMoE

@Suite struct ArchitectureTests {
    @Test(arguments: [
        (7, 5, "sm_75"), (8, 0, "sm_80"), (8, 6, "sm_86"), (8, 9, "sm_89"), (9, 0, "sm_90a"), (10, 0, "sm_100a"),
        (10, 3, "sm_103a"), (12, 0, "sm_120a"),
    ])
    func computeCapabilityMapsToTheNVRTCTarget(major: Int, minor: Int, name: String) {
        #expect(GPUArchitecture(major: major, minor: minor).name == name)
    }

    @Test func parsingRoundTripsAndRejectsNonsense() throws {
        for name in ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_100a", "sm_121a"] {
            #expect(try GPUArchitecture(parsing: name).name == name)
        }
        #expect(try GPUArchitecture(parsing: "90a") == GPUArchitecture(major: 9, minor: 0))
        #expect(try GPUArchitecture(parsing: "SM_80").number == 80)
        for bad in ["", "sm_", "sm_8", "sm_80b", "compute_90", "sm_1000", "sm_x0", "sm_80a", "sm_٨٠"] {
            #expect(throws: CUDAError.self, "\(bad)") { _ = try GPUArchitecture(parsing: bad) }
        }
    }

    @Test func listsKeepOrderAndDropRepeats() throws {
        let archs = try GPUArchitecture.parseList("sm_90a, sm_80,sm_90a")
        #expect(archs.map(\.name) == ["sm_90a", "sm_80"])
        #expect(throws: CUDAError.self) { _ = try GPUArchitecture.parseList(" , ") }
    }

    @Test func compileOptions() {
        let plain = CompileRequest(name: "k.cu", source: "", arch: GPUArchitecture(major: 9, minor: 0))
        #expect(plain.options == ["-std=c++17", "--gpu-architecture=sm_90a", "-default-device", "--ptxas-options=-v"])
        let full = CompileRequest(
            name: "k.cu", source: "", arch: GPUArchitecture(major: 8, minor: 0),
            defines: ["TILE_N": "128", "FMOE_GATED": "", "A": "1"], lineInfo: true)
        #expect(
            full.options == [
                "-std=c++17", "--gpu-architecture=sm_80", "-default-device", "--ptxas-options=-v", "-lineinfo",
                "-DA=1", "-DFMOE_GATED", "-DTILE_N=128",
            ])
    }

    @Test func versionsAndSizesFormat() {
        #expect(CUDAVersion(12040).description == "12.4" && CUDAVersion(13000).description == "13.0")
        #expect(formatByteCount(12) == "12 B" && formatByteCount(227 << 10) == "227 KiB")
        #expect(formatByteCount(1536 << 20) == "1.5 GiB" && formatByteCount(80 << 30) == "80 GiB")
        #expect(formatDecimal(3.14159, 2) == "3.14" && formatDecimal(-0.5, 1) == "-0.5" && formatDecimal(2, 0) == "2" && formatDecimal(0.05, 3) == "0.050")
    }
}
