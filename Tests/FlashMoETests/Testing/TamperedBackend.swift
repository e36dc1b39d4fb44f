@testable import FlashMoE

/// The fast CPU backend with a planted bug: `edit` changes every result before it is returned.
struct Tampered: MoEBackend {
    let inner: CPUBackend
    let edit: @Sendable (inout MoEOutput) throws -> Void
    var name: String { "tampered" }
    var layer: MoELayer { inner.layer }
    func forward(_ input: HostTensor) throws -> MoEOutput {
        var out = try inner.forward(input)
        try edit(&out)
        return out
    }

    /// The fast CPU backend of `layer`, with `edit` applied to every result.
    static func fast(_ layer: MoELayer, edit: @escaping @Sendable (inout MoEOutput) throws -> Void) throws -> Tampered {
        Tampered(inner: try CPUBackend(layer: layer, mode: .fast), edit: edit)
    }

    /// Every output element multiplied by `factor` (NaN models an element the kernel never wrote).
    static func scaled(_ layer: MoELayer, by factor: Float) throws -> Tampered {
        try fast(layer) { out in
            out.output = try HostTensor(shape: out.output.shape, float32: out.output.floats().map { $0 * factor })
        }
    }

    /// Every output element 5 % too large.
    static func scaled(_ layer: MoELayer) throws -> Tampered { try scaled(layer, by: 1.05) }

    /// Every token's last rank reported unrouted, as a kernel that lost it would.
    static func lastRankDropped(_ layer: MoELayer) throws -> Tampered {
        try fast(layer) { out in
            let k = out.routing.topK
            for t in 0..<out.routing.tokens {
                (out.routing.expertIDs[t * k + k - 1], out.routing.slots[t * k + k - 1]) = (-1, -1)
            }
        }
    }
}
