/// The safetensors weights of a Hugging Face checkpoint directory: either one `model.safetensors` or shards
/// listed by `model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`).
///
/// Only headers are read up front (shards lazily, when a tensor in them is first asked for); tensor bytes are read
/// one tensor at a time.
public final class SafetensorsCheckpoint {
    /// The name of the single-file checkpoint.
    public static let singleFileName = "model.safetensors"
    /// The name of the shard index.
    public static let indexFileName = "model.safetensors.index.json"
    /// The largest index file accepted.
    static let maximumIndexLength = 256 << 20

    /// The checkpoint directory.
    public let directory: String
    /// Tensor name → the file (relative to `directory`) that holds it.
    public let weightMap: [String: String]
    private var openFiles: [String: SafetensorsFile] = [:]

    /// Opens the checkpoint in `directory`, preferring the shard index when both forms are present.
    public init(directory: String) throws(SafetensorsError) {
        self.directory = directory
        let indexPath = directory + "/" + Self.indexFileName
        let singlePath = directory + "/" + Self.singleFileName
        if FileSystem.isFile(indexPath) {
            weightMap = try Self.parseIndex(path: indexPath)
        } else if FileSystem.isFile(singlePath) {
            let file = try SafetensorsFile(path: singlePath)
            openFiles[Self.singleFileName] = file
            weightMap = Dictionary(uniqueKeysWithValues: file.header.names.map { ($0, Self.singleFileName) })
        } else {
            throw SafetensorsError(
                .io,
                "'\(directory)' has neither \(Self.indexFileName) nor \(Self.singleFileName): point at a Hugging Face checkpoint directory")
        }
    }

    /// Every tensor name, sorted.
    public var names: [String] { weightMap.keys.sorted() }

    /// Whether the checkpoint lists a tensor named `name`.
    public func contains(_ name: String) -> Bool { weightMap[name] != nil }

    /// The header entry of `name` (opens its shard if needed).
    public func info(named name: String) throws(SafetensorsError) -> SafetensorsTensorInfo {
        let (file, shard) = try fileHolding(name)
        guard let info = file.header.info(named: name) else {
            throw SafetensorsError(
                .tensorNotFound,
                "\(Self.indexFileName) maps '\(name)' to '\(shard)', but that shard has no such tensor: the index is stale")
        }
        return info
    }

    /// Reads the tensor named `name` from whichever file holds it.
    public func tensor(named name: String) throws(SafetensorsError) -> SafetensorsTensor {
        _ = try info(named: name)
        return try fileHolding(name).file.tensor(named: name)
    }

    private func fileHolding(_ name: String) throws(SafetensorsError) -> (file: SafetensorsFile, shard: String) {
        guard let shard = weightMap[name] else {
            throw SafetensorsError(.tensorNotFound, "the checkpoint in '\(directory)' has no tensor named '\(name)'")
        }
        if let f = openFiles[shard] { return (f, shard) }
        let f = try SafetensorsFile(path: directory + "/" + shard)
        openFiles[shard] = f
        return (f, shard)
    }

    private static func parseIndex(path: String) throws(SafetensorsError) -> [String: String] {
        let bytes: [UInt8]
        do {
            bytes = try FileSystem.readFile(path, limit: maximumIndexLength)
        } catch {
            throw SafetensorsError(error)
        }
        let top: JSONObject
        do {
            top = try JSONParser.parseObject(bytes)
        } catch {
            switch error {
            case .invalid(let e): throw SafetensorsError(.invalidIndex, "'\(path)' is not valid JSON: \(e)")
            case .notObject(let kind): throw SafetensorsError(.invalidIndex, "'\(path)' must be a JSON object, found \(kind)")
            case .duplicateKey(let k): throw SafetensorsError(.duplicateName, "'\(path)' sets '\(k)' more than once")
            }
        }
        guard case .object(let map)? = top["weight_map"] else {
            throw SafetensorsError(.invalidIndex, "'\(path)' must have a 'weight_map' object of tensor name → shard file")
        }
        if let dup = map.firstDuplicateKey {
            throw SafetensorsError(.duplicateName, "'\(path)' maps '\(dup)' more than once")
        }
        var out: [String: String] = [:]
        for m in map.members {
            guard case .string(let shard) = m.value else {
                throw SafetensorsError(.invalidIndex, "'\(path)': weight_map['\(m.key)'] must be a file name string")
            }
            // Shards must sit in the checkpoint directory: an index must not make us open arbitrary paths.
            guard !shard.isEmpty, !shard.contains("/"), shard != ".", shard != ".." else {
                throw SafetensorsError(
                    .invalidIndex, "'\(path)': shard '\(shard)' of '\(m.key)' must be a plain file name in the directory")
            }
            out[m.key] = shard
        }
        return out
    }

    /// Writes `tensors` as a checkpoint in `directory`: one `model.safetensors` when `shards` is 1, otherwise
    /// `model-0000i-of-0000n.safetensors` files (tensors dealt out in name order) and the index.
    public static func write(_ tensors: [String: SafetensorsTensor], to directory: String, shards: Int = 1)
        throws(SafetensorsError)
    {
        guard shards >= 1 else { throw SafetensorsError(.invalidIndex, "a checkpoint needs at least one shard") }
        if shards == 1 {
            try Safetensors.write(tensors, metadata: ["format": "pt"], to: directory + "/" + singleFileName)
            return
        }
        let names = tensors.keys.sorted()
        let perShard = max(1, (names.count + shards - 1) / shards)
        func pad(_ i: Int) -> String { String(repeating: "0", count: max(0, 5 - String(i).count)) + String(i) }
        var weightMap: [(String, JSONValue)] = []
        var totalSize = 0
        for s in 0..<shards {
            let file = "model-\(pad(s + 1))-of-\(pad(shards)).safetensors"
            let part = names.dropFirst(s * perShard).prefix(perShard)
            var subset: [String: SafetensorsTensor] = [:]
            for n in part {
                subset[n] = tensors[n]
                weightMap.append((n, .string(file)))
                totalSize += tensors[n]?.data.count ?? 0
            }
            try Safetensors.write(subset, metadata: ["format": "pt"], to: directory + "/" + file)
        }
        let index = JSONValue.object([
            ("metadata", .object([("total_size", .int(totalSize))])),
            ("weight_map", .object(weightMap)),
        ])
        do {
            try FileSystem.writeFile(directory + "/" + indexFileName, chunks: [Array(index.serialized.utf8)])
        } catch {
            throw SafetensorsError(error)
        }
    }
}
