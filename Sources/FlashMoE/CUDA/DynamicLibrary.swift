import CCUDA

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A shared library opened with dlopen. It is never closed: the CUDA driver and NVRTC keep process-wide state
/// (contexts, threads) that must outlive every object that used them.
struct DynamicLibrary: @unchecked Sendable {  // the handle is immutable; dlsym is thread-safe
    /// The path or soname it was opened by.
    let path: String
    private let handle: UnsafeMutableRawPointer

    /// Opens `path` (a file path, or a bare soname searched the dynamic loader's way).
    /// - Parameter global: make its symbols visible to later loads (RTLD_GLOBAL).
    static func open(_ path: String, global: Bool = false) -> Result<DynamicLibrary, LibraryAttempt> {
        if path.contains("/") && !SystemFiles.exists(path) {
            return .failure(LibraryAttempt(place: path, failure: "no such file"))
        }
        guard let handle = dlopen(path, RTLD_NOW | (global ? RTLD_GLOBAL : RTLD_LOCAL)) else {
            return .failure(LibraryAttempt(place: path, failure: lastError()))
        }
        return .success(DynamicLibrary(path: path, handle: handle))
    }

    /// Tries `candidates` in order; returns the first that opens, with every earlier failure.
    static func openFirst(_ candidates: [String]) -> (library: DynamicLibrary?, attempts: [LibraryAttempt]) {
        var attempts: [LibraryAttempt] = []
        for candidate in candidates {
            switch open(candidate) {
            case .success(let library): return (library, attempts)
            case .failure(let attempt): attempts.append(attempt)
            }
        }
        return (nil, attempts)
    }

    /// Opens `candidates` in order and returns the first that `make` accepts (it gets the failures before it);
    /// nil and every failure when none does.
    static func loadFirst<T>(
        _ candidates: [String], _ make: (DynamicLibrary, [LibraryAttempt]) throws(CUDAError) -> T
    ) -> (value: T?, attempts: [LibraryAttempt]) {
        var attempts: [LibraryAttempt] = []
        for candidate in candidates {
            switch open(candidate) {
            case .failure(let attempt):
                attempts.append(attempt)
            case .success(let library):
                do throws(CUDAError) {
                    return (try make(library, attempts), attempts)
                } catch {
                    attempts.append(LibraryAttempt(place: candidate, failure: error.description))
                }
            }
        }
        return (nil, attempts)
    }

    /// The address of `symbol`, or nil.
    func address(of symbol: String) -> UnsafeMutableRawPointer? { dlsym(handle, symbol) }

    /// `symbol` as the C function-pointer type `T`, or `.missingSymbol`.
    func function<T>(_ symbol: String, as type: T.Type, library: String) throws(CUDAError) -> T {
        guard let pointer = address(of: symbol) else {
            throw .missingSymbol(library: library, symbol: symbol)
        }
        return unsafeBitCast(pointer, to: type)
    }

    /// The full path the loader actually mapped (resolves a bare soname), when it can tell.
    var loadedPath: String {
        guard let symbol = firstKnownSymbol, let name = flashmoe_library_path_of_symbol(symbol) else { return path }
        return String(cString: name)
    }

    private var firstKnownSymbol: UnsafeMutableRawPointer? {
        address(of: "cuInit") ?? address(of: "nvrtcVersion")
    }

    private static func lastError() -> String {
        dlerror().map { String(cString: $0) } ?? "dlopen failed"
    }
}
