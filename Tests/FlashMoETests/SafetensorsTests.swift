import Testing
@testable import FlashMoE

@Suite struct SafetensorsTests {
    /// One tensor of every dtype with awkward values (extremes, negative zero, NaN bit patterns, odd shapes).
    static func everyDType() throws -> [String: SafetensorsTensor] {
        [
            "f64": try SafetensorsTensor(shape: [3], values: [1.0, -0.0, Double.greatestFiniteMagnitude]),
            "f32": try SafetensorsTensor(shape: [2, 2], values: [Float(1.5), -.infinity, .leastNonzeroMagnitude, 3]),
            "f16": try SafetensorsTensor(shape: [1, 3], values: [Float16(0.5), -65504, Float16(bitPattern: 0x7E01)]),
            "bf16": try SafetensorsTensor(shape: [2], values: [BFloat16(3.25), BFloat16(bitPattern: 0xFF80)]),
            "i64": try SafetensorsTensor(shape: [2], values: [Int64.min, Int64.max]),
            "i32": try SafetensorsTensor(shape: [3, 1], values: [Int32.min, -1, Int32.max]),
            "i16": try SafetensorsTensor(shape: [2], values: [Int16.min, 7]),
            "i8": try SafetensorsTensor(shape: [3], values: [Int8.min, 0, Int8.max]),
            "u64": try SafetensorsTensor(shape: [1], values: [UInt64.max]),
            "u32": try SafetensorsTensor(shape: [2], values: [UInt32.max, 1]),
            "u16": try SafetensorsTensor(shape: [1], values: [UInt16(0xBEEF)]),
            "u8": try SafetensorsTensor(shape: [4], values: [UInt8(0), 1, 254, 255]),
            "bool": try SafetensorsTensor(shape: [2, 2], bools: [true, false, false, true]),
            "f8": try SafetensorsTensor(dtype: .float8E4M3, shape: [2], data: [0x38, 0xC0]),
            "scalar": try SafetensorsTensor(shape: [], values: [Float(42)]),
            "empty": try SafetensorsTensor(shape: [0, 5], values: [Float]()),
        ]
    }

    @Test func roundTripsEveryDTypeInMemory() throws {
        let tensors = try Self.everyDType()
        let bytes = Safetensors.encode(tensors, metadata: ["format": "pt", "note": "é\"x"])
        #expect(try Safetensors.decode(bytes) == tensors)
    }

    @Test func roundTripsEveryDTypeThroughAFile() throws {
        try withTemporaryDirectory { dir in
            let tensors = try Self.everyDType()
            let path = dir + "/all.safetensors"
            try Safetensors.write(tensors, metadata: ["format": "pt"], to: path)
            #expect(try Safetensors.read(path: path) == tensors)
            let file = try SafetensorsFile(path: path)
            #expect(file.header.metadata == ["format": "pt"])
            #expect(Set(file.header.names) == Set(tensors.keys))
            #expect(try file.tensor(named: "i32").values(as: Int32.self) == [Int32.min, -1, Int32.max])
        }
    }

    @Test func typedAccessorsReturnTheValuesAndCheckTheDType() throws {
        let t = try Self.everyDType()
        #expect(try t["i64"]?.values(as: Int64.self) == [Int64.min, Int64.max])
        #expect(try t["u16"]?.values(as: UInt16.self) == [0xBEEF])
        #expect(try t["bool"]?.bools() == [true, false, false, true])
        #expect(try t["f64"]?.values(as: Double.self) == [1.0, -0.0, Double.greatestFiniteMagnitude])
        let e = #expect(throws: SafetensorsError.self) { try t["i32"]?.values(as: Int64.self) }
        #expect(e?.kind == .dtypeMismatch)
        #expect((try? t["u8"]?.bools()) == nil)
    }

    @Test func layoutIsAlignedAndPaddedLikeTheReference() throws {
        let tensors: [String: SafetensorsTensor] = [
            "a": try SafetensorsTensor(shape: [3], values: [UInt8(1), 2, 3]),
            "b": try SafetensorsTensor(shape: [1], values: [Double(1)]),
            "c": try SafetensorsTensor(shape: [1], values: [Float(1)]),
        ]
        let bytes = Safetensors.encode(tensors)
        let n = bytes.prefix(8).enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
        #expect(n % 8 == 0)
        let header = try SafetensorsHeader.parse(Array(bytes[8..<(8 + n)]), dataSize: bytes.count - 8 - n)
        // Widest dtypes first, so every tensor starts at a multiple of its element size.
        #expect(header.names == ["b", "c", "a"])
        for t in header.tensors { #expect(t.dataOffsets.lowerBound % t.dtype.byteSize == 0) }
        let json = bytes[8..<(8 + n)]
        let close = try #require(json.lastIndex(of: UInt8(ascii: "}")))
        #expect(json[(close + 1)...].allSatisfy { $0 == UInt8(ascii: " ") })
    }

    @Test func hostTensorConversions() throws {
        let values: [Float] = [1, -2.5, 3.140625, 1e-3, 65504, -0.0]
        for type in ElementType.allCases {
            let host = try HostTensor(shape: [2, 3], values: values, as: type)
            let st = SafetensorsTensor(host)
            #expect(st.dtype == SafetensorsDType(type))
            if type == .float8E4M3 {
                // F8_E4M3 bytes are codes only: without their block scales they are no values (docs/fp8.md).
                #expect(throws: SafetensorsError.self) { try st.hostTensor() }
                continue
            }
            #expect(try st.hostTensor() == host)
            for target in ElementType.allCases {
                #expect(try st.hostTensor(as: target) == host.converted(to: target))
            }
        }
        let f64 = try SafetensorsTensor(shape: [2], values: [0.1, 1e300])
        #expect(try f64.hostTensor().floats() == [Float(0.1), .infinity])
        let e = #expect(throws: SafetensorsError.self) { try SafetensorsTensor(shape: [1], values: [Int32(1)]).hostTensor() }
        #expect(e?.kind == .dtypeMismatch)
    }

    @Test func initializersCheckTheByteCount() {
        let e = #expect(throws: SafetensorsError.self) {
            try SafetensorsTensor(dtype: .float32, shape: [2, 2], data: [UInt8](repeating: 0, count: 15))
        }
        #expect(e?.kind == .sizeMismatch)
        #expect(throws: SafetensorsError.self) { try SafetensorsTensor(shape: [-1], values: [Float]()) }
        #expect(throws: SafetensorsError.self) { try SafetensorsTensor(shape: [Int.max, 4], values: [Float]()) }
    }

    @Test func readsOnlyTheRequestedTensorFromAFile() throws {
        try withTemporaryDirectory { dir in
            let path = dir + "/x.safetensors"
            let big = try SafetensorsTensor(shape: [1000], values: [Float](repeating: 7, count: 1000))
            let small = try SafetensorsTensor(shape: [2], values: [Int32(5), 6])
            try Safetensors.write(["big": big, "small": small], to: path)
            let file = try SafetensorsFile(path: path)
            // Damage the big tensor's bytes after opening: reading the small one must not touch them.
            var bytes = try readBytes(path)
            let start = 8 + bytes.prefix(8).enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) }
            bytes[start] ^= 0xFF
            try writeBytes(bytes, to: path)
            #expect(try file.tensor(named: "small") == small)
            let e = #expect(throws: SafetensorsError.self) { try file.tensor(named: "nope") }
            #expect(e?.kind == .tensorNotFound)
        }
    }

    @Test func shardedCheckpointsResolveThroughTheIndex() throws {
        try withTemporaryDirectory { dir in
            var tensors: [String: SafetensorsTensor] = [:]
            for i in 0..<7 { tensors["t\(i)"] = try SafetensorsTensor(shape: [i + 1], values: [Float](repeating: Float(i), count: i + 1)) }
            try SafetensorsCheckpoint.write(tensors, to: dir, shards: 3)
            #expect(FileSystem.isFile(dir + "/model.safetensors.index.json"))
            #expect(FileSystem.isFile(dir + "/model-00003-of-00003.safetensors"))
            #expect(!FileSystem.isFile(dir + "/model.safetensors"))
            let ckpt = try SafetensorsCheckpoint(directory: dir)
            #expect(ckpt.names == tensors.keys.sorted())
            #expect(Set(ckpt.weightMap.values).count == 3)
            for (name, t) in tensors { #expect(try ckpt.tensor(named: name) == t) }
            #expect(try ckpt.info(named: "t3").shape == [4])
        }
    }

    @Test func singleFileCheckpoint() throws {
        try withTemporaryDirectory { dir in
            let t = try SafetensorsTensor(shape: [2], values: [Float(1), 2])
            try SafetensorsCheckpoint.write(["w": t], to: dir)
            let ckpt = try SafetensorsCheckpoint(directory: dir)
            #expect(ckpt.weightMap == ["w": "model.safetensors"])
            #expect(try ckpt.tensor(named: "w") == t)
            #expect(ckpt.contains("w") && !ckpt.contains("v"))
        }
    }

    @Test func badIndexesAreTypedErrors() throws {
        try withTemporaryDirectory { dir in
            let index = dir + "/model.safetensors.index.json"
            let cases: [(String, SafetensorsError.Kind)] = [
                (#"{"weight_map": {"a": "../etc/passwd"}}"#, .invalidIndex),
                (#"{"weight_map": {"a": "/abs.safetensors"}}"#, .invalidIndex),
                (#"{"weight_map": {"a": 3}}"#, .invalidIndex),
                (#"{"metadata": {}}"#, .invalidIndex),
                (#"{"weight_map": {"a": "x", "a": "y"}}"#, .duplicateName),
                (#"{"weight_map": "#, .invalidIndex),
            ]
            for (text, kind) in cases {
                try writeBytes(Array(text.utf8), to: index)
                let e = #expect(throws: SafetensorsError.self) { try SafetensorsCheckpoint(directory: dir) }
                #expect(e?.kind == kind, "\(text)")
            }
            // An index naming a shard that does not hold the tensor.
            try Safetensors.write(["b": try SafetensorsTensor(shape: [1], values: [Float(1)])], to: dir + "/s.safetensors")
            try writeBytes(Array(#"{"weight_map": {"a": "s.safetensors", "m": "missing.safetensors"}}"#.utf8), to: index)
            let ckpt = try SafetensorsCheckpoint(directory: dir)
            #expect((#expect(throws: SafetensorsError.self) { try ckpt.tensor(named: "a") })?.kind == .tensorNotFound)
            #expect((#expect(throws: SafetensorsError.self) { try ckpt.tensor(named: "m") })?.kind == .io)
            #expect((#expect(throws: SafetensorsError.self) { try ckpt.tensor(named: "zz") })?.kind == .tensorNotFound)
        }
        try withTemporaryDirectory { dir in
            let e = #expect(throws: SafetensorsError.self) { try SafetensorsCheckpoint(directory: dir) }
            #expect(e?.kind == .io)
        }
    }
}
