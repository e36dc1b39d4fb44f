#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Facts about the machine the commands run on, read from /proc (nil where there is no /proc), and the small
/// text-file I/O the commands need, without Foundation.
enum HostMachine {
    /// The kernel's estimate of memory available to a new process without swapping (`MemAvailable`), in bytes.
    static func availableMemoryBytes() -> Int? {
        readTextFile("/proc/meminfo").flatMap(parseMemAvailable)
    }

    /// The `MemAvailable` line of a /proc/meminfo text, in bytes ("MemAvailable:   24240816 kB").
    static func parseMemAvailable(_ meminfo: String) -> Int? {
        for line in meminfo.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 2, let value = Int(fields[1]) else { return nil }
            let unit = fields.count >= 3 ? fields[2].lowercased() : "b"
            switch unit {
            case "kb": return value * 1024
            case "mb": return value * 1024 * 1024
            case "b": return value
            default: return nil
            }
        }
        return nil
    }

    /// The CPU's model name from /proc/cpuinfo.
    static func cpuModelName() -> String? {
        readTextFile("/proc/cpuinfo").flatMap(parseCPUModel)
    }

    /// The first `model name` (x86) or `Model` / `Hardware` (Arm) value of a /proc/cpuinfo text.
    static func parseCPUModel(_ cpuinfo: String) -> String? {
        for key in ["model name", "Model", "Hardware"] {
            for line in cpuinfo.split(separator: "\n") {
                guard let colon = line.firstIndex(of: ":") else { continue }
                let name = line[..<colon].trimmed(" \t")
                let value = line[line.index(after: colon)...].trimmed(" \t")
                if name == key && !value.isEmpty { return value }
            }
        }
        return nil
    }

    /// `seconds` since the epoch as ISO 8601 in UTC, e.g. "2026-11-29T08:15:00Z".
    static func utcTimestamp(_ seconds: Int = Int(time(nil))) -> String {
        var t = time_t(seconds)
        var parts = tm()
        gmtime_r(&t, &parts)
        var buffer = [CChar](repeating: 0, count: 32)
        let n = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%SZ", &parts)
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// A whole text file read with stdio (works for /proc files, whose size reads as 0), or nil.
    static func readTextFile(_ path: String) -> String? {
        guard let file = fopen(path, "r") else { return nil }
        defer { fclose(file) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 14)
        while true {
            let n = chunk.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, file) }
            if n > 0 { bytes.append(contentsOf: chunk[0..<n]) }
            if n < chunk.count { break }
        }
        return ferror(file) == 0 ? String(decoding: bytes, as: UTF8.self) : nil
    }

    /// Writes `text` to `path` (replacing it); the error names the path and the system's reason.
    static func writeTextFile(_ text: String, to path: String) throws(CLIError) {
        func failure() -> CLIError {
            CLIError(.cannotWrite, "cannot write \(path): \(String(cString: strerror(errno))); choose a writable path")
        }
        guard let file = fopen(path, "w") else { throw failure() }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, file) }
        let flushed = fflush(file) == 0
        let closed = fclose(file) == 0
        guard written == bytes.count, flushed, closed else { throw failure() }
    }
}

extension Substring {
    /// The text without leading and trailing characters of `set`.
    fileprivate func trimmed(_ set: String) -> String {
        let chars = Set(set)
        var s = self[...]
        while let c = s.first, chars.contains(c) { s = s.dropFirst() }
        while let c = s.last, chars.contains(c) { s = s.dropLast() }
        return String(s)
    }
}
