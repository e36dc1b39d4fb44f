/// A parsed JSON document: the subset of Foundation we need (safetensors headers, `config.json`, index files),
/// kept strict and allocation-light, with no dependency on Foundation.
///
/// Objects keep their members in document order, duplicates included, so callers can reject duplicate keys
/// (a safetensors header must not name a tensor twice) instead of silently keeping the last one.
enum JSONValue: Sendable, Equatable {
    case null
    case bool(Bool)
    /// A number, kept as its source text so integers of any size are checked exactly.
    case number(JSONNumber)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)

    /// A short name of the value's kind for error messages ("a string", "an array", …).
    var kindDescription: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .number(let n): n.integer != nil ? "an integer" : "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }
}

/// A JSON number in its source form.
struct JSONNumber: Sendable, Equatable, CustomStringConvertible {
    /// The exact text of the number in the document.
    let text: String

    /// The value as an `Int` when the text is an integer literal (no fraction or exponent) that fits.
    var integer: Int? {
        text.utf8.contains(where: { $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "e") || $0 == UInt8(ascii: "E") })
            ? nil : Int(text)
    }

    /// Whether the text is an integer literal, whether or not it fits in an `Int`.
    var isIntegerLiteral: Bool {
        !text.utf8.contains(where: { $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "e") || $0 == UInt8(ascii: "E") })
    }

    /// The value as a `Double` (±∞ when out of range).
    var double: Double? { Double(text) }

    var description: String { text }
}

/// A JSON object's members in document order.
struct JSONObject: Sendable, Equatable {
    /// One `"key": value` member.
    struct Member: Sendable, Equatable {
        let key: String
        let value: JSONValue
    }

    let members: [Member]

    /// The value of the first member named `key`.
    subscript(key: String) -> JSONValue? {
        members.first(where: { $0.key == key })?.value
    }

    /// The first key that occurs more than once, if any.
    var firstDuplicateKey: String? {
        var seen = Set<String>()
        for m in members where !seen.insert(m.key).inserted { return m.key }
        return nil
    }
}
