import Dispatch

/// The number of worker threads the CPU code uses: the active processor count.
public var cpuWorkerCount: Int {
    max(1, sysconfActiveProcessors())
}

#if canImport(Glibc)
import Glibc
private func sysconfActiveProcessors() -> Int { Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) }
#elseif canImport(Darwin)
import Darwin
private func sysconfActiveProcessors() -> Int { Int(sysconf(_SC_NPROCESSORS_ONLN)) }
#else
private func sysconfActiveProcessors() -> Int { 1 }
#endif

/// Splits `0..<count` into contiguous chunks of at least `minimumChunk` and runs `body` on them in parallel.
/// Returns after every chunk is done. `body` must only write disjoint memory per chunk.
public func parallelChunks(count: Int, minimumChunk: Int = 1, _ body: @Sendable (Range<Int>) -> Void) {
    guard count > 0 else { return }
    let workers = cpuWorkerCount
    let chunks = max(1, min(workers * 4, count / max(1, minimumChunk)))
    if chunks == 1 {
        body(0..<count)
        return
    }
    let per = (count + chunks - 1) / chunks
    DispatchQueue.concurrentPerform(iterations: chunks) { c in
        let lo = c * per, hi = min(count, lo + per)
        if lo < hi { body(lo..<hi) }
    }
}

/// `values.map(transform)`, in chunks of at least `minimumChunk` on the CPU workers; the result is in input order.
/// For element conversions of whole weight stacks (DeepSeek-V3's experts are 11 G values: tens of seconds on one
/// thread).
public func parallelMap<T: Sendable, U>(
    _ values: [T], minimumChunk: Int = 1 << 16, _ transform: @Sendable (T) -> U
) -> [U] {
    [U](unsafeUninitializedCapacity: values.count) { buffer, initialized in
        // Each chunk initializes a disjoint range of the buffer.
        nonisolated(unsafe) let base = buffer.baseAddress
        values.withUnsafeBufferPointer { source in
            nonisolated(unsafe) let input = source.baseAddress
            parallelChunks(count: values.count, minimumChunk: minimumChunk) { range in
                for i in range { (base! + i).initialize(to: transform(input![i])) }
            }
        }
        initialized = values.count
    }
}
