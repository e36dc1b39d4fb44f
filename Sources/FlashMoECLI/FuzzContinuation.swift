#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// After a kernel fault has lost this process's CUDA context, the rest of a fuzz run continues in a fresh process:
/// this binary again, from the next case, its report lines passed through and its final count added to ours.
enum FuzzContinuation {
    /// The counts of the continuing process's last line, `fuzz: N passed, M failed`.
    static func parseCounts(_ line: String) -> (passed: Int, failed: Int)? {
        let words = line.split(separator: " ")
        guard words.count == 5, words[0] == "fuzz:", words[2] == "passed,", words[4] == "failed",
            let passed = Int(words[1]), let failed = Int(words[3])
        else { return nil }
        return (passed, failed)
    }

    /// Runs `executable arguments…` (this binary by default), passing each line it prints to `emit` except its final
    /// count line, which is returned (nil when the process ended without one: it crashed or was killed). Standard
    /// error is shared.
    static func run(executable: String = "/proc/self/exe", arguments: [String], emit: (String) -> Void)
        -> (passed: Int, failed: Int)?
    {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else {
            emit("fuzz: cannot continue in a new process: pipe() failed (errno \(errno))")
            return nil
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_addclose(&actions, fds[0])
        posix_spawn_file_actions_addclose(&actions, fds[1])
        let argv: [UnsafeMutablePointer<CChar>?] = (["flashmoe"] + arguments).map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, executable, &actions, nil, argv, environ)
        close(fds[1])
        defer { close(fds[0]) }
        guard spawned == 0 else {
            emit("fuzz: cannot continue in a new process: posix_spawn failed (error \(spawned))")
            return nil
        }
        var counts: (passed: Int, failed: Int)?
        var pending: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        func deliver(_ bytes: ArraySlice<UInt8>) {
            let line = String(decoding: bytes, as: UTF8.self)
            if let c = parseCounts(line) { counts = c } else { emit(line) }
        }
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            pending += buffer[0..<n]
            while let newline = pending.firstIndex(of: 10) {
                deliver(pending[..<newline])
                pending.removeSubrange(...newline)
            }
        }
        if !pending.isEmpty { deliver(pending[...]) }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return counts
    }
}
