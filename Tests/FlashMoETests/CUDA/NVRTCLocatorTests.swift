import Testing

@testable import FlashMoE

@Suite struct NVRTCLocatorTests {
    @Test func anExplicitFileOrFolderIsTheOnlyPlaceSearched() {
        #expect(
            NVRTCLocator.candidates(environment: ["FLASHMOE_NVRTC": "/opt/n/libnvrtc.so.13.0.88", "HOME": "/h"])
                == ["/opt/n/libnvrtc.so.13.0.88"])
        #expect(
            NVRTCLocator.candidates(environment: ["FLASHMOE_NVRTC": "/opt/n/lib/"])
                == ["/opt/n/lib/libnvrtc.so.13", "/opt/n/lib/libnvrtc.so.12"])
    }

    @Test func defaultOrderSonamesThenCUDAThenPythonSites() {
        let fakeGlob: (String) -> [String] = { pattern in
            switch pattern {
            case "/usr/local/cuda-*/lib64/libnvrtc.so.13":
                ["/usr/local/cuda-12.8/lib64/libnvrtc.so.13", "/usr/local/cuda-13.0/lib64/libnvrtc.so.13"]
            default: []
            }
        }
        let env = ["PYTHONPATH": "/w/nvrtc:relative:/w/nvrtc", "VIRTUAL_ENV": "/venv", "HOME": "/home/u"]
        let c = NVRTCLocator.candidates(environment: env, glob: fakeGlob)
        #expect(Array(c.prefix(5)) == [
            "libnvrtc.so.13", "libnvrtc.so.12", "/usr/local/cuda/lib64/libnvrtc.so.13",
            "/usr/local/cuda/lib64/libnvrtc.so.12", "/usr/local/cuda-13.0/lib64/libnvrtc.so.13",
        ])
        #expect(c.contains("/usr/local/cuda-12.8/lib64/libnvrtc.so.13"))
        #expect(c.contains("/usr/local/cuda-*/lib64/libnvrtc.so.12"))  // unmatched pattern kept, for the report
        let pip = c.firstIndex(of: "/w/nvrtc/nvidia/cu13/lib/libnvrtc.so.13")
        #expect(pip != nil && c.filter { $0.hasPrefix("/w/nvrtc/") }.count == 2)  // deduplicated
        #expect(!c.contains { $0.hasPrefix("relative") })
        #expect(c.contains("/venv/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13"))
        #expect(c.contains("/home/u/.local/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"))
        #expect(c.contains("/usr/lib/python3/dist-packages/nvidia/cu13/lib/libnvrtc.so.13"))
        #expect(c.firstIndex(of: "/usr/local/cuda/lib64/libnvrtc.so.13")! < pip!)
    }

    @Test func aWrongOverrideIsAnErrorListingWhatWasTried() {
        #expect {
            _ = try NVRTC.load(environment: ["FLASHMOE_NVRTC": "/nonexistent/lib"])
        } throws: { error in
            guard case .libraryNotFound(let library, let attempts, let hint) = error as? CUDAError else { return false }
            return library == "NVRTC" && attempts.map(\.place) == NVRTCLocator.explicitCandidates("/nonexistent/lib")
                && attempts.allSatisfy { $0.failure == "no such file" } && hint.contains("FLASHMOE_NVRTC")
        }
    }

    @Test func aFileThatIsNotALibraryIsReportedWithTheLoaderMessage() throws {
        let scratch = try ScratchDirectory()
        let fake = scratch.path + "/libnvrtc.so.13"
        _ = SystemFiles.writeAtomically(Array("not an ELF file".utf8), to: fake)
        #expect {
            _ = try NVRTC.load(environment: ["FLASHMOE_NVRTC": fake])
        } throws: { error in
            guard case .libraryNotFound(_, let attempts, _) = error as? CUDAError else { return false }
            return attempts.count == 1 && attempts[0].place == fake && attempts[0].failure != "no such file"
        }
    }
}
