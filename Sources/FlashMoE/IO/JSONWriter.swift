extension JSONValue {
    /// The compact JSON text of this value (members in order, no insignificant whitespace).
    ///
    /// Numbers are written from their source text; strings escape `"`, `\` and control characters.
    var serialized: String {
        var out = ""
        write(into: &out)
        return out
    }

    private func write(into out: inout String) {
        switch self {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .number(let n): out += n.text
        case .string(let s): Self.writeString(s, into: &out)
        case .array(let a):
            out += "["
            for (i, v) in a.enumerated() {
                if i > 0 { out += "," }
                v.write(into: &out)
            }
            out += "]"
        case .object(let o):
            out += "{"
            for (i, m) in o.members.enumerated() {
                if i > 0 { out += "," }
                Self.writeString(m.key, into: &out)
                out += ":"
                m.value.write(into: &out)
            }
            out += "}"
        }
    }

    private static func writeString(_ s: String, into out: inout String) {
        out += "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        out += "\""
    }

    /// An integer value.
    static func int(_ v: Int) -> JSONValue { .number(JSONNumber(text: String(v))) }

    /// A floating-point value, written so that it parses back to the same `Double`; `null` when not finite
    /// (JSON has no spelling for ±∞ or NaN).
    static func double(_ v: Double) -> JSONValue { v.isFinite ? .number(JSONNumber(text: "\(v)")) : .null }

    /// An object from ordered key–value pairs.
    static func object(_ pairs: [(String, JSONValue)]) -> JSONValue {
        .object(JSONObject(members: pairs.map { JSONObject.Member(key: $0.0, value: $0.1) }))
    }
}
