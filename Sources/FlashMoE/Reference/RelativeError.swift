/// The relative error ‖a − b‖₂ / ‖b‖₂ of `a` against the reference `b`, in Float64.
///
/// Defined for every input, so a comparison `relativeError(a, b) <= tolerance` never passes by accident:
/// - positions where a and b hold the same value (equal infinities included) or are both NaN contribute 0;
/// - any other position where either value is NaN or infinite makes the result NaN (a NaN in `a` where `b` is
///   finite, an infinity that does not match, …), and NaN fails every `<=` test;
/// - arrays of different lengths give NaN;
/// - when ‖b‖ = 0 the result is 0 if a matches b exactly and +∞ otherwise.
public func relativeError(_ a: [Float], _ b: [Float]) -> Double {
    guard a.count == b.count else { return .nan }
    var diff = 0.0, ref = 0.0
    for (x, y) in zip(a, b) {
        if x == y || (x.isNaN && y.isNaN) {
            if y.isFinite { ref += Double(y) * Double(y) }
            continue
        }
        guard x.isFinite && y.isFinite else { return .nan }
        let d = Double(x) - Double(y)
        diff += d * d
        ref += Double(y) * Double(y)
    }
    if ref == 0 { return diff == 0 ? 0 : .infinity }
    return (diff / ref).squareRoot()
}
