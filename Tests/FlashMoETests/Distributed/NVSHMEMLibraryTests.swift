import Foundation
import Testing

@testable import FlashMoE

/// The NVSHMEM loader against a stand-in `libnvshmem_host.so.3` compiled here (it checks the init attributes at
/// the offsets of NVSHMEM 3.x's headers and records the unique id), and the search when there is none.
@Suite struct NVSHMEMLibraryTests {
    static let compiler = ["/usr/bin/cc", "/usr/bin/gcc", "/usr/bin/clang"].first { FileManager.default.isExecutableFile(atPath: $0) }

    /// The stand-in: the exported entry points the loader resolves, with the header's layout checks.
    static let source = """
        #include <string.h>
        #include <stdlib.h>
        static int g_rank = -1, g_n = -1, g_inited = 0, g_finalized = 0;
        static unsigned char g_uid[128];
        int nvshmemx_get_uniqueid(void *id) {
            if (*(int *)id != (1 << 16) + 128) return 7;
            memset((char *)id + 4, 0xAB, 124);
            return 0;
        }
        int nvshmemx_set_attr_uniqueid_args(int r, int n, const void *id, void *attr) {
            char *a = attr;
            if (*(int *)a != (ATTRV << 16) + 144) return 8;
            *(const void **)(a + 32) = id;
            *(int *)(a + 40) = r;
            *(int *)(a + 44) = n;
            return 0;
        }
        int nvshmemx_hostlib_init_attr(unsigned flags, void *attr) {
            char *a = attr;
            if (flags != 8) return 9;
            if (*(int *)(a + 16) != (ATTRV << 16) + 128 || *(int *)(a + 24) != (1 << 16) + 24
                || *(int *)(a + 48) != (ATTRV == 2 ? -1 : 0))
                return 10;
            memcpy(g_uid, *(const unsigned char **)(a + 32), 128);
            g_rank = *(int *)(a + 40);
            g_n = *(int *)(a + 44);
            g_inited = 1;
            return 0;
        }
        void nvshmemx_hostlib_finalize(void) { g_inited = 0; g_finalized++; }
        int nvshmem_my_pe(void) { return g_rank; }
        int nvshmem_n_pes(void) { return g_n; }
        void *nvshmem_malloc(size_t n) { return malloc(n); }
        void nvshmem_free(void *p) { free(p); }
        void *nvshmem_ptr(const void *p, int pe) { return pe == g_rank ? (void *)p : 0; }
        void nvshmem_barrier_all(void) {}
        int nvshmemx_cumodule_init(void *m) { return m ? 0 : 11; }
        void nvshmem_info_get_version(int *major, int *minor) { *major = 1; *minor = 3; }
        void nvshmemx_vendor_get_version_info(int *major, int *minor, int *patch) {
            *major = VMAJOR; *minor = VMINOR; *patch = VPATCH;
        }
        int fake_finalized(void) { return g_finalized; }
        int fake_uid_byte(int i) { return g_uid[i]; }
        int fake_inited(void) { return g_inited; }
        """

    /// Builds the stand-in into a new folder, reporting release `version` and checking the init attributes of
    /// `layout`; returns the folder.
    static func buildStandIn(
        in dir: String, version: (Int, Int, Int) = (3, 8, 0), layout: NVSHMEMInitAttrLayout = .v2
    ) throws -> String {
        let c = dir + "/fake.c"
        try source.write(toFile: c, atomically: true, encoding: .utf8)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try #require(compiler))
        p.arguments = [
            "-shared", "-fPIC", "-DVMAJOR=\(version.0)", "-DVMINOR=\(version.1)", "-DVPATCH=\(version.2)",
            "-DATTRV=\(layout.rawValue)", "-o", dir + "/libnvshmem_host.so.3", c,
        ]
        try p.run()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        return dir
    }

    @Test(.enabled(if: compiler != nil, "needs a C compiler to build the stand-in library"))
    func bootstrapsThroughTheRendezvousAndInitializesWithTheUniqueID() throws {
        try withTemporaryDirectory { dir in
            let folder = try Self.buildStandIn(in: dir)
            let nvshmem = try NVSHMEMLibrary.load(environment: [NVSHMEMLibrary.overrideVariable: folder])
            #expect(nvshmem.path == folder + "/libnvshmem_host.so.3")
            #expect(nvshmem.specVersion == (1, 3))
            #expect(nvshmem.version == NVSHMEMVersion(major: 3, minor: 8, patch: 0))

            let (open, cleanup) = try StoreKind.directory.make()
            defer { cleanup() }
            let r = try Rendezvous.join(rank: 0, worldSize: 1, store: try open(0), timeout: .seconds(5))
            try nvshmem.bootstrap(r)
            #expect(nvshmem.myPE == 0 && nvshmem.peCount == 1)
            let lib = try DynamicLibrary.open(folder + "/libnvshmem_host.so.3").get()
            typealias ByteAt = @convention(c) (Int32) -> Int32
            let byte = try lib.function("fake_uid_byte", as: ByteAt.self, library: "stand-in")
            #expect(byte(0) == 128 && byte(2) == 1, "the id's version word, (1 << 16) + 128")
            #expect(byte(4) == 0xAB && byte(127) == 0xAB, "the id rank 0 made is the one every PE initialized with")

            // Another PE of a larger group, given the id directly.
            try nvshmem.initialize(rank: 3, ranks: 4, uniqueID: try nvshmem.uniqueID())
            #expect(nvshmem.myPE == 3 && nvshmem.peCount == 4)
            let a = try #require(nvshmem.allocate(bytes: 64))
            #expect(nvshmem.peerAddress(a, pe: 3) == a && nvshmem.peerAddress(a, pe: 0) == nil)
            nvshmem.free(a)
            #expect(throws: NVSHMEMError.self) { try nvshmem.initialize(rank: 0, ranks: 1, uniqueID: [1, 2]) }
            nvshmem.finalize()
        }
    }

    /// With the real wheel's library (FLASHMOE_NVSHMEM=…/nvidia/nvshmem/lib): every entry point resolves and a
    /// unique id is made (NVSHMEM's uid bootstrap needs no GPU for that).
    @Test(.enabled(if: ProcessEnvironment.current()[NVSHMEMLibrary.overrideVariable] != nil,
                   "set FLASHMOE_NVSHMEM to the nvidia-nvshmem wheel's lib folder to check the real library"))
    func theRealLibraryLoadsAndMakesAUniqueID() throws {
        let nvshmem = try NVSHMEMLibrary.load()
        #expect(nvshmem.specVersion.major >= 1)
        let id = try nvshmem.uniqueID()
        #expect(id.count == 128)
        #expect(Array(id[0..<4]) == [0x80, 0, 1, 0], "the version word NVSHMEM expects")
        #expect(id[4...].contains { $0 != 0 }, "the library filled the id")
    }

    @Test func aMissingLibraryListsThePlacesTriedAndHowToInstall() {
        #expect {
            _ = try NVSHMEMLibrary.load(environment: [NVSHMEMLibrary.overrideVariable: "/nonexistent/lib"])
        } throws: { error in
            let text = "\(error)"
            return text.contains("/nonexistent/lib/libnvshmem_host.so.3") && text.contains("pip install nvidia-nvshmem-cu13")
        }
    }

    @Test func candidatesSearchTheWheelsUnlessOverridden() {
        let env = ["VIRTUAL_ENV": "/venv", "HOME": "/home/u"]
        let found = NVSHMEMLibrary.candidates(environment: env) { pattern in
            pattern.hasPrefix("/venv/") ? ["/venv/lib/python3.11/site-packages/nvidia/nvshmem/lib/libnvshmem_host.so.3"] : []
        }
        #expect(found.first == "libnvshmem_host.so.3")
        #expect(found.contains("/venv/lib/python3.11/site-packages/nvidia/nvshmem/lib/libnvshmem_host.so.3"))
        #expect(NVSHMEMLibrary.candidates(environment: ["FLASHMOE_NVSHMEM": "/x/lib/"]) == ["/x/lib/libnvshmem_host.so.3"])
        #expect(NVSHMEMLibrary.candidates(environment: ["FLASHMOE_NVSHMEM": "/x/libnvshmem_host.so.3"])
            == ["/x/libnvshmem_host.so.3"])
    }
}

/// The release check and the teardown order of the NVSHMEM loader (the stand-in library of
/// `NVSHMEMLibraryTests`, built per release).
@Suite struct NVSHMEMVersionTests {
    typealias Count = @convention(c) () -> Int32

    static func finalizedCount(_ folder: String) throws -> Int32 {
        let lib = try DynamicLibrary.open(folder + "/libnvshmem_host.so.3").get()
        return try lib.function("fake_finalized", as: Count.self, library: "stand-in")()
    }

    @Test(.enabled(if: NVSHMEMLibraryTests.compiler != nil, "needs a C compiler to build the stand-in library"))
    func release34InitializesWithItsV1AttributesAndFinalizesOnceOnlyAfterInit() throws {
        try withTemporaryDirectory { dir in
            let folder = try NVSHMEMLibraryTests.buildStandIn(in: dir, version: (3, 4, 5), layout: .v1)
            let nvshmem = try NVSHMEMLibrary.load(environment: [NVSHMEMLibrary.overrideVariable: folder])
            #expect(nvshmem.version == NVSHMEMVersion(major: 3, minor: 4, patch: 5))
            nvshmem.finalize()  // the error path before init: nothing to finalize
            #expect(try Self.finalizedCount(folder) == 0 && !nvshmem.isInitialized)
            // The stand-in refuses (status 8 or 10) attributes not laid out as 3.4's initializer lays them out.
            try nvshmem.initialize(rank: 0, ranks: 1, uniqueID: try nvshmem.uniqueID())
            #expect(nvshmem.isInitialized)
            nvshmem.finalize()
            nvshmem.finalize()  // close after an error-path finalize, or twice: once only
            #expect(try Self.finalizedCount(folder) == 1 && !nvshmem.isInitialized)
        }
    }

    @Test(.enabled(if: NVSHMEMLibraryTests.compiler != nil, "needs a C compiler to build the stand-in library"))
    func aReleaseNotCheckedIsRefusedUnlessOverridden() throws {
        try withTemporaryDirectory { dir in
            let folder = try NVSHMEMLibraryTests.buildStandIn(in: dir, version: (3, 6, 1))
            #expect {
                _ = try NVSHMEMLibrary.load(environment: [NVSHMEMLibrary.overrideVariable: folder])
            } throws: { error in
                guard case .invalidArgument(let text) = error as? CUDAError else { return false }
                return text.contains("NVSHMEM 3.6.1") && text.contains("3.4.x, 3.8.x")
                    && text.contains(NVSHMEMVersionCheck.overrideVariable)
            }
            let anyway = try NVSHMEMLibrary.load(
                environment: [NVSHMEMLibrary.overrideVariable: folder, NVSHMEMVersionCheck.overrideVariable: "1"])
            try anyway.initialize(rank: 0, ranks: 1, uniqueID: try anyway.uniqueID())  // 3.8's v2 layout
            anyway.finalize()
        }
    }

    @Test func checkedReleasesMapToTheirInitAttributeLayouts() {
        #expect(NVSHMEMVersionCheck.layout(of: NVSHMEMVersion(major: 3, minor: 4, patch: 5)) == .v1)
        #expect(NVSHMEMVersionCheck.layout(of: NVSHMEMVersion(major: 3, minor: 8, patch: 2)) == .v2)
        #expect(NVSHMEMVersionCheck.layout(of: NVSHMEMVersion(major: 3, minor: 5, patch: 0)) == nil)
        #expect(NVSHMEMVersionCheck.layout(of: NVSHMEMVersion(major: 4, minor: 8, patch: 0)) == nil)
    }

    @Test func theInitAttributesDifferOnlyInVersionWordsAndTheDeviceField() {
        let v1 = NVSHMEMLibrary.initialAttributes(layout: .v1)
        let v2 = NVSHMEMLibrary.initialAttributes(layout: .v2)
        func word(_ a: [UInt8], _ at: Int) -> Int32 { a[at..<at + 4].reversed().reduce(0) { $0 << 8 | Int32($1) } }
        #expect(v1.count == 144 && v2.count == 144)
        #expect(word(v1, 0) == (1 << 16) + 144 && word(v2, 0) == (2 << 16) + 144)
        #expect(word(v1, 16) == (1 << 16) + 128 && word(v2, 16) == (2 << 16) + 128)
        #expect(word(v1, 48) == 0 && word(v2, 48) == -1)
        let differing = (0..<144).filter { v1[$0] != v2[$0] }
        #expect(differing.allSatisfy { (0..<4).contains($0) || (16..<20).contains($0) || (48..<52).contains($0) })
    }
}

/// The NVSHMEM build's kernel source drops IBGDA before NVSHMEM's headers see it (3.4 would otherwise include
/// <infiniband/mlx5dv.h>, which NVRTC cannot open), and shims 3.4's std traits.
@Suite struct NVSHMEMTransportSourceTests {
    @Test func theBuildOptionsAreIncludedAndIBGDADroppedBeforeNVSHMEMsHeaders() throws {
        let text = try #require(try KernelSources.embedded.allFiles()["transport_nvshmem.cuh"])
        func at(_ s: String) throws -> String.Index { try #require(text.range(of: s)?.lowerBound, "\(s)") }
        let options = try at("#include <non_abi/nvshmem_build_options.h>")
        let undef = try at("#undef NVSHMEM_IBGDA_SUPPORT\n")
        let gpunetio = try at("#undef NVSHMEM_GPUNETIO_SUPPORT")
        let traits = try at("using cuda::std::is_integral;")
        let header = try at("#include <nvshmem.h>")
        #expect(options < undef && undef < header && gpunetio < header && traits < header)
    }
}
