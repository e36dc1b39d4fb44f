/// Where one tensor lives in a safetensors file, as its header entry says.
public struct SafetensorsTensorInfo: Sendable, Hashable {
    /// The tensor's name.
    public let name: String
    /// The element type.
    public let dtype: SafetensorsDType
    /// The shape, outermost first.
    public let shape: [Int]
    /// The byte range relative to the start of the data section (after the header).
    public let dataOffsets: Range<Int>
}

/// A validated safetensors header: the tensor entries (in header order) and the optional `__metadata__` map.
///
/// Validation rejects, each with its own `SafetensorsError.Kind`: JSON that is not an object, a `__metadata__`
/// that is not a map of strings, entries without exactly `dtype`, `shape` and `data_offsets`, unknown dtypes,
/// shapes that are not lists of non-negative integers or whose byte size overflows, offsets with begin > end or
/// end past the data section, spans that are not shape × element size, overlapping spans and duplicate names.
/// Gaps between tensors are allowed (the bytes are simply never read).
public struct SafetensorsHeader: Sendable, Equatable {
    /// The tensor entries in the order the header lists them.
    public let tensors: [SafetensorsTensorInfo]
    /// The `__metadata__` map (empty when absent).
    public let metadata: [String: String]
    private let byName: [String: Int]

    /// The entry named `name`, if any.
    public func info(named name: String) -> SafetensorsTensorInfo? {
        byName[name].map { tensors[$0] }
    }

    /// Every tensor name, in header order.
    public var names: [String] { tensors.map(\.name) }

    /// Parses and validates header JSON for a data section of `dataSize` bytes.
    static func parse(_ json: [UInt8], dataSize: Int) throws(SafetensorsError) -> SafetensorsHeader {
        let object: JSONObject
        do {
            object = try JSONParser.parseObject(json)
        } catch {
            switch error {
            case .invalid(let e): throw SafetensorsError(.invalidJSON, "the header is not valid JSON: \(e)")
            case .notObject(let kind): throw SafetensorsError(.invalidHeader, "the header must be a JSON object, found \(kind)")
            case .duplicateKey(let k): throw SafetensorsError(.duplicateName, "the header names '\(k)' more than once")
            }
        }
        var tensors: [SafetensorsTensorInfo] = []
        var metadata: [String: String] = [:]
        for member in object.members {
            if member.key == "__metadata__" {
                metadata = try parseMetadata(member.value)
            } else {
                tensors.append(try parseEntry(name: member.key, member.value, dataSize: dataSize))
            }
        }
        try checkOverlaps(tensors)
        var byName: [String: Int] = [:]
        for (i, t) in tensors.enumerated() { byName[t.name] = i }
        return SafetensorsHeader(tensors: tensors, metadata: metadata, byName: byName)
    }

    private static func parseMetadata(_ value: JSONValue) throws(SafetensorsError) -> [String: String] {
        guard case .object(let o) = value else {
            throw SafetensorsError(.invalidHeader, "__metadata__ must be an object of strings, found \(value.kindDescription)")
        }
        var out: [String: String] = [:]
        for m in o.members {
            guard case .string(let s) = m.value else {
                throw SafetensorsError(
                    .invalidHeader, "__metadata__['\(m.key)'] must be a string, found \(m.value.kindDescription)")
            }
            out[m.key] = s
        }
        return out
    }

    private static func parseEntry(name: String, _ value: JSONValue, dataSize: Int) throws(SafetensorsError)
        -> SafetensorsTensorInfo
    {
        func bad(_ kind: SafetensorsError.Kind, _ why: String) -> SafetensorsError {
            SafetensorsError(kind, "tensor '\(name)': \(why)")
        }
        guard case .object(let o) = value else {
            throw bad(.invalidEntry, "the entry must be an object, found \(value.kindDescription)")
        }
        for m in o.members where !["dtype", "shape", "data_offsets"].contains(m.key) {
            throw bad(.invalidEntry, "unexpected field '\(m.key)' (an entry has dtype, shape and data_offsets)")
        }
        if let dup = o.firstDuplicateKey { throw bad(.invalidEntry, "field '\(dup)' appears twice") }

        guard case .string(let dtypeName)? = o["dtype"] else {
            throw bad(.invalidEntry, "'dtype' must be a string")
        }
        guard let dtype = SafetensorsDType(rawValue: dtypeName) else {
            let known = SafetensorsDType.allCases.map(\.rawValue).joined(separator: ", ")
            throw bad(.unknownDType, "unknown dtype '\(dtypeName)' (known: \(known))")
        }

        guard case .array(let dims)? = o["shape"] else {
            throw bad(.invalidEntry, "'shape' must be an array of integers")
        }
        var shape: [Int] = []
        for d in dims {
            guard case .number(let n) = d, n.isIntegerLiteral else {
                throw bad(.invalidShape, "shape entries must be integers, found \(d.kindDescription)")
            }
            guard let v = n.integer else { throw bad(.invalidShape, "dimension \(n) does not fit in 64 bits") }
            guard v >= 0 else { throw bad(.invalidShape, "dimension \(v) is negative") }
            shape.append(v)
        }
        let bytes = try SafetensorsTensor.byteCount(dtype: dtype, shape: shape, name: "tensor '\(name)'")

        guard case .array(let offs)? = o["data_offsets"], offs.count == 2 else {
            throw bad(.invalidEntry, "'data_offsets' must be an array of two integers [begin, end]")
        }
        var bounds: [Int] = []
        for v in offs {
            guard case .number(let n) = v, let i = n.integer, i >= 0 else {
                throw bad(.invalidOffsets, "data_offsets must be non-negative integers, found \(v.serialized)")
            }
            bounds.append(i)
        }
        let (begin, end) = (bounds[0], bounds[1])
        guard begin <= end else { throw bad(.invalidOffsets, "data_offsets [\(begin), \(end)] begin after they end") }
        guard end <= dataSize else {
            throw bad(
                .invalidOffsets,
                "data_offsets [\(begin), \(end)] run past the data section of \(dataSize) bytes (truncated file?)")
        }
        guard end - begin == bytes else {
            throw bad(
                .sizeMismatch,
                "shape \(shape) of \(dtype) needs \(bytes) bytes but data_offsets [\(begin), \(end)] span \(end - begin)")
        }
        return SafetensorsTensorInfo(name: name, dtype: dtype, shape: shape, dataOffsets: begin..<end)
    }

    /// Rejects two non-empty spans that share a byte.
    private static func checkOverlaps(_ tensors: [SafetensorsTensorInfo]) throws(SafetensorsError) {
        let spans = tensors.filter { !$0.dataOffsets.isEmpty }.sorted {
            ($0.dataOffsets.lowerBound, $0.dataOffsets.upperBound) < ($1.dataOffsets.lowerBound, $1.dataOffsets.upperBound)
        }
        for (a, b) in zip(spans, spans.dropFirst()) where b.dataOffsets.lowerBound < a.dataOffsets.upperBound {
            throw SafetensorsError(
                .overlap,
                "tensors '\(a.name)' \(a.dataOffsets) and '\(b.name)' \(b.dataOffsets) overlap: every tensor needs its own bytes")
        }
    }
}

extension SafetensorsHeader {
    /// The header JSON for `entries` laid out back to back in the given order, padded with spaces so that the
    /// data section starts at a multiple of 8 bytes (as the reference implementation does).
    static func encode(_ entries: [(name: String, dtype: SafetensorsDType, shape: [Int], range: Range<Int>)],
                       metadata: [String: String]) -> [UInt8]
    {
        var members: [(String, JSONValue)] = []
        if !metadata.isEmpty {
            members.append(("__metadata__", .object(metadata.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value)) })))
        }
        for e in entries {
            members.append(
                (e.name,
                 .object([
                    ("dtype", .string(e.dtype.rawValue)),
                    ("shape", .array(e.shape.map { .int($0) })),
                    ("data_offsets", .array([.int(e.range.lowerBound), .int(e.range.upperBound)])),
                 ])))
        }
        var bytes = Array(JSONValue.object(members).serialized.utf8)
        let padding = (8 - bytes.count % 8) % 8
        bytes.append(contentsOf: repeatElement(UInt8(ascii: " "), count: padding))
        return bytes
    }
}
