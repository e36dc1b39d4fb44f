import Testing
@testable import FlashMoE

/// Malformed and hostile safetensors files: each must give its typed error, in memory and from disk, never a trap.
@Suite struct SafetensorsHostileTests {
    /// A file with a given header length field, header text and data section.
    static func file(header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) -> [UInt8] {
        let h = Array(header.utf8)
        let n = declaredLength ?? UInt64(h.count)
        return (0..<8).map { UInt8(truncatingIfNeeded: n >> (8 * UInt64($0))) } + h + data
    }

    static let eightBytes = [UInt8](repeating: 0, count: 8)

    static let cases: [(name: String, bytes: [UInt8], kind: SafetensorsError.Kind)] = [
        ("empty file", [], .truncatedFile),
        ("truncated length", [4, 0, 0], .truncatedFile),
        ("header length > file", file(header: "{}", declaredLength: 3), .truncatedHeader),
        ("truncated header", Array(file(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#).prefix(30)), .truncatedHeader),
        ("huge header length", file(header: "{}", declaredLength: 100_000_001), .headerTooLarge),
        ("header length near 2^64", file(header: "{}", declaredLength: UInt64.max), .headerTooLarge),
        ("bad JSON", file(header: "{\"a\": [1, }"), .invalidJSON),
        ("invalid UTF-8", (0..<8).map { $0 == 0 ? 4 : 0 } + [0x7B, 0xFF, 0xFE, 0x7D], .invalidJSON),
        ("JSON nesting bomb", file(header: String(repeating: "[", count: 50_000)), .invalidJSON),
        ("non-object JSON", file(header: "[1, 2]"), .invalidHeader),
        ("string JSON", file(header: "\"x\""), .invalidHeader),
        ("metadata not strings", file(header: #"{"__metadata__": {"a": 1}}"#), .invalidHeader),
        ("metadata not object", file(header: #"{"__metadata__": []}"#), .invalidHeader),
        ("entry not object", file(header: #"{"a": 1}"#), .invalidEntry),
        ("missing dtype", file(header: #"{"a": {"shape": [1], "data_offsets": [0, 4]}}"#, data: eightBytes), .invalidEntry),
        ("missing shape", file(header: #"{"a": {"dtype": "F32", "data_offsets": [0, 4]}}"#, data: eightBytes), .invalidEntry),
        ("extra field", file(header: #"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}"#, data: eightBytes), .invalidEntry),
        ("one offset", file(header: #"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}"#, data: eightBytes), .invalidEntry),
        ("unknown dtype", file(header: #"{"a": {"dtype": "F24", "shape": [1], "data_offsets": [0, 3]}}"#, data: eightBytes), .unknownDType),
        ("negative dim", file(header: #"{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#, data: eightBytes), .invalidShape),
        ("fractional dim", file(header: #"{"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}"#, data: eightBytes), .invalidShape),
        ("string dim", file(header: #"{"a": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}}"#, data: eightBytes), .invalidShape),
        ("dim past Int64", file(header: #"{"a": {"dtype": "F32", "shape": [99999999999999999999], "data_offsets": [0, 4]}}"#, data: eightBytes), .invalidShape),
        ("shape product overflows", file(header: #"{"a": {"dtype": "F64", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}}"#, data: eightBytes), .invalidShape),
        ("shape × size overflows", file(header: #"{"a": {"dtype": "F64", "shape": [2305843009213693952], "data_offsets": [0, 8]}}"#, data: eightBytes), .invalidShape),
        ("begin > end", file(header: #"{"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}"#, data: eightBytes), .invalidOffsets),
        ("negative offset", file(header: #"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}"#, data: eightBytes), .invalidOffsets),
        ("offsets past data", file(header: #"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#, data: eightBytes), .invalidOffsets),
        ("truncated data", Array(file(header: #"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#, data: eightBytes).dropLast(1)), .invalidOffsets),
        ("huge offset", file(header: #"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [9223372036854775800, 9223372036854775804]}}"#, data: eightBytes), .invalidOffsets),
        ("span ≠ shape × dtype", file(header: #"{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#, data: eightBytes), .sizeMismatch),
        ("overlap", file(header: #"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}"#, data: eightBytes), .overlap),
        ("identical spans", file(header: #"{"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}, "b": {"dtype": "I8", "shape": [8], "data_offsets": [0, 8]}}"#, data: eightBytes), .overlap),
        ("duplicate name", file(header: #"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#, data: eightBytes), .duplicateName),
    ]

    @Test(arguments: cases.indices)
    func rejectedInMemory(_ i: Int) {
        let c = Self.cases[i]
        let e = #expect(throws: SafetensorsError.self, "\(c.name)") { try Safetensors.decode(c.bytes) }
        #expect(e?.kind == c.kind, "\(c.name): \(e?.message ?? "no error")")
        #expect(e?.message.isEmpty == false)
    }

    @Test(arguments: cases.indices)
    func rejectedFromDisk(_ i: Int) throws {
        let c = Self.cases[i]
        try withTemporaryDirectory { dir in
            let path = dir + "/bad.safetensors"
            try writeBytes(c.bytes, to: path)
            let e = #expect(throws: SafetensorsError.self, "\(c.name)") { try SafetensorsFile(path: path) }
            #expect(e?.kind == c.kind, "\(c.name): \(e?.message ?? "no error")")
            #expect(e?.message.contains(path) == true, "the message names the file")
        }
    }

    @Test func validEdgeCasesAreAccepted() throws {
        // Zero-size tensors anywhere, gaps between tensors, trailing padding spaces, metadata.
        let header = #"{"__metadata__": {"k": "v"}, "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}, "a": {"dtype": "U8", "shape": [2], "data_offsets": [6, 8]}}     "#
        let t = try Safetensors.decode(Self.file(header: header, data: [0, 0, 0, 0, 0, 0, 9, 8]))
        #expect(try t["a"]?.values(as: UInt8.self) == [9, 8])
        #expect(t["z"]?.shape == [0])
    }

    @Test func missingFileIsAnIOError() {
        let e = #expect(throws: SafetensorsError.self) { try SafetensorsFile(path: "/nonexistent/dir/x.safetensors") }
        #expect(e?.kind == .io)
    }

    @Test func directoryIsNotAFile() throws {
        try withTemporaryDirectory { dir in
            let e = #expect(throws: SafetensorsError.self) { try SafetensorsFile(path: dir) }
            #expect(e?.kind == .io)
        }
    }
}
