import Foundation
import Synchronization
import Testing

@testable import FlashMoE

/// A compiler that needs no NVRTC: its "cubin" spells out what it was asked to compile, and it counts calls.
final class FakeCompiler: CUDACompiling {
    let identity: String
    let failure: CUDAError?
    private let count = Mutex(0)

    init(identity: String = "fake 1.0", failure: CUDAError? = nil) {
        self.identity = identity
        self.failure = failure
    }

    var compiles: Int { count.withLock { $0 } }

    func compile(source: String, name: String, headers: [String: String], options: [String]) throws(CUDAError)
        -> (cubin: [UInt8], log: String)
    {
        count.withLock { $0 += 1 }
        if let failure { throw failure }
        let log = """
            ptxas info    : Compiling entry function 'k' for 'sm_90a'
            ptxas info    : Function properties for k
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
            ptxas info    : Used 12 registers, used 0 barriers
            """
        return (Array("\(name)|\(options.joined(separator: " "))|\(source)".utf8), log)
    }
}

/// A fresh directory, removed when the test ends.
final class ScratchDirectory {
    let path: String
    init() throws {
        path = try SystemFiles.makeTemporaryDirectory(prefix: "flashmoe-test").get()
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

@Suite struct CompilerCacheTests {
    let base = CompileRequest(
        name: "moe.cu", source: "__global__ void k() {}", headers: ["a.cuh": "int a;", "b.cuh": "int b;"],
        arch: GPUArchitecture(major: 9, minor: 0), defines: ["TILE": "64"])

    @Test func everyInputChangesTheKey() {
        let key = base.cacheKey(compilerIdentity: "nvrtc 13.0")
        var variants: [CompileRequest] = []
        func variant(_ change: (inout CompileRequest) -> Void) {
            var r = base
            change(&r)
            variants.append(r)
        }
        variant { $0.source += " " }
        variant { $0.name = "moe2.cu" }
        variant { $0.headers["a.cuh"] = "int a; " }
        variant { $0.headers["c.cuh"] = "" }
        variant { $0.headers = ["a.cuh": "int a;", "bb.cuh": "int b;"] }  // renamed header
        variant { $0.headers = ["a.cuh": "int a;int b;"] }  // same bytes, other split
        variant { $0.arch = GPUArchitecture(major: 8, minor: 0) }
        variant { $0.defines["TILE"] = "128" }
        variant { $0.defines["NEW"] = "" }
        variant { $0.lineInfo = true }
        var keys = Set(variants.map { $0.cacheKey(compilerIdentity: "nvrtc 13.0") })
        keys.insert(base.cacheKey(compilerIdentity: "nvrtc 12.8"))
        #expect(keys.count == variants.count + 1)
        #expect(!keys.contains(key))
        #expect(base.cacheKey(compilerIdentity: "nvrtc 13.0") == key && key.count == 32)
    }

    @Test func missThenHit() throws {
        let scratch = try ScratchDirectory()
        let backend = FakeCompiler()
        let compiler = KernelCompiler(backend: backend, cache: CubinCache(directory: scratch.path + "/nested/cache"))
        let first = try compiler.compile(base)
        let second = try compiler.compile(base)
        #expect(first.cache == .miss && second.cache == .hit && backend.compiles == 1)
        #expect(first.cubin == second.cubin && first.log == second.log && first.key == second.key)
        #expect(second.resources.map(\.registers) == [12] && first.cacheWriteFailure == nil)
        #expect(compiler.cache?.entryCount() == 1)
    }

    /// Damages the stored entry in each way a disk or a crash could, and checks it is never trusted: it is
    /// recompiled, rewritten, and the rewritten entry is good.
    @Test(arguments: ["empty", "truncated header", "truncated body", "garbage", "flipped byte", "other key", "extra byte"])
    func corruptEntriesAreRecompiledAndRewritten(damage: String) throws {
        let scratch = try ScratchDirectory()
        let backend = FakeCompiler()
        let cache = CubinCache(directory: scratch.path)
        let compiler = KernelCompiler(backend: backend, cache: cache)
        let good = try compiler.compile(base)
        let file = cache.path(for: good.key)
        var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: file)))
        switch damage {
        case "empty": bytes = []
        case "truncated header": bytes = Array(bytes.prefix(50))
        case "truncated body": bytes.removeLast()
        case "garbage": bytes = (0..<bytes.count).map { UInt8(truncatingIfNeeded: $0 &* 37) }
        case "flipped byte": bytes[bytes.count - 3] ^= 0x20
        case "other key":
            let other = try compiler.compile(CompileRequest(name: "x.cu", source: "x", arch: base.arch))
            bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: cache.path(for: other.key))))
        case "extra byte": bytes.append(0)
        default: Issue.record("unknown damage")
        }
        try Data(bytes).write(to: URL(fileURLWithPath: file))
        let compilesBefore = backend.compiles

        let again = try compiler.compile(base)
        guard case .replacedCorrupt(let why) = again.cache else {
            Issue.record("\(damage): expected a corrupt entry, got \(again.cache)")
            return
        }
        #expect(!why.isEmpty)
        #expect(again.cubin == good.cubin && backend.compiles == compilesBefore + 1)
        #expect(try compiler.compile(base).cache == .hit)
    }

    @Test func failedCompilesAreNotCached() throws {
        let scratch = try ScratchDirectory()
        let failure = CUDAError.compileFailed(program: "moe.cu", arch: "sm_90a", log: "error: nope")
        let backend = FakeCompiler(failure: failure)
        let compiler = KernelCompiler(backend: backend, cache: CubinCache(directory: scratch.path))
        #expect(throws: failure) { _ = try compiler.compile(base) }
        #expect(throws: failure) { _ = try compiler.compile(base) }
        #expect(backend.compiles == 2 && compiler.cache?.entryCount() == 0)
    }

    @Test func anUnwritableCacheStillCompiles() throws {
        let scratch = try ScratchDirectory()
        let blocker = scratch.path + "/file"
        try Data("x".utf8).write(to: URL(fileURLWithPath: blocker))
        let compiler = KernelCompiler(backend: FakeCompiler(), cache: CubinCache(directory: blocker + "/cache"))
        let kernel = try compiler.compile(base)
        #expect(kernel.cache == .miss && !kernel.cubin.isEmpty)
        #expect(kernel.cacheWriteFailure?.contains(blocker) == true)
    }

    @Test func noCacheCompilesEveryTime() throws {
        let backend = FakeCompiler()
        let compiler = KernelCompiler(backend: backend, cache: nil)
        _ = try compiler.compile(base)
        let second = try compiler.compile(base)
        #expect(backend.compiles == 2 && second.cache == .disabled("disabled"))
        let homeless = KernelCompiler(backend: backend, environment: [:])
        #expect(homeless.cache == nil && homeless.cacheDisabledReason.contains("HOME"))
    }

    @Test func defaultDirectoryPrecedence() {
        let all = ["FLASHMOE_CACHE_DIR": "/a", "XDG_CACHE_HOME": "/x", "HOME": "/h"]
        #expect(CubinCache.defaultDirectory(environment: all) == "/a")
        #expect(CubinCache.defaultDirectory(environment: all.merging(["FLASHMOE_CACHE_DIR": ""]) { $1 }) == "/x/flashmoe")
        #expect(CubinCache.defaultDirectory(environment: ["HOME": "/h"]) == "/h/.cache/flashmoe")
        #expect(CubinCache.defaultDirectory(environment: [:]) == nil)
    }

    @Test func entriesRoundTripAndRejectAnEmptyCubin() {
        let key = SHA256.hash("k".utf8)
        let entry = CubinCache.encode(key: key, cubin: [1, 2, 3], log: "log ✓")
        #expect(entry.count == CubinCache.headerSize + 3 + "log ✓".utf8.count)
        #expect(CubinCache.decode(entry, key: key) == .hit(cubin: [1, 2, 3], log: "log ✓"))
        if case .corrupt = CubinCache.decode(CubinCache.encode(key: key, cubin: [], log: ""), key: key) {} else {
            Issue.record("an entry with no cubin must not be trusted")
        }
    }

    @Test func specsCompileWithTheHeadersOnly() throws {
        let scratch = try ScratchDirectory()
        func write(_ name: String, _ text: String) throws {
            try Data(text.utf8).write(to: URL(fileURLWithPath: "\(scratch.path)/\(name)"))
        }
        for (name, text) in ["main.cu": "#include \"x.cuh\"", "x.cuh": "X", "other.cu": "Y", "notes.txt": "ignored"] {
            try write(name, text)
        }
        let sources = KernelSources.directory(scratch.path)
        #expect(try sources.fileNames().sorted() == ["main.cu", "other.cu", "x.cuh"])
        #expect(try sources.program("main.cu").headers == ["x.cuh": "X"])
        // Another kernel file is not a header: editing it keeps main.cu's cubins; editing a header does not.
        let keyed = KernelCompiler(backend: FakeCompiler(), cache: nil)
        let key = { () throws -> [UInt8] in
            try keyed.compile(KernelSpec(file: "main.cu", kernels: ["k"]), arch: base.arch, sources: sources).key
        }
        let before = try key()
        try write("other.cu", "Z")
        #expect(try key() == before)
        try write("x.cuh", "X2")
        #expect(try key() != before)
        try write("x.cuh", "X")
        let compiler = KernelCompiler(backend: FakeCompiler(), cache: nil)
        let spec = KernelSpec(file: "main.cu", defines: ["T": "4"], kernels: ["k"])
        let kernel = try compiler.compile(spec, arch: base.arch, sources: sources)
        #expect(String(decoding: kernel.cubin, as: UTF8.self).hasPrefix("main.cu|") && kernel.name == "main.cu")
        #expect(String(decoding: kernel.cubin, as: UTF8.self).contains("-DT=4"))
        #expect(throws: CUDAError.self) {
            _ = try compiler.compile(KernelSpec(file: "absent.cu", kernels: []), arch: base.arch, sources: sources)
        }
    }
}
