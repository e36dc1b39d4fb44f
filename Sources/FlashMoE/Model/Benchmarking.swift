/// The timing of repeated forward passes of one backend on one input.
public struct BenchmarkResult: Sendable, Hashable {
    /// Milliseconds per forward pass, one entry per timed run, in run order.
    public var samples: [Double]
    /// How the time was taken (for example "CUDA events around each launch" or "wall clock").
    public var method: String
    /// Device workspace the backend keeps for this token count, in bytes (nil for host backends).
    public var workspaceBytes: Int?

    /// A result from `samples` (milliseconds, in run order); `workspaceBytes` is nil for host backends.
    public init(samples: [Double], method: String, workspaceBytes: Int? = nil) {
        self.samples = samples
        self.method = method
        self.workspaceBytes = workspaceBytes
    }

    /// The median sample (the mean of the two middle ones for an even count); 0 when there are none.
    public var medianMilliseconds: Double { median(samples) }

    /// The fastest sample; 0 when there are none.
    public var minimumMilliseconds: Double { samples.min() ?? 0 }
}

/// The median of `values` (the mean of the two middle ones for an even count); 0 when there are none.
public func median(_ values: [Double]) -> Double {
    let s = values.sorted()
    guard !s.isEmpty else { return 0 }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// A backend that can time its own forward pass: warm-up runs first, then `iterations` timed runs.
///
/// GPU backends time with device events around each launch (no host work inside the interval); host backends
/// use the wall clock.
public protocol BenchmarkableBackend: MoEBackend {
    /// Runs `warmup` untimed forwards, then `iterations` timed ones, all on `input`.
    func benchmark(input: HostTensor, warmup: Int, iterations: Int) throws -> BenchmarkResult
}
