/// Whether a CUDA GPU is usable in this process, and if not, exactly why: what `--backend auto` consults before
/// falling back to the CPU, and what `flashmoe info` prints.
public struct GPUAvailability: Sendable {
    /// The loaded driver and the CUDA version it supports, or why it could not be loaded and initialized.
    public let driver: Result<(driver: CUDADriver, version: CUDAVersion), CUDAError>
    /// Every GPU the driver sees, or why they could not be listed.
    public let devices: Result<[CUDADeviceProperties], CUDAError>
    /// The loaded NVRTC, or every place tried.
    public let nvrtc: Result<NVRTC, CUDAError>

    /// Probes the process-wide driver and NVRTC (`CUDADriver.shared`, `NVRTC.shared`).
    public static func probe() -> GPUAvailability {
        probe(driver: CUDADriver.shared, nvrtc: NVRTC.shared)
    }

    /// Probes a given driver and NVRTC load result.
    public static func probe(driver: Result<CUDADriver, CUDAError>, nvrtc: Result<NVRTC, CUDAError>)
        -> GPUAvailability
    {
        let loaded = driver.flatMap { d -> Result<(driver: CUDADriver, version: CUDAVersion), CUDAError> in
            var version: Int32 = 0
            return Result { () throws(CUDAError) in
                try d.check(d.driverGetVersion(&version), "cuDriverGetVersion")
                return (d, CUDAVersion(Int(version)))
            }
        }
        let devices = loaded.flatMap { loaded in
            Result { () throws(CUDAError) in
                try (0..<CUDADevice.count(driver: loaded.driver)).map { i throws(CUDAError) in
                    try CUDADeviceProperties.query(ordinal: i, driver: loaded.driver)
                }
            }
        }
        return GPUAvailability(driver: loaded, devices: devices, nvrtc: nvrtc)
    }

    /// True when there is a driver, at least one GPU and NVRTC.
    public var isUsable: Bool { unusableReason == nil }

    /// One line saying why the GPU cannot be used (nil when it can), e.g. for "falling back to CPU: …".
    public var unusableReason: String? {
        switch (driver, devices, nvrtc) {
        case (.failure(let error), _, _):
            if case .libraryNotFound = error { return "no CUDA driver (libcuda.so.1 not found)" }
            return "the CUDA driver failed: \(firstLine(error))"
        case (_, .failure(let error), _):
            return firstLine(error)
        case (_, .success(let list), _) where list.isEmpty:
            return "the CUDA driver sees no GPU"
        case (_, _, .failure(let error)):
            if case .libraryNotFound(_, let attempts, _) = error {
                return "NVRTC not found (\(attempts.count) places tried; `flashmoe info` lists them)"
            }
            return "NVRTC unusable: \(firstLine(error))"
        default:
            return nil
        }
    }

    private func firstLine(_ error: CUDAError) -> String {
        String(error.description.split(separator: "\n").first ?? "")
    }
}
