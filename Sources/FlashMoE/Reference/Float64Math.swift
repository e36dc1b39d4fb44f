/// Σ a[i]·b[i] in Float64 with four interleaved partial sums (independent add chains keep the FPU busy; the
/// oracle's error budget is far below FP32's, so the summation order does not matter).
@inline(__always)
func dotFloat64(_ a: UnsafePointer<Double>, _ b: UnsafePointer<Double>, _ n: Int) -> Double {
    var s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    var i = 0
    while i + 4 <= n {
        s0 += a[i] * b[i]
        s1 += a[i + 1] * b[i + 1]
        s2 += a[i + 2] * b[i + 2]
        s3 += a[i + 3] * b[i + 3]
        i += 4
    }
    while i < n {
        s0 += a[i] * b[i]
        i += 1
    }
    return (s0 + s1) + (s2 + s3)
}

extension HostTensor {
    /// Copies `count` elements from flat index `offset` into `out` as Float64, through the FP32 `scratch`
    /// (at least `count` floats).
    func copyDoubles(
        offset: Int, count: Int, into out: UnsafeMutablePointer<Double>, scratch: UnsafeMutablePointer<Float>
    ) {
        copyFloats(offset: offset, count: count, into: scratch)
        for i in 0..<count { out[i] = Double(scratch[i]) }
    }
}
