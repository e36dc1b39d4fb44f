/// A small record of named text fields, as the ranks post them to the rendezvous store: one `name=value` line per
/// field, sorted, so equal records have equal bytes. Values must not contain newlines (the encoder replaces them).
public struct RendezvousRecord: Sendable, Hashable {
    /// The fields.
    public var fields: [String: String]

    /// A record of `fields`.
    public init(_ fields: [String: String] = [:]) { self.fields = fields }

    /// The value of `name`, or nil.
    public subscript(_ name: String) -> String? {
        get { fields[name] }
        set { fields[name] = newValue }
    }

    /// The bytes to post.
    public var bytes: [UInt8] {
        let lines = fields.keys.sorted().map { key in
            "\(key)=\(fields[key]!.replacing("\n", with: " "))"
        }
        return Array(lines.joined(separator: "\n").utf8)
    }

    /// Parses posted bytes; lines without `=` are ignored.
    public init(bytes: [UInt8]) {
        var fields: [String: String] = [:]
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            guard let eq = line.firstIndex(of: "=") else { continue }
            fields[String(line[..<eq])] = String(line[line.index(after: eq)...])
        }
        self.fields = fields
    }

    /// The integer value of `name`, or nil.
    public func int(_ name: String) -> Int? { fields[name].flatMap { Int($0) } }

    /// Lowercase hex of `bytes` (handles in records).
    public static func hex(_ bytes: [UInt8]) -> String { hexString(bytes) }

    /// The bytes of a hex string, or nil when it is not one.
    public static func bytes(fromHex text: String) -> [UInt8]? {
        let digits = Array(text.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var out: [UInt8] = []
        out.reserveCapacity(digits.count / 2)
        func value(_ c: UInt8) -> UInt8? {
            switch c {
            case 48...57: c - 48
            case 97...102: c - 87
            case 65...70: c - 55
            default: nil
            }
        }
        var i = 0
        while i < digits.count {
            guard let hi = value(digits[i]), let lo = value(digits[i + 1]) else { return nil }
            out.append(hi << 4 | lo)
            i += 2
        }
        return out
    }
}
