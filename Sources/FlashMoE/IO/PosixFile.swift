#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A failed file-system call: the path, the operation and the system's reason.
struct FileFailure: Error, Sendable, CustomStringConvertible {
    let path: String
    let operation: String
    let reason: String

    init(_ path: String, _ operation: String, errno code: Int32) {
        self.path = path
        self.operation = operation
        self.reason = String(cString: strerror(code))
    }

    init(_ path: String, _ operation: String, reason: String) {
        self.path = path
        self.operation = operation
        self.reason = reason
    }

    var description: String { "cannot \(operation) '\(path)': \(reason)" }
}

/// A read-only file read by absolute offsets (`pread`), so multi-GB shards are never loaded whole.
final class ReadOnlyFile {
    let path: String
    /// The file's size in bytes when it was opened.
    let size: Int
    private let fd: Int32

    init(path: String) throws(FileFailure) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FileFailure(path, "open", errno: errno) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let code = errno
            close(fd)
            throw FileFailure(path, "stat", errno: code)
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            close(fd)
            throw FileFailure(path, "read", reason: "not a regular file")
        }
        self.path = path
        self.fd = fd
        self.size = Int(st.st_size)
    }

    deinit { close(fd) }

    /// Reads exactly `count` bytes at `offset`; throws if the file ends first.
    func read(offset: Int, count: Int) throws(FileFailure) -> [UInt8] {
        // The buffer is sized by the caller (often from a header): never allocate more than the file holds.
        guard offset >= 0, offset <= size, ReadAllocation.allows(.bytes, requested: count, available: size - offset)
        else {
            throw FileFailure(path, "read", reason: "\(count) bytes at offset \(offset) lie past the end (\(size) bytes)")
        }
        var buffer = [UInt8](repeating: 0, count: count)
        var done = 0
        var failure: FileFailure?
        buffer.withUnsafeMutableBytes { raw in
            guard let base = raw.baseAddress else { return }
            while done < count {
                let n = pread(fd, base + done, count - done, off_t(offset + done))
                if n > 0 {
                    done += n
                } else if n == 0 {
                    failure = FileFailure(path, "read", reason: "the file ended after \(offset + done) bytes")
                    return
                } else if errno != EINTR {
                    failure = FileFailure(path, "read", errno: errno)
                    return
                }
            }
        }
        if let failure { throw failure }
        return buffer
    }
}

/// Small whole-file helpers for JSON files and the writer.
enum FileSystem {
    /// Whether `path` names an existing regular file.
    static func isFile(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
    }

    /// Whether `path` names an existing directory.
    static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// Reads a whole file of at most `limit` bytes.
    static func readFile(_ path: String, limit: Int) throws(FileFailure) -> [UInt8] {
        let file = try ReadOnlyFile(path: path)
        guard file.size <= limit else {
            throw FileFailure(path, "read", reason: "the file has \(file.size) bytes, more than the limit of \(limit)")
        }
        return try file.read(offset: 0, count: file.size)
    }

    /// Creates `path` as a directory unless it already is one (the parent must exist).
    static func makeDirectory(_ path: String) throws(FileFailure) {
        if isDirectory(path) { return }
        guard mkdir(path, 0o755) == 0 else { throw FileFailure(path, "create directory", errno: errno) }
    }

    /// Writes `chunks` one after another to a temporary file beside `path`, then renames it over `path`, so a
    /// reader never sees a half-written file.
    static func writeFile(_ path: String, chunks: [[UInt8]]) throws(FileFailure) {
        let temporary = path + ".partial"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw FileFailure(temporary, "create", errno: errno) }
        var failure: FileFailure?
        outer: for chunk in chunks {
            var done = 0
            while done < chunk.count {
                let n = chunk.withUnsafeBytes { raw in write(fd, raw.baseAddress! + done, chunk.count - done) }
                if n >= 0 {
                    done += n
                } else if errno != EINTR {
                    failure = FileFailure(temporary, "write", errno: errno)
                    break outer
                }
            }
        }
        if close(fd) != 0, failure == nil { failure = FileFailure(temporary, "close", errno: errno) }
        if failure == nil, rename(temporary, path) != 0 { failure = FileFailure(path, "rename onto", errno: errno) }
        if let failure {
            unlink(temporary)
            throw failure
        }
    }
}
