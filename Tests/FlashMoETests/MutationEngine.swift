@testable import FlashMoE

/// A small deterministic generator (SplitMix64): input i of a fuzz run is a pure function of (seed, i).
struct MutationRandom: RandomNumberGenerator {
    private var state: UInt64

    init(seed: UInt64, index: Int) { state = SeededRandom.mix(seed ^ SeededRandom.mix(UInt64(index))) }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        return SeededRandom.mix(state)
    }

    /// Uniform in 0..<n (n > 0).
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }

    /// True with probability `p`.
    mutating func chance(_ p: Double) -> Bool { Double(next() >> 11) < p * Double(1 << 53) }

    mutating func pick<T>(_ values: [T]) -> T { values[below(values.count)] }

    /// A position in 0...n, biased towards the first `hot` positions (a file's header) three times in four.
    mutating func position(in n: Int, hot: Int) -> Int {
        chance(0.75) && hot > 0 ? below(min(hot, n) + 1) : below(n + 1)
    }
}

/// One tensor entry of a safetensors header as raw JSON tokens, so a mutation can put anything in any field.
struct HeaderEntry: Sendable {
    // Every change drops the cached text (serializing ~60 entries per input would dominate the fuzzer's time).
    var name: [UInt8] { didSet { cached = nil } }  // the key's bytes inside the quotes (may be made invalid)
    var dtype: String { didSet { cached = nil } }
    var shape: [String] { didSet { cached = nil } }
    var offsets: [String] { didSet { cached = nil } }
    /// Fields past the three (wrong-type or unknown ones).
    var extra: [(String, String)] = [] { didSet { cached = nil } }
    /// Replaces the whole entry object when set (an entry that is not an object, or a nesting bomb).
    var raw: String? = nil { didSet { cached = nil } }
    private var cached: [UInt8]? = nil

    init(name: [UInt8], dtype: String, shape: [String], offsets: [String]) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.offsets = offsets
        cached = serialized
    }

    /// `"name":{...}` as header text.
    var json: [UInt8] { cached ?? serialized }

    private var serialized: [UInt8] {
        var out: [UInt8] = [UInt8(ascii: "\"")] + name + Array("\":".utf8)
        if let raw { return out + Array(raw.utf8) }
        var fields = [("dtype", dtype), ("shape", "[" + shape.joined(separator: ",") + "]"),
                      ("data_offsets", "[" + offsets.joined(separator: ",") + "]")]
        fields += extra
        out += Array(("{" + fields.map { "\"\($0.0)\":\($0.1)" }.joined(separator: ",") + "}").utf8)
        return out
    }
}

/// A safetensors file taken apart: header entries, metadata and the data section.
struct SafetensorsParts: Sendable {
    var entries: [HeaderEntry]
    var metadata: String?
    var data: [UInt8]

    /// The parts of a valid file (the seeds are valid by construction).
    init(valid bytes: [UInt8]) throws {
        let n = try Safetensors.headerLength(prefix: Array(bytes.prefix(8)), fileSize: bytes.count, source: "seed")
        let header = try SafetensorsHeader.parse(Array(bytes[8..<(8 + n)]), dataSize: bytes.count - 8 - n)
        entries = header.tensors.map {
            HeaderEntry(
                name: Array($0.name.utf8), dtype: "\"\($0.dtype.rawValue)\"", shape: $0.shape.map(String.init),
                offsets: [String($0.dataOffsets.lowerBound), String($0.dataOffsets.upperBound)])
        }
        metadata = header.metadata.isEmpty
            ? nil : "{" + header.metadata.sorted { $0.key < $1.key }.map { "\"\($0.key)\":\"\($0.value)\"" }
                .joined(separator: ",") + "}"
        data = Array(bytes[(8 + n)...])
    }

    /// The header text.
    var header: [UInt8] {
        var members: [[UInt8]] = []
        if let metadata { members.append(Array("\"__metadata__\":\(metadata)".utf8)) }
        for e in entries { members.append(e.json) }
        var out: [UInt8] = [UInt8(ascii: "{")]
        for (i, m) in members.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            out += m
        }
        return out + [UInt8(ascii: "}")]
    }

    /// A complete file with a correct length prefix.
    var file: [UInt8] { MutationEngine.prefixed(header) + data }
}

/// A JSON object taken apart into its members' key bytes and value texts.
struct JSONParts: Sendable {
    /// Keys and values as bytes (building the text from strings per input was a third of the config target's time).
    var members: [(key: [UInt8], value: [UInt8])]

    /// The members of a valid JSON object (the seeds are valid by construction).
    init(valid bytes: [UInt8]) throws {
        guard case .object(let object) = try JSONParser.parse(bytes) else {
            throw SafetensorsError(.invalidHeader, "a JSON seed must be an object")
        }
        members = object.members.map { (key: Array($0.key.utf8), value: Array($0.value.serialized.utf8)) }
    }
}

/// The mutations the fuzzer applies. Every one is a pure function of the generator's draws.
enum MutationEngine {
    /// Integers at and around every limit the readers check (Int64 bounds, 2^32, the header limit, 0, −1).
    static let hugeIntegers = [
        "0", "-0", "-1", "1", "7", "4294967295", "4294967296", "2147483648", "3037000500", "4611686018427387904",
        "9223372036854775807", "9223372036854775806", "9223372036854775808", "-9223372036854775808",
        "18446744073709551616", "99999999999999999999999999999", "100000000", "100000001",
    ]

    /// config.json fields that size the layer, choose its layers, its router or its quantization (FP8 checkpoints'
    /// quantization_config and the fields inside it).
    static let hotKeys: Set<[UInt8]> = Set(
        [
            "hidden_size", "intermediate_size", "moe_intermediate_size", "num_local_experts", "num_experts",
            "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "shared_expert_intermediate_size",
            "n_shared_experts", "num_hidden_layers", "first_k_dense_replace", "decoder_sparse_step", "mlp_only_layers",
            "model_type", "norm_topk_prob", "routed_scaling_factor", "hidden_act", "weight_map",
            "quantization_config", "weight_block_size", "quant_method", "fmt", "activation_scheme",
        ].map { Array($0.utf8) })

    /// Members whose object the loader reads field by field (FP8's quantization_config): half the mutations that
    /// pick one go inside it, with the same mutations as a top-level document.
    static let nestedKeys: Set<[UInt8]> = [Array("quantization_config".utf8)]

    /// Small sizes a config field may plausibly hold, to reach the loader's later checks.
    static let smallIntegers = ["0", "1", "2", "3", "4", "8", "16", "32", "64", "-2"]

    /// Numbers that are not integers, and values of every other JSON kind.
    static let oddValues = [
        "1.5", "1e3", "1E400", "-1e400", "0.0", "1e-400", "null", "true", "false", "\"8\"", "\"\"", "[]", "{}",
        "[1]", "{\"a\":1}", "NaN", "Infinity", "-", "1.", ".5", "01", "+1", "0x10",
    ]

    /// Known, unknown and mis-spelled dtype names.
    static let dtypes = [
        "\"F32\"", "\"F16\"", "\"BF16\"", "\"F64\"", "\"I64\"", "\"I32\"", "\"U8\"", "\"BOOL\"", "\"F8_E4M3\"",
        "\"F8_E5M2\"", "\"F8_E8M0\"", "\"F24\"", "\"f32\"", "\"\"", "\"F32 \"", "32", "null", "[\"F32\"]",
    ]

    /// Byte strings that break strings, UTF-8 and escapes.
    static let badStrings: [[UInt8]] = [
        [0xC3, 0x28], [0xED, 0xA0, 0x80], [0xF8, 0x88, 0x80, 0x80, 0x80], [0xC0, 0x80], [0xFF], [0x80],
        [0xF4, 0x90, 0x80, 0x80], Array("\\ud800".utf8), Array("\\udc00x".utf8), Array("\\u00".utf8),
        Array("\\x41".utf8), [0x01], [0x0A], Array("\\u0000".utf8), Array("\\\"".utf8), Array("\\".utf8),
    ]

    /// Tokens spliced into JSON text.
    static let tokens: [[UInt8]] =
        ["{", "}", "[", "]", "\"", ",", ":", "-", "0", "9e9999", "\\", "\\u", "true", "nul", " ", "\t", "\u{0}"]
        .map { Array($0.utf8) } + badStrings

    /// The 8-byte little-endian length prefix of `header`, then the header.
    static func prefixed(_ header: [UInt8], declared: UInt64? = nil) -> [UInt8] {
        let n = declared ?? UInt64(header.count)
        return (0..<8).map { UInt8(truncatingIfNeeded: n >> (8 * UInt64($0))) } + header
    }

    /// Nesting `depth` levels deep around `inner`: arrays or objects (the brackets are built once per depth).
    static func nested(_ depth: Int, _ inner: String, objects: Bool) -> String {
        let (open, close) = brackets[objects]?[depth] ?? bracketPair(depth, objects: objects)
        return open + inner + close
    }

    private static func bracketPair(_ depth: Int, objects: Bool) -> (String, String) {
        (String(repeating: objects ? "{\"a\":" : "[", count: depth), String(repeating: objects ? "}" : "]", count: depth))
    }

    static let depths = [JSONParser.maximumDepth - 1, JSONParser.maximumDepth, JSONParser.maximumDepth + 1, 300, 5_000]

    private static let brackets: [Bool: [Int: (String, String)]] = Dictionary(
        uniqueKeysWithValues: [false, true].map { objects in
            (objects, Dictionary(uniqueKeysWithValues: depths.map { ($0, bracketPair($0, objects: objects)) }))
        })

    // MARK: Byte-level mutations (any file: safetensors or JSON)

    /// One byte-level mutation: truncation, bit flips, insertion, deletion, interesting bytes, a duplicated chunk.
    /// `hot` is the length of the region most mutations land in (a safetensors file's header).
    static func mutateBytes(_ bytes: inout [UInt8], hot: Int, _ r: inout MutationRandom) {
        let n = bytes.count
        switch r.below(7) {
        case 0:  // truncation
            bytes.removeSubrange(r.position(in: n, hot: hot)...)
        case 1:  // bit flips
            guard n > 0 else { return }
            for _ in 0...r.below(8) {
                let i = min(n - 1, r.position(in: n - 1, hot: hot))
                bytes[i] ^= UInt8(1) << UInt8(r.below(8))
            }
        case 2:  // insertion of random bytes or a token
            let at = r.position(in: n, hot: hot)
            let insert = r.chance(0.5)
                ? (0...r.below(16)).map { _ in UInt8(truncatingIfNeeded: r.next()) } : r.pick(tokens)
            bytes.insert(contentsOf: insert, at: at)
        case 3:  // deletion of a range
            guard n > 0 else { return }
            let at = min(n - 1, r.position(in: n - 1, hot: hot))
            bytes.removeSubrange(at..<min(n, at + 1 + r.below(32)))
        case 4:  // an interesting byte
            guard n > 0 else { return }
            let values: [UInt8] = [
                0, 0xFF, 0x7F, 0x80, 0x22, 0x7B, 0x5B, 0x5D, 0x7D, 0x2C, 0x3A, 0x2D, 0x39, 0xC0, 0xED,
            ]
            bytes[min(n - 1, r.position(in: n - 1, hot: hot))] = r.pick(values)
        case 5:  // a chunk copied elsewhere (repeats keys, entries, brackets)
            guard n > 1 else { return }
            let from = r.position(in: n - 1, hot: hot), len = 1 + r.below(64)
            let chunk = Array(bytes[from..<min(n, from + len)])
            bytes.insert(contentsOf: chunk, at: r.position(in: n, hot: hot))
        default:  // a swap of two ranges' bytes
            guard n > 2 else { return }
            let a = r.position(in: n - 1, hot: hot), b = r.position(in: n - 1, hot: hot)
            bytes.swapAt(min(a, n - 1), min(b, n - 1))
        }
    }

    // MARK: Safetensors mutations

    /// A mutated safetensors file from a valid seed: one to three structural or byte-level mutations.
    static func mutateSafetensors(_ seed: SafetensorsParts, _ r: inout MutationRandom) -> [UInt8] {
        var parts = seed
        var declared: UInt64? = nil
        var byteMutations = 0
        for _ in 0...r.below(3) {
            switch r.below(12) {
            case 0, 1, 2: byteMutations += 1
            case 3: declared = headerLength(parts, &r)
            case 4: mutateOffsets(&parts, &r)
            case 5: mutateShape(&parts, &r)
            case 6: mutateDType(&parts, &r)
            case 7: duplicateOrReorder(&parts, &r)
            case 8: mutateName(&parts, &r)
            case 9: mutateStructure(&parts, &r)
            case 10: mutateMetadata(&parts, &r)
            default: mutateData(&parts, &r)
            }
        }
        let header = parts.header
        var bytes = prefixed(header, declared: declared) + parts.data
        for _ in 0..<byteMutations { mutateBytes(&bytes, hot: 8 + header.count, &r) }
        return bytes
    }

    /// A declared header length at and around the real one and the file's size, or far past it.
    static func headerLength(_ parts: SafetensorsParts, _ r: inout MutationRandom) -> UInt64 {
        let h = UInt64(parts.header.count), file = 8 + h + UInt64(parts.data.count)
        let choices: [UInt64] = [
            0, 1, 2, h &- 1, h + 1, file - 8, file - 7, file, 1 << 31, 1 << 32, 100_000_000, 100_000_001, 1 << 63,
            UInt64.max, UInt64.max - 7,
        ]
        return r.pick(choices)
    }

    private static func someEntry(_ parts: SafetensorsParts, _ r: inout MutationRandom) -> Int? {
        parts.entries.isEmpty ? nil : r.below(parts.entries.count)
    }

    /// Huge, negative, reversed, past-the-end, shifted or another tensor's offsets (overlap).
    static func mutateOffsets(_ parts: inout SafetensorsParts, _ r: inout MutationRandom) {
        guard let i = someEntry(parts, &r) else { return }
        let data = parts.data.count
        guard parts.entries[i].offsets.count == 2 else {  // an earlier mutation left other than two offsets
            parts.entries[i].offsets.append(r.pick(hugeIntegers))
            return
        }
        switch r.below(6) {
        case 0: parts.entries[i].offsets[r.below(2)] = r.pick(hugeIntegers)
        case 1: parts.entries[i].offsets = [parts.entries[i].offsets[1], parts.entries[i].offsets[0]]
        case 2: parts.entries[i].offsets[1] = String(data + r.below(3))
        case 3:  // another tensor's span: overlapping or identical
            let j = r.below(parts.entries.count)
            parts.entries[i].offsets = parts.entries[j].offsets
        case 4:  // shifted by a little
            if let b = Int(parts.entries[i].offsets[0]), let e = Int(parts.entries[i].offsets[1]) {
                let d = r.below(9) - 4
                parts.entries[i].offsets = [String(b &+ d), String(e &+ d)]
            }
        default:
            parts.entries[i].offsets =
                r.chance(0.5) ? [r.pick(oddValues), "0"] : Array(repeating: "0", count: r.below(4))
        }
    }

    /// Huge dimensions, products that overflow, extra or missing dimensions, non-integers.
    static func mutateShape(_ parts: inout SafetensorsParts, _ r: inout MutationRandom) {
        guard let i = someEntry(parts, &r) else { return }
        switch r.below(5) {
        case 0:
            if !parts.entries[i].shape.isEmpty {
                parts.entries[i].shape[r.below(parts.entries[i].shape.count)] = r.pick(hugeIntegers)
            }
        case 1:  // products that overflow 64 bits in different places
            parts.entries[i].shape = r.pick([
                ["4294967296", "4294967296"], ["3037000500", "3037000500"], ["2305843009213693952"],
                ["4611686018427387904", "2"], ["65536", "65536", "65536", "65536"], ["0", "9223372036854775807"],
            ])
        case 2: parts.entries[i].shape.append(r.pick(["1", "2", "0", "1000000"]))
        case 3: parts.entries[i].shape = Array(parts.entries[i].shape.dropLast())
        default:
            if !parts.entries[i].shape.isEmpty {
                parts.entries[i].shape[r.below(parts.entries[i].shape.count)] = r.pick(oddValues)
            }
        }
    }

    static func mutateDType(_ parts: inout SafetensorsParts, _ r: inout MutationRandom) {
        guard let i = someEntry(parts, &r) else { return }
        parts.entries[i].dtype = r.pick(dtypes)
    }

    /// Duplicate entries (the same name twice) or entries in another order (valid: order is free).
    static func duplicateOrReorder(_ parts: inout SafetensorsParts, _ r: inout MutationRandom) {
        guard let i = someEntry(parts, &r) else { return }
        if r.chance(0.5) {
            parts.entries.insert(parts.entries[i], at: r.below(parts.entries.count + 1))
        } else {
            let j = r.below(parts.entries.count)
            parts.entries.swapAt(i, j)
            if r.chance(0.5) {
                (parts.entries[i].offsets, parts.entries[j].offsets) = (parts.entries[j].offsets, parts.entries[i].offsets)
            }
        }
    }

    /// Names with bad UTF-8, bad escapes, the metadata key, or another entry's name.
    static func mutateName(_ parts: inout SafetensorsParts, _ r: inout MutationRandom) {
        guard let i = someEntry(parts, &r) else { return }
        switch r.below(3) {
        case 0:
            parts.entries[i].name.insert(contentsOf: r.pick(badStrings), at: r.below(parts.entries[i].name.count + 1))
        case 1: parts.entries[i].name = Array("__metadata__".utf8)
        default: parts.entries[i].name = parts.entries[r.below(parts.entries.count)].name
        }
    }

    /// Entries that are not objects, nesting bombs, missing and extra fields.
    static func mutateStructure(_ parts: inout SafetensorsParts, _ r: inout MutationRandom) {
        guard let i = someEntry(parts, &r) else { return }
        switch r.below(4) {
        case 0: parts.entries[i].raw = nested(r.pick(depths), "1", objects: r.chance(0.5))
        case 1: parts.entries[i].raw = r.pick(oddValues)
        case 2:
            let field = r.pick(["x", "dtype", "shape", "data_offsets"])
            parts.entries[i].extra.append((field, r.pick(hugeIntegers + oddValues)))
        default:
            let e = parts.entries[i]
            let (shape, offsets) = ("[" + e.shape.joined(separator: ",") + "]", "[" + e.offsets.joined(separator: ",") + "]")
            parts.entries[i].raw = r.pick([  // a field missing, or the shape of another kind
                "{\"shape\":\(shape),\"data_offsets\":\(offsets)}",
                "{\"dtype\":\(e.dtype),\"data_offsets\":\(offsets)}",
                "{\"dtype\":\(e.dtype),\"shape\":\(shape)}",
                "{\"dtype\":\(e.dtype),\"shape\":\(r.pick(oddValues)),\"data_offsets\":\(offsets)}",
            ])
        }
    }

    static func mutateMetadata(_ parts: inout SafetensorsParts, _ r: inout MutationRandom) {
        parts.metadata = r.pick([
            "{\"format\":\"pt\"}", "{\"a\":1}", "[]", "\"pt\"", "{\"a\":{\"b\":\"c\"}}", "{\"a\":\"b\",\"a\":\"c\"}",
            nested(r.pick(depths), "\"x\"", objects: true), "null",
        ])
    }

    /// A data section cut short, grown, or emptied (the header is unchanged).
    static func mutateData(_ parts: inout SafetensorsParts, _ r: inout MutationRandom) {
        switch r.below(3) {
        case 0: parts.data.removeLast(min(parts.data.count, 1 + r.below(64)))
        case 1: parts.data += [UInt8](repeating: 0, count: 1 + r.below(64))
        default: parts.data = []
        }
    }

    // MARK: JSON documents (config.json, the shard index)

    /// A mutated JSON object from a valid seed: top-level values replaced, removed, duplicated, nested, or the
    /// text mutated bytewise.
    static func mutateJSON(_ seed: JSONParts, _ r: inout MutationRandom) -> [UInt8] {
        var members = seed.members
        var byteMutations = 0
        for _ in 0...r.below(3) {
            guard !members.isEmpty else { break }
            var i = r.below(members.count)
            // Half the time a field the loader sizes buffers or loops from, so those paths see every bad value.
            let hot = members.indices.filter { hotKeys.contains(members[$0].key) }
            if r.chance(0.5), !hot.isEmpty { i = hot[r.below(hot.count)] }
            if nestedKeys.contains(members[i].key), r.chance(0.5), let inner = try? JSONParts(valid: members[i].value) {
                members[i].value = mutateJSON(inner, &r)
                continue
            }
            switch r.below(9) {
            case 7:  // an integer scaled up: still plausible to the config's own checks, far past what the files hold
                if let v = Int(String(decoding: members[i].value, as: UTF8.self)) {
                    let (p, overflow) = v.multipliedReportingOverflow(by: r.pick([2, 1000, 1 << 20, 1 << 32]))
                    members[i].value = Array(String(overflow ? v : p).utf8)
                }
            case 0: members[i].value = Array(r.pick(hugeIntegers).utf8)
            case 1: members[i].value = Array(r.pick(smallIntegers).utf8)
            case 2: members[i].value = Array(r.pick(oddValues + ModelFamily.allCases.map { "\"\($0.rawValue)\"" }).utf8)
            case 3: members.remove(at: i)
            case 4: members.insert(members[i], at: r.below(members.count + 1))
            case 5:
                let inner = String(decoding: members[i].value, as: UTF8.self)
                members[i].value = Array(nested(r.pick(depths), inner, objects: r.chance(0.5)).utf8)
            case 6: members[i].key.insert(contentsOf: r.pick(badStrings), at: r.below(members[i].key.count + 1))
            default: byteMutations += 1
            }
        }
        var text: [UInt8] = [UInt8(ascii: "{")]
        for (i, m) in members.enumerated() {
            if i > 0 { text.append(UInt8(ascii: ",")) }
            text.append(UInt8(ascii: "\""))
            text += m.key
            text += [UInt8(ascii: "\""), UInt8(ascii: ":")]
            text += m.value
        }
        text.append(UInt8(ascii: "}"))
        for _ in 0..<byteMutations { mutateBytes(&text, hot: text.count, &r) }
        return text
    }
}
