#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The process environment as a dictionary. CUDA code takes environments as parameters (defaulting to this) so
/// tests can describe a machine without changing the real environment.
public enum ProcessEnvironment {
    /// The current environment variables.
    public static func current() -> [String: String] {
        var result: [String: String] = [:]
        var entry = environ
        while let pointer = entry.pointee {
            let pair = String(cString: pointer)
            if let eq = pair.firstIndex(of: "=") {
                result[String(pair[..<eq])] = String(pair[pair.index(after: eq)...])
            }
            entry += 1
        }
        return result
    }
}

/// Small POSIX file helpers: whole-file reads, atomic writes, directory creation, listing and glob.
/// Errors are returned as text (with errno's message) because every caller reports or records them.
enum SystemFiles {
    /// The message for the current errno.
    static func errnoText() -> String { String(cString: strerror(errno)) }

    /// Whether something exists at `path`.
    static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    /// Whether `path` is a directory.
    static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
    }

    /// The size of the file at `path`, or nil.
    static func fileSize(_ path: String) -> Int? {
        var info = stat()
        return stat(path, &info) == 0 ? Int(info.st_size) : nil
    }

    /// The whole file, or the reason it could not be read.
    static func read(_ path: String) -> Result<[UInt8], FileError> {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return .failure(FileError("cannot open \(path): \(errnoText())")) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                return .failure(FileError("cannot read \(path): \(errnoText())"))
            }
            if n == 0 { return .success(bytes) }
            bytes.append(contentsOf: chunk[0..<n])
        }
    }

    /// Writes `bytes` to `path` atomically: into a unique temporary file in the same directory, then rename(2),
    /// so a reader sees either the old file or the complete new one, and concurrent writers never interleave.
    static func writeAtomically(_ bytes: [UInt8], to path: String) -> Result<Void, FileError> {
        let temporary = "\(path).\(getpid()).\(UInt32.random(in: 0...UInt32.max)).tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return .failure(FileError("cannot create \(temporary): \(errnoText())")) }
        var written = 0
        while written < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + written, $0.count - written) }
            if n < 0 {
                if errno == EINTR { continue }
                let message = "cannot write \(temporary): \(errnoText())"
                close(fd)
                unlink(temporary)
                return .failure(FileError(message))
            }
            written += n
        }
        close(fd)
        guard rename(temporary, path) == 0 else {
            let message = "cannot rename \(temporary) to \(path): \(errnoText())"
            unlink(temporary)
            return .failure(FileError(message))
        }
        return .success(())
    }

    /// Creates `path` and its missing parents (like `mkdir -p`).
    static func createDirectories(_ path: String) -> Result<Void, FileError> {
        if isDirectory(path) { return .success(()) }
        var prefix = path.hasPrefix("/") ? "/" : ""
        for component in path.split(separator: "/") {
            prefix += component + "/"
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST {
                return .failure(FileError("cannot create directory \(prefix): \(errnoText())"))
            }
        }
        return isDirectory(path) ? .success(()) : .failure(FileError("\(path) exists and is not a directory"))
    }

    /// The names in directory `path` (not "." or ".."), sorted.
    static func list(_ path: String) -> Result<[String], FileError> {
        guard let dir = opendir(path) else {
            return .failure(FileError("cannot list \(path): \(errnoText())"))
        }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return .success(names.sorted())
    }

    /// The paths matching a shell glob `pattern`, sorted; empty when none match.
    static func glob(_ pattern: String) -> [String] {
        var result = glob_t()
        defer { globfree(&result) }
        guard Glibc.glob(pattern, 0, nil, &result) == 0 else { return [] }
        return (0..<Int(result.gl_pathc)).compactMap { i in
            result.gl_pathv[i].map { String(cString: $0) }
        }
    }

    /// Removes a directory and the plain files in it (the cache tests and the self-test's scratch cache).
    static func removeDirectory(_ path: String) {
        if case .success(let names) = list(path) {
            for name in names { unlink("\(path)/\(name)") }
        }
        rmdir(path)
    }

    /// A new, empty, private directory under /tmp (or `$TMPDIR`).
    static func makeTemporaryDirectory(prefix: String) -> Result<String, FileError> {
        let base = ProcessEnvironment.current()["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        var template = Array("\(base)/\(prefix).XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            return .failure(FileError("cannot create a temporary directory in \(base): \(errnoText())"))
        }
        return .success(String(cString: made))
    }
}

/// A file operation's failure, with the path and errno's message.
struct FileError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
