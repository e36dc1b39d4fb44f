import Testing
@testable import FlashMoE

@Suite struct JSONParserTests {
    private func parse(_ s: String) throws(JSONError) -> JSONValue { try JSONParser.parse(Array(s.utf8)) }

    @Test func parsesEveryKindOfValue() throws {
        let v = try parse(#" {"a": [1, -2.5e3, true, false, null], "b": {"c": "x\ty\u00e9\ud83d\ude00"}} "#)
        guard case .object(let o) = v, case .array(let a)? = o["a"], case .object(let b)? = o["b"] else {
            Issue.record("wrong structure: \(v)")
            return
        }
        #expect(a.count == 5)
        #expect(a[0] == .number(JSONNumber(text: "1")))
        if case .number(let n) = a[1] { #expect(n.double == -2500 && n.integer == nil) }
        #expect(a[2] == .bool(true) && a[3] == .bool(false) && a[4] == .null)
        #expect(b["c"] == .string("x\ty\u{e9}\u{1F600}"))
    }

    @Test func keepsDuplicateKeysSoCallersCanRejectThem() throws {
        guard case .object(let o) = try parse(#"{"k": 1, "k": 2}"#) else { Issue.record("not an object"); return }
        #expect(o.members.count == 2)
        #expect(o.firstDuplicateKey == "k")
    }

    @Test func integersAreExact() throws {
        guard case .number(let n) = try parse("9223372036854775807") else { Issue.record("not a number"); return }
        #expect(n.integer == Int.max)
        guard case .number(let big) = try parse("9223372036854775808") else { Issue.record("not a number"); return }
        #expect(big.integer == nil && big.isIntegerLiteral)
    }

    @Test(arguments: [
        "", "{", "[1,]", "{\"a\":1,}", "{'a':1}", "01", "1.", ".5", "-", "1e", "tru", "nul", "\"abc",
        "\"\\x\"", "\"a\u{01}b\"", "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"", "{\"a\" 1}", "[1 2]",
        "{} {}", "NaN", "Infinity", "+1", "\"\\u12G4\"",
    ])
    func rejectsInvalidDocuments(_ text: String) {
        #expect(throws: JSONError.self) { try parse(text) }
    }

    @Test func rejectsInvalidUTF8() {
        #expect(throws: JSONError.self) { try JSONParser.parse([0x22, 0xFF, 0xFE, 0x22]) }
    }

    @Test func deepNestingIsAnErrorNotACrash() {
        let bomb = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        #expect(throws: JSONError.self) { try parse(bomb) }
        let ok = String(repeating: "[", count: JSONParser.maximumDepth) + String(repeating: "]", count: JSONParser.maximumDepth)
        #expect(throws: Never.self) { try parse(ok) }
    }

    @Test func serializationRoundTrips() throws {
        let v = JSONValue.object([
            ("s", .string("q\"b\\n\n\u{1}é")), ("n", .int(-42)), ("d", .double(2.5)), ("a", .array([.null, .bool(true)])),
        ])
        #expect(try parse(v.serialized) == v)
        #expect(JSONValue.double(.infinity) == .null)
    }
}
