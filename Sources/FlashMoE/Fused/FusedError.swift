/// What the fused kernel reports when it gives up instead of hanging.
///
/// Every wait in the kernel has a time budget; when one expires the kernel records what it waited for, raises an
/// abort flag that makes every other block leave, and the host turns the record into this error.
public struct FusedKernelError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Where the wait was.
    public enum Phase: UInt32, Sendable, Hashable {
        case scan = 1, barrier = 2, task = 3, dispatch = 4, combine = 6, counts = 7, peerDone = 8, tiles = 9, gate = 10
        case xCodes = 11

        var what: String {
            switch self {
            case .scan: "the routing scan to be published"
            case .barrier: "the grid barrier after placement"
            case .task: "a GEMM1 row block to be published"
            case .dispatch: "a source's rows for an expert (its row flag)"
            case .combine: "a token to reach the combine list"
            case .counts: "a rank's per-expert counts"
            case .peerDone: "a peer rank to finish the previous launch"
            case .tiles: "this rank's token tiles to be prepared for dispatch"
            case .gate: "a token tile's router logits (every gate task of the tile), to route it"
            case .xCodes: "every block of this rank to quantize its share of x to E4M3 (fp8 dispatch)"
            }
        }
    }

    /// The phase, when the kernel named a known one.
    public let phase: Phase?
    /// Which flag: the barrier number, the ring position, the (source, expert) pair…
    public let index: Int
    /// The rank whose wait expired (0 on one GPU).
    public let rank: Int
    /// The value waited for and the last value seen (epoch-tagged flags carry the epoch in the high 32 bits).
    public let expected: UInt64
    /// The last value seen at the flag (epoch-tagged flags carry the epoch in the high 32 bits, as in `expected`).
    public let seen: UInt64
    /// The raw error code (1 = a wait expired, `badFlagCode` = a row flag with the wrong count).
    public let code: UInt32

    /// `FMOE_ERR_BAD_FLAG` in sync.cuh: a (source, expert) flag of this epoch carried a row count other than the
    /// one the count all-gather announced.
    public static let badFlagCode: UInt32 = 4

    /// What the kernel waited for (the phase), the flag index, rank, expected and seen values (with their epochs when
    /// tagged), and that the GPU was not left hanging.
    public var description: String {
        let what = phase?.what ?? "phase \(code)"
        let epoch = expected >> 32 != 0 ? " (epoch \(expected >> 32), last seen epoch \(seen >> 32))" : ""
        return "the fused kernel gave up waiting for \(what): index \(index), rank \(rank), expected \(expected), "
            + "saw \(seen)\(epoch). The GPU was not left hanging; this is a protocol bug or an injected fault."
    }

    /// Decodes the kernel's 40-byte error record (`ErrorRecord` in sync.cuh); nil when it holds no error.
    static func decode(_ bytes: [UInt8]) -> FusedKernelError? {
        func u32(_ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(bytes[o + $1]) << (8 * $1) } }
        func u64(_ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(bytes[o + $1]) << (8 * $1) } }
        guard bytes.count >= 40 else { return nil }
        let code = u32(0)
        guard code != 0 else { return nil }
        return FusedKernelError(
            phase: Phase(rawValue: u32(4)), index: Int(u32(8)), rank: Int(u32(12)), expected: u64(16),
            seen: u64(24), code: code)
    }
}
