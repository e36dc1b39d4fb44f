extension CPUBackend: BenchmarkableBackend {
    /// Times `iterations` forward passes on `input` with the wall clock (`ContinuousClock`), after `warmup`
    /// untimed ones. Each sample covers one whole `forward` call: routing, expert GEMMs, combine and the
    /// allocation of the output; the weights were packed at init and are not part of it.
    ///
    /// Throws `MoEError.invalidInput` when `warmup` is negative or `iterations` is below 1, and whatever
    /// `forward` throws for a wrong input shape.
    public func benchmark(input: HostTensor, warmup: Int, iterations: Int) throws(MoEError) -> BenchmarkResult {
        guard warmup >= 0 else {
            throw MoEError(.invalidInput, "the warm-up count must be 0 or more (got \(warmup))")
        }
        guard iterations >= 1 else {
            throw MoEError(.invalidInput, "the iteration count must be at least 1 (got \(iterations))")
        }
        try layer.checkInput(input)
        for _ in 0..<warmup { _ = try forward(input) }
        let clock = ContinuousClock()
        var samples: [Double] = []
        samples.reserveCapacity(iterations)
        for _ in 0..<iterations {
            let start = clock.now
            _ = try forward(input)
            samples.append((clock.now - start).milliseconds)
        }
        return BenchmarkResult(samples: samples, method: "wall clock", workspaceBytes: nil)
    }
}
