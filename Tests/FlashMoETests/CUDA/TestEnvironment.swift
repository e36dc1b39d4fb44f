@testable import FlashMoE

/// What the machine running the tests has. NVRTC is found the way the CLI finds it (set FLASHMOE_NVRTC to its
/// file or folder); a GPU needs libcuda.so.1 and a device.
enum TestEnvironment {
    static let nvrtc: NVRTC? = try? NVRTC.shared.get()
    static let gpu = GPUAvailability.probe()

    static let nvrtcReason: Comment =
        "needs NVRTC: pip install --target /tmp/nvrtc nvidia-cuda-nvrtc==13.0.88 and set FLASHMOE_NVRTC=/tmp/nvrtc/nvidia/cu13/lib"
    static var gpuReason: Comment { "needs a CUDA GPU: \(gpu.unusableReason ?? "")" }
}

import Testing
