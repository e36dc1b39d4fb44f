import CKernels

/// The CUDA C++ kernel files: the copies embedded in the binary (`Sources/CKernels/kernels`, via `#embed`), or a
/// folder named by `FLASHMOE_KERNEL_DIR`, so an edited kernel can be tried on a GPU host without rebuilding Swift.
public struct KernelSources: Sendable, Hashable, CustomStringConvertible {
    /// The environment variable that points at a kernel folder.
    public static let overrideVariable = "FLASHMOE_KERNEL_DIR"

    /// Where the files come from.
    public enum Origin: Sendable, Hashable {
        /// Compiled into the binary.
        case embedded
        /// Read from this folder on every call.
        case directory(String)
    }

    /// Where the files come from.
    public let origin: Origin

    /// The files embedded in the binary.
    public static let embedded = KernelSources(origin: .embedded)

    /// Files read from `path` (every `*.cu` and `*.cuh` in it).
    public static func directory(_ path: String) -> KernelSources { KernelSources(origin: .directory(path)) }

    /// `FLASHMOE_KERNEL_DIR` when set, otherwise the embedded files.
    public static func current(environment: [String: String] = ProcessEnvironment.current()) -> KernelSources {
        if let dir = environment[overrideVariable], !dir.isEmpty { return .directory(dir) }
        return .embedded
    }

    /// Where the files come from: "embedded in the binary" or `FLASHMOE_KERNEL_DIR=path`.
    public var description: String {
        switch origin {
        case .embedded: "embedded in the binary"
        case .directory(let path): "\(Self.overrideVariable)=\(path)"
        }
    }

    /// The names of all kernel files, sorted.
    public func fileNames() throws(CUDAError) -> [String] {
        switch origin {
        case .embedded:
            return (0..<flashmoe_kernel_file_count()).compactMap { i in
                flashmoe_kernel_file_name(i).map { String(cString: $0) }
            }.sorted()
        case .directory(let path):
            switch SystemFiles.list(path) {
            case .success(let names): return names.filter { $0.hasSuffix(".cu") || $0.hasSuffix(".cuh") }
            case .failure(let error):
                throw .invalidArgument("cannot read kernel sources: \(error) (check \(Self.overrideVariable))")
            }
        }
    }

    /// The text of kernel file `name` (e.g. "selftest.cu").
    public func text(of name: String) throws(CUDAError) -> String {
        switch origin {
        case .embedded:
            var length = 0
            guard let pointer = flashmoe_kernel_source(name, &length) else {
                throw .invalidArgument(
                    "no kernel file '\(name)' is embedded; the binary has: \(((try? fileNames()) ?? []).joined(separator: ", "))")
            }
            return String(decoding: UnsafeRawBufferPointer(start: pointer, count: length), as: UTF8.self)
        case .directory(let path):
            guard !name.contains("/") else { throw .invalidArgument("kernel file names have no '/': \(name)") }
            switch SystemFiles.read("\(path)/\(name)") {
            case .success(let bytes): return String(decoding: bytes, as: UTF8.self)
            case .failure(let error): throw .invalidArgument("cannot read kernel file: \(error)")
            }
        }
    }

    /// Kernel file `file`'s text and the headers it may include: every `.cuh` file, name → text (what NVRTC gets).
    /// The other `.cu` files are left out: no kernel file includes another, so a cubin's cache key
    /// (`CompileRequest.cacheKey`) changes with its own file and the headers, not with an unrelated kernel's.
    public func program(_ file: String) throws(CUDAError) -> (source: String, headers: [String: String]) {
        let files = try allFiles()
        guard let source = files[file] else {
            throw .invalidArgument("kernel file '\(file)' is not among the kernel sources (\(self))")
        }
        return (source, files.filter { $0.key.hasSuffix(".cuh") })
    }

    /// Every file, name → text.
    public func allFiles() throws(CUDAError) -> [String: String] {
        var files: [String: String] = [:]
        for name in try fileNames() { files[name] = try text(of: name) }
        return files
    }
}
