#if canImport(Glibc)
import Glibc
#endif

/// A rendezvous store in a directory every rank can reach (a local or shared file system): one file per key,
/// written whole before it appears (a temporary file, then `link(2)` for an exclusive set or `rename(2)`), so a
/// reader never sees half a value. Use an empty directory per run; the ranks remove their keys as they go.
public final class RendezvousDirectoryStore: RendezvousStore, @unchecked Sendable {
    // @unchecked: only the immutable path.

    /// The directory.
    public let path: String
    /// `dir:PATH`.
    public var location: String { "dir:\(path)" }

    /// Uses (and creates, if needed) the directory at `path`.
    public init(path: String) throws(RendezvousError) {
        guard !path.isEmpty else { throw RendezvousError(.badAddress, "dir: needs a directory path, e.g. dir:/tmp/run1") }
        if case .failure(let e) = SystemFiles.createDirectories(path) {
            throw RendezvousError(.unreachable, "the rendezvous directory \(path) cannot be used: \(e)")
        }
        self.path = path
    }

    /// Keys hold `/`; files are flat: `/` becomes `.` and a key never starts with `.` (no clash with temporaries,
    /// which end in `.tmp` and start with the target's name).
    private func file(_ key: String) -> String { "\(path)/k.\(key.replacing("/", with: "."))" }

    /// Writes the key's file atomically; with `exclusive`, through a temporary hard-linked into place, so the result
    /// is false when the file already exists.
    public func set(_ key: String, _ value: [UInt8], exclusive: Bool) throws(RendezvousError) -> Bool {
        let target = file(key)
        guard exclusive else {
            if case .failure(let e) = SystemFiles.writeAtomically(value, to: target) {
                throw RendezvousError(.unreachable, "rendezvous store \(location): \(e)")
            }
            return true
        }
        let temporary = "\(target).\(getpid()).\(UInt32.random(in: 0...UInt32.max)).tmp"
        if case .failure(let e) = SystemFiles.writeAtomically(value, to: temporary) {
            throw RendezvousError(.unreachable, "rendezvous store \(location): \(e)")
        }
        defer { unlink(temporary) }
        if link(temporary, target) == 0 { return true }
        if errno == EEXIST { return false }
        throw RendezvousError(.unreachable, "rendezvous store \(location): cannot create \(target): \(SystemFiles.errnoText())")
    }

    /// The bytes of the key's file, or nil when there is no such file.
    public func get(_ key: String) throws(RendezvousError) -> [UInt8]? {
        let target = file(key)
        switch SystemFiles.read(target) {
        case .success(let bytes): return bytes
        case .failure(let e):
            if errno == ENOENT || !SystemFiles.exists(target) { return nil }
            throw RendezvousError(.unreachable, "rendezvous store \(location): \(e)")
        }
    }

    /// Removes the key's file (a missing file is fine).
    public func delete(_ key: String) throws(RendezvousError) {
        if unlink(file(key)) != 0 && errno != ENOENT {
            throw RendezvousError(.unreachable, "rendezvous store \(location): cannot remove \(key): \(SystemFiles.errnoText())")
        }
    }

    /// Does nothing: the store holds no open files or connections.
    public func close() {}
}
