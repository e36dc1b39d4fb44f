/// Every rank's exchange buffers on NVSHMEM's symmetric heap, as this PE's kernel addresses them (PE = rank).
///
/// Each rank's arena is one `nvshmem_malloc` of the same size on every PE (the largest any rank needs), so an
/// offset means the same place in every PE's copy. A peer's `Peer` entry holds, per region, the address where that
/// PE's copy is mapped here (`nvshmem_ptr`: this GPU, or a peer over NVLink / PCIe), so the kernel's plain stores
/// reach it as with CUDA IPC; or, when it is not mapped (another node), the symmetric address itself (this PE's
/// arena plus the peer's offset), which the kernel's NVSHMEM calls take with the peer's PE number (see
/// `transport_nvshmem.cuh`). The group's error record is rank 0's when rank 0 is mapped, else this rank's own (a
/// fault then stops the ranks of each node through their own bounded waits, not through one shared record).
public struct NVSHMEMPeerTable: Sendable, Hashable {
    /// Each rank's arena as the kernel addresses it (index = rank).
    public let arenaBases: [UInt64]
    /// Each rank's control block (its `Sync`) as the kernel addresses it.
    public let controlBases: [UInt64]
    /// Each rank's `RankParts.peerRegions` offsets in its arena.
    public let offsets: [[Int]]
    /// Whether each rank's copy is mapped here (plain stores) rather than reached by NVSHMEM calls.
    public let mapped: [Bool]
    /// The error record every wait of this rank reports into.
    public let errorRecordAddress: UInt64

    /// The kernel's `Peer` table (every rank's entry, in rank order).
    public var peerTable: [UInt8] {
        RankParts.peerTable(arenaBases: arenaBases, offsets: offsets, controlBases: controlBases)
    }

    /// The table for rank `me`, whose arena is the symmetric address `arena`, from every rank's control offset and
    /// region offsets; `map(address, pe)` is `nvshmem_ptr` (nil: not mapped here).
    public init(me: Int, arena: UInt64, controls: [Int], offsets: [[Int]], map: (UInt64, Int) -> UInt64?) {
        var bases: [UInt64] = [], controlBases: [UInt64] = [], mapped: [Bool] = []
        for q in controls.indices {
            let base = q == me ? arena : map(arena, q)
            bases.append(base ?? arena)
            controlBases.append((base ?? arena) + UInt64(controls[q]))
            mapped.append(base != nil)
        }
        arenaBases = bases
        self.controlBases = controlBases
        self.offsets = offsets
        self.mapped = mapped
        errorRecordAddress = (mapped[0] ? controlBases[0] : controlBases[me]) + 256
    }

    /// All-gathers every rank's control and region offsets through `rendezvous` and maps them with `shmem`.
    public init(
        rendezvous: any RankExchange, shmem: NVSHMEMLibrary, arena: UInt64, controlOffset: Int, offsets: [Int]
    ) throws {
        let mine = RendezvousRecord([
            "control": "\(controlOffset)", "offsets": offsets.map(String.init).joined(separator: ","),
        ])
        let records = try rendezvous.allGather("nvshmem offsets", mine.bytes).map(RendezvousRecord.init(bytes:))
        var controls: [Int] = [], lists: [[Int]] = []
        for (q, r) in records.enumerated() {
            let parsed = (r["offsets"] ?? "").split(separator: ",").compactMap { Int($0) }
            guard let control = r.int("control"), parsed.count == RankParts.peerRegions.count else {
                throw MoEError(.invalidInput, "rank \(q)'s record of NVSHMEM offsets is malformed")
            }
            controls.append(control)
            lists.append(parsed)
        }
        self.init(me: rendezvous.rank, arena: arena, controls: controls, offsets: lists) {
            shmem.peerAddress($0, pe: $1)
        }
    }
}
