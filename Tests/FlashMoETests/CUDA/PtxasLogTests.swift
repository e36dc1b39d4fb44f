import Testing

@testable import FlashMoE

/// Parsing ptxas statistics. The logs are real NVRTC 13.0 output (`--ptxas-options=-v`), plus the older
/// CUDA 12 "Used N registers, M bytes cmem[0]" layout.
@Suite struct PtxasLogTests {
    @Test func entryFunctionsWithSharedMemoryStackAndADeviceFunction() {
        let log = """
            ptxas info    : 0 bytes gmem
            ptxas info    : Compiling entry function 'k2' for 'sm_90a'
            ptxas info    : Function properties for k2
            ptxas         .     256 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Used 40 registers, used 1 barriers, 256 bytes cumulative stack size, 1024 bytes smem
            ptxas info    : Compile time = 4.692 ms
            ptxas info    : Function properties for _Z6helperf
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Compiling entry function 'k1' for 'sm_90a'
            ptxas info    : Function properties for k1
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Used 10 registers, used 0 barriers
            ptxas info    : Compile time = 1.231 ms
            """
        let kernels = KernelResourceUsage.parse(ptxasLog: log)
        #expect(kernels.map(\.name) == ["k2", "k1"])
        var k2 = KernelResourceUsage(name: "k2", arch: "sm_90a")
        (k2.registers, k2.barriers, k2.stackFrameBytes, k2.sharedBytes) = (40, 1, 256, 1024)
        #expect(kernels[0] == k2)
        #expect(kernels[1].registers == 10 && kernels[1].sharedBytes == 0 && !kernels[1].spills)
    }

    @Test func spillsAreReported() {
        let log = """
            ptxas info    : Overriding maximum register limit 256 for 'spilly' with  32 of maxrregcount option
            ptxas info    : 0 bytes gmem
            ptxas info    : Compiling entry function 'spilly' for 'sm_80'
            ptxas info    : Function properties for spilly
            ptxas         .     2672 bytes stack frame, 4476 bytes spill stores, 4564 bytes spill loads
            ptxas info    : Used 32 registers, used 0 barriers, 2672 bytes cumulative stack size, 364 bytes cmem[0]
            ptxas info    : Compile time = 128.028 ms
            """
        let k = KernelResourceUsage.parse(ptxasLog: log)
        #expect(k.count == 1 && k[0].arch == "sm_80" && k[0].registers == 32 && k[0].constantBytes == 364)
        #expect(k[0].spillStoreBytes == 4476 && k[0].spillLoadBytes == 4564 && k[0].stackFrameBytes == 2672)
        #expect(k[0].spills)
    }

    @Test func olderLayoutAndMangledNames() {
        let log = """
            ptxas info    : 0 bytes gmem
            ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
            ptxas info    : Function properties for _Z3fooPf
                0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
            ptxas info    : Used 255 registers, 360 bytes cmem[0]
            """
        let k = KernelResourceUsage.parse(ptxasLog: log)
        #expect(k.map(\.name) == ["_Z3fooPf"] && k[0].registers == 255 && k[0].constantBytes == 360)
        #expect(k[0].spillStoreBytes == 8 && k[0].spills)
    }

    @Test func nothingToParse() {
        #expect(KernelResourceUsage.parse(ptxasLog: "").isEmpty)
        #expect(KernelResourceUsage.parse(ptxasLog: "broken.cu(2): error: identifier is undefined").isEmpty)
    }
}
