/// Reading and writing whole safetensors files and byte buffers.
///
/// Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data section. Tensors are
/// written in descending element size, then by name (so every tensor's bytes are aligned to its element size),
/// and the header is padded with spaces to a multiple of 8 bytes, as the reference implementation does.
public enum Safetensors {
    /// The largest header accepted (the reference implementation's limit).
    public static let maximumHeaderLength = 100_000_000

    /// Checks the 8-byte length prefix of a file of `fileSize` bytes and returns the header length.
    static func headerLength(prefix: [UInt8], fileSize: Int, source: String) throws(SafetensorsError) -> Int {
        guard fileSize >= 8, prefix.count >= 8 else {
            throw SafetensorsError(
                .truncatedFile, "\(source) has \(fileSize) bytes, fewer than the 8-byte header length: it is not safetensors")
        }
        var n: UInt64 = 0
        for i in (0..<8).reversed() { n = n << 8 | UInt64(prefix[i]) }
        guard n <= UInt64(maximumHeaderLength) else {
            throw SafetensorsError(
                .headerTooLarge,
                "\(source) declares a header of \(n) bytes, more than the limit of \(maximumHeaderLength): the file is corrupt or not safetensors")
        }
        guard n <= UInt64(fileSize - 8) else {
            throw SafetensorsError(
                .truncatedHeader,
                "\(source) declares a header of \(n) bytes but only \(fileSize - 8) follow the length: the file is truncated")
        }
        return Int(n)
    }

    /// Decodes a complete safetensors file held in memory.
    public static func decode(_ bytes: [UInt8]) throws(SafetensorsError) -> [String: SafetensorsTensor] {
        let n = try headerLength(prefix: Array(bytes.prefix(8)), fileSize: bytes.count, source: "the buffer")
        let header = try SafetensorsHeader.parse(Array(bytes[8..<(8 + n)]), dataSize: bytes.count - 8 - n)
        var out: [String: SafetensorsTensor] = [:]
        for t in header.tensors {
            let start = 8 + n + t.dataOffsets.lowerBound
            // The header was validated against the buffer's size; the guard restates it where the copy is made.
            guard ReadAllocation.allows(.bytes, requested: t.dataOffsets.count, available: bytes.count - start) else {
                throw SafetensorsError(
                    .invalidOffsets, "tensor '\(t.name)' \(t.dataOffsets) lies past the buffer's end")
            }
            out[t.name] = try SafetensorsTensor(
                dtype: t.dtype, shape: t.shape, data: Array(bytes[start..<(start + t.dataOffsets.count)]))
        }
        return out
    }

    /// Encodes tensors (and optional string metadata) as a complete safetensors file.
    public static func encode(_ tensors: [String: SafetensorsTensor], metadata: [String: String] = [:]) -> [UInt8] {
        let (header, order) = layout(tensors, metadata: metadata)
        var out = lengthPrefix(header.count)
        out.append(contentsOf: header)
        for name in order { out.append(contentsOf: tensors[name]?.data ?? []) }
        return out
    }

    /// Writes tensors (and optional string metadata) to `path`, replacing it atomically.
    public static func write(_ tensors: [String: SafetensorsTensor], metadata: [String: String] = [:], to path: String)
        throws(SafetensorsError)
    {
        let (header, order) = layout(tensors, metadata: metadata)
        let chunks = [lengthPrefix(header.count), header] + order.map { tensors[$0]?.data ?? [] }
        do {
            try FileSystem.writeFile(path, chunks: chunks)
        } catch {
            throw SafetensorsError(error)
        }
    }

    /// Reads every tensor of the file at `path`.
    public static func read(path: String) throws(SafetensorsError) -> [String: SafetensorsTensor] {
        let file = try SafetensorsFile(path: path)
        var out: [String: SafetensorsTensor] = [:]
        for name in file.header.names { out[name] = try file.tensor(named: name) }
        return out
    }

    private static func lengthPrefix(_ n: Int) -> [UInt8] {
        (0..<8).map { UInt8(truncatingIfNeeded: UInt64(n) >> (8 * UInt64($0))) }
    }

    /// The header bytes and the order of the tensors' data.
    private static func layout(_ tensors: [String: SafetensorsTensor], metadata: [String: String])
        -> (header: [UInt8], order: [String])
    {
        let order = tensors.keys.sorted { a, b in
            let (sa, sb) = (tensors[a]?.dtype.byteSize ?? 0, tensors[b]?.dtype.byteSize ?? 0)
            return sa != sb ? sa > sb : a < b
        }
        var offset = 0
        var entries: [(name: String, dtype: SafetensorsDType, shape: [Int], range: Range<Int>)] = []
        for name in order {
            guard let t = tensors[name] else { continue }
            entries.append((name, t.dtype, t.shape, offset..<(offset + t.data.count)))
            offset += t.data.count
        }
        return (SafetensorsHeader.encode(entries, metadata: metadata), order)
    }
}

/// An open safetensors file: the validated header is read at once, each tensor's bytes only when asked for,
/// so a multi-GB shard costs one `pread` per tensor used.
public final class SafetensorsFile {
    /// The file's path.
    public let path: String
    /// The validated header.
    public let header: SafetensorsHeader
    private let file: ReadOnlyFile
    private let dataStart: Int

    /// Opens `path` and validates its header against the file's size.
    public init(path: String) throws(SafetensorsError) {
        do {
            file = try ReadOnlyFile(path: path)
            let n = try Safetensors.headerLength(
                prefix: try file.read(offset: 0, count: min(8, file.size)), fileSize: file.size, source: "'\(path)'")
            let json = try file.read(offset: 8, count: n)
            do {
                header = try SafetensorsHeader.parse(json, dataSize: file.size - 8 - n)
            } catch {
                throw SafetensorsError(error.kind, "'\(path)': \(error.message)")
            }
            dataStart = 8 + n
            self.path = path
        } catch let error as FileFailure {
            throw SafetensorsError(error)
        } catch let error as SafetensorsError {
            throw error
        } catch {
            throw SafetensorsError(.io, "'\(path)': \(error)")
        }
    }

    /// Reads the tensor named `name`.
    public func tensor(named name: String) throws(SafetensorsError) -> SafetensorsTensor {
        guard let info = header.info(named: name) else {
            throw SafetensorsError(.tensorNotFound, "'\(path)' has no tensor named '\(name)'")
        }
        let bytes: [UInt8]
        do {
            bytes = try file.read(offset: dataStart + info.dataOffsets.lowerBound, count: info.dataOffsets.count)
        } catch {
            throw SafetensorsError(error)
        }
        return try SafetensorsTensor(dtype: info.dtype, shape: info.shape, data: bytes)
    }
}
