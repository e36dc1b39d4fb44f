import Testing

@testable import FlashMoE

/// The CUDA layer on a real GPU: the self-test's device checks, plus error mapping the driver itself produces.
@Suite(.serialized, .enabled(if: TestEnvironment.gpu.isUsable && TestEnvironment.nvrtc != nil, TestEnvironment.gpuReason))
struct GPUTests {
    func device() throws -> CUDADevice {
        try CUDADevice(ordinal: 0, driver: TestEnvironment.gpu.driver.get().driver)
    }

    @Test func selfTestDeviceChecksPass() throws {
        let compiler = KernelCompiler(backend: TestEnvironment.nvrtc!, environment: ProcessEnvironment.current())
        let gpu = try device()
        let steps = CUDASelfTest.deviceChecks(device: gpu, compiler: compiler, sources: .embedded)
        // sm_90 and newer add the tensor-map (TMA) check.
        #expect(steps.count == (gpu.properties.architecture.computeCapability.major >= 9 ? 6 : 5))
        for step in steps { #expect(step.passed, "\(step)") }
    }

    @Test func anImpossibleAllocationIsOutOfMemoryWithItsSize() throws {
        let gpu = try device()
        let bytes = gpu.properties.totalMemoryBytes * 2
        #expect {
            _ = try DeviceBuffer<UInt8>(device: gpu, count: bytes)
        } throws: { error in
            guard case .outOfMemory(_, let requested, let free) = error as? CUDAError else { return false }
            return requested == bytes && free != nil
        }
    }

    /// The driver reports NO_BINARY_FOR_GPU (mapped to driverTooOld) or INVALID_IMAGE; either way the message
    /// must point at the architecture.
    @Test func aCubinForAnotherArchitectureSaysSo() throws {
        let gpu = try device()
        let other = gpu.properties.computeCapability.major == 8 ? GPUArchitecture(major: 9, minor: 0) : GPUArchitecture(major: 8, minor: 0)
        let kernel = try KernelCompiler(backend: TestEnvironment.nvrtc!, cache: nil)
            .compile(KernelCatalog.selfTest, arch: other, sources: .embedded)
        #expect {
            _ = try CUDAModule(device: gpu, cubin: kernel.cubin)
        } throws: { error in
            (error as? CUDAError)?.description.contains("architecture") ?? false
        }
    }
}
