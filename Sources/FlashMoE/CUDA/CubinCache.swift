/// A directory of compiled kernels, one file per cache key, shared by every FlashMoE process of a user.
///
/// An entry is a 96-byte header followed by the NVRTC log and the cubin:
///
/// | bytes | field |
/// |---|---|
/// | 8 | magic `FMOECUB1` |
/// | 4 | format version (1), little-endian |
/// | 4 | reserved (0) |
/// | 32 | the cache key the entry was written for |
/// | 8 | log length, little-endian |
/// | 8 | cubin length, little-endian |
/// | 32 | SHA-256 of log + cubin |
///
/// A read trusts nothing: a wrong magic, version or key, a size that disagrees with the lengths, or a checksum
/// mismatch makes the entry `.corrupt`, and the compiler recompiles and rewrites it. Writes go to a temporary
/// file renamed into place, so readers never see half an entry and concurrent writers do not interleave.
public struct CubinCache: Sendable {
    /// Where the entries live.
    public let directory: String

    static let magic = Array("FMOECUB1".utf8)
    static let formatVersion: UInt32 = 1
    static let headerSize = 96

    /// A cache in `directory` (created on the first store).
    public init(directory: String) {
        self.directory = directory
    }

    /// `$FLASHMOE_CACHE_DIR`, else `$XDG_CACHE_HOME/flashmoe`, else `$HOME/.cache/flashmoe`; nil when none is set.
    public static func defaultDirectory(environment: [String: String]) -> String? {
        func nonEmpty(_ key: String) -> String? { environment[key].flatMap { $0.isEmpty ? nil : $0 } }
        if let dir = nonEmpty("FLASHMOE_CACHE_DIR") { return dir }
        if let xdg = nonEmpty("XDG_CACHE_HOME") { return "\(xdg)/flashmoe" }
        if let home = nonEmpty("HOME") { return "\(home)/.cache/flashmoe" }
        return nil
    }

    /// What a lookup found.
    public enum Lookup: Sendable, Equatable {
        /// A verified entry.
        case hit(cubin: [UInt8], log: String)
        /// No entry for the key.
        case absent
        /// An entry that failed verification, and why.
        case corrupt(String)
    }

    /// The file that holds the entry for `key`.
    public func path(for key: [UInt8]) -> String { "\(directory)/\(hexString(key)).fmoe" }

    /// Reads and verifies the entry for `key`.
    public func load(key: [UInt8]) -> Lookup {
        let file = path(for: key)
        guard SystemFiles.exists(file) else { return .absent }
        switch SystemFiles.read(file) {
        case .failure(let error): return .corrupt("unreadable: \(error)")
        case .success(let bytes): return Self.decode(bytes, key: key)
        }
    }

    /// Writes the entry for `key`; the error text says why it could not (the compile result is still usable).
    public func store(key: [UInt8], cubin: [UInt8], log: String) -> Result<Void, CacheWriteError> {
        if case .failure(let error) = SystemFiles.createDirectories(directory) {
            return .failure(CacheWriteError(description: error.description))
        }
        return SystemFiles.writeAtomically(Self.encode(key: key, cubin: cubin, log: log), to: path(for: key))
            .mapError { CacheWriteError(description: $0.description) }
    }

    /// The number of entries in the directory (0 when it does not exist).
    public func entryCount() -> Int {
        guard case .success(let names) = SystemFiles.list(directory) else { return 0 }
        return names.filter { $0.hasSuffix(".fmoe") }.count
    }

    static func encode(key: [UInt8], cubin: [UInt8], log: String) -> [UInt8] {
        let logBytes = Array(log.utf8)
        var out = magic
        out += littleEndian(formatVersion) + littleEndian(UInt32(0)) + key
        out += littleEndian(UInt64(logBytes.count)) + littleEndian(UInt64(cubin.count))
        out += SHA256.hash(logBytes + cubin)
        out += logBytes
        out += cubin
        return out
    }

    static func decode(_ bytes: [UInt8], key: [UInt8]) -> Lookup {
        guard bytes.count >= headerSize else { return .corrupt("truncated: \(bytes.count) bytes, no full header") }
        guard Array(bytes[0..<8]) == magic else { return .corrupt("not a FlashMoE cache entry (bad magic)") }
        let version = readLittleEndian(bytes, at: 8, as: UInt32.self)
        guard version == formatVersion else { return .corrupt("entry format \(version), expected \(formatVersion)") }
        guard Array(bytes[16..<48]) == key else { return .corrupt("the entry was written for another key") }
        let logLength = readLittleEndian(bytes, at: 48, as: UInt64.self)
        let cubinLength = readLittleEndian(bytes, at: 56, as: UInt64.self)
        let payload = UInt64(bytes.count - headerSize)
        guard logLength <= payload, cubinLength == payload - logLength, cubinLength > 0 else {
            return .corrupt("size \(bytes.count) bytes disagrees with the header (log \(logLength), cubin \(cubinLength))")
        }
        let body = bytes[headerSize...]
        guard SHA256.hash(body) == Array(bytes[64..<96]) else { return .corrupt("checksum mismatch") }
        let logEnd = headerSize + Int(logLength)
        return .hit(
            cubin: Array(bytes[logEnd...]),
            log: String(decoding: bytes[headerSize..<logEnd], as: UTF8.self))
    }

    private static func littleEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
        withUnsafeBytes(of: value.littleEndian) { Array($0) }
    }

    private static func readLittleEndian<T: FixedWidthInteger>(_ bytes: [UInt8], at offset: Int, as: T.Type) -> T {
        var value: T = 0
        for i in (0..<MemoryLayout<T>.size).reversed() { value = value << 8 | T(bytes[offset + i]) }
        return value
    }
}

/// Why a cache entry could not be written.
public struct CacheWriteError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Why the write failed: the text of the file-system error.
    public let description: String
}
