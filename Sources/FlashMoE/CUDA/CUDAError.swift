/// One place that was searched for a shared library, and why it could not be used.
public struct LibraryAttempt: Error, Sendable, Hashable, CustomStringConvertible {
    /// A path, a glob pattern, or a bare soname handed to the dynamic loader.
    public let place: String
    /// Why it failed: "no such file", the loader's message, or a missing symbol.
    public let failure: String

    /// Records that `place` was tried and why it could not be used.
    public init(place: String, failure: String) {
        self.place = place
        self.failure = failure
    }

    /// `place: failure`.
    public var description: String { "\(place): \(failure)" }
}

/// Everything that can go wrong between FlashMoE and the GPU: loading the driver or NVRTC, a driver call,
/// compiling a kernel, or a wrong argument to a CUDA wrapper. The text always says what failed and what to do.
public enum CUDAError: Error, Sendable, Hashable, CustomStringConvertible {
    /// A shared library (`libcuda.so.1`, NVRTC) was found nowhere; `attempts` lists each place tried and why,
    /// `hint` what to do.
    case libraryNotFound(library: String, attempts: [LibraryAttempt], hint: String)
    /// A library loaded but lacks an entry point FlashMoE needs (it is too old).
    case missingSymbol(library: String, symbol: String)
    /// A driver call failed with `code` (`name` and `text` come from cuGetErrorName / cuGetErrorString).
    case driver(call: String, code: UInt32, name: String, text: String, hint: String?)
    /// The driver works but there is no usable GPU.
    case noDevice(detail: String)
    /// The driver cannot run what it was given (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`, `NO_BINARY_FOR_GPU`,
    /// `INSUFFICIENT_DRIVER`): the kernel image is newer than the driver or built for another GPU.
    case driverTooOld(call: String, name: String, driverVersion: Int?, detail: String)
    /// A device allocation of `requestedBytes` failed; `freeBytes` is what the device reported free, if known.
    case outOfMemory(call: String, requestedBytes: Int, freeBytes: Int?)
    /// NVRTC rejected the source; `log` is NVRTC's complete log.
    case compileFailed(program: String, arch: String, log: String)
    /// Any other NVRTC failure (bad option, missing builtins library, ...), with the log when there is one.
    case nvrtc(call: String, code: UInt32, name: String, log: String, hint: String?)
    /// A wrong argument to a CUDA wrapper (a size, an offset, a name); the text says what to change.
    case invalidArgument(String)

    /// What failed and what to do; several lines for a missing library (one per place tried) or a compile log.
    public var description: String {
        switch self {
        case .libraryNotFound(let library, let attempts, let hint):
            let tried = attempts.map { "  \($0)" }.joined(separator: "\n")
            return "\(library) not found: \(hint); tried:\n\(tried)"
        case .missingSymbol(let library, let symbol):
            return "\(library) has no \(symbol): the library is older than FlashMoE needs (CUDA 12.0 or newer)"
        case .driver(let call, let code, let name, let text, let hint):
            return "\(call) failed: \(name) (\(code)): \(text)" + (hint.map { ". \($0)" } ?? "")
        case .noDevice(let detail):
            return "no CUDA device: \(detail)"
        case .driverTooOld(let call, let name, let driverVersion, let detail):
            let version = driverVersion.map { " (the driver supports CUDA \(CUDAVersion($0)))" } ?? ""
            return "driver too old: \(call) failed with \(name)\(version): \(detail)"
        case .outOfMemory(let call, let requested, let free):
            let freeText = free.map { ", \(formatByteCount($0)) free" } ?? ""
            return "out of device memory: \(call) could not allocate \(formatByteCount(requested))\(freeText); "
                + "use fewer tokens or a smaller model, or free GPU memory held by other processes"
        case .compileFailed(let program, let arch, let log):
            return "NVRTC compile failed for \(program) (\(arch)):\n\(log)"
        case .nvrtc(let call, let code, let name, let log, let hint):
            var s = "\(call) failed: \(name) (\(code))"
            if let hint { s += ". \(hint)" }
            if !log.isEmpty { s += "\n\(log)" }
            return s
        case .invalidArgument(let message):
            return message
        }
    }
}

/// A CUDA version number as the driver reports it (`12040` → "12.4").
public struct CUDAVersion: Sendable, Hashable, Comparable, CustomStringConvertible {
    /// The encoded number: 1000 × major + 10 × minor.
    public let encoded: Int

    /// The version the driver encodes as `encoded`, e.g. 12040 for 12.4.
    public init(_ encoded: Int) { self.encoded = encoded }

    /// The major version.
    public var major: Int { encoded / 1000 }
    /// The minor version.
    public var minor: Int { (encoded % 1000) / 10 }

    /// `major.minor`, as CUDA prints it.
    public var description: String { "\(major).\(minor)" }

    /// Orders versions by their encoded number.
    public static func < (a: CUDAVersion, b: CUDAVersion) -> Bool { a.encoded < b.encoded }
}
