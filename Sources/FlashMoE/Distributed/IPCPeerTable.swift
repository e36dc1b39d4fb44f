import CCUDA
import Synchronization

/// Every rank's exchange buffers as this process sees them: its own arena, and each peer's mapped through CUDA
/// IPC. The mappings are held (and unmapped when this goes away).
///
/// The control block lives inside the arena, so a rank shares one allocation (one handle, one mapping per peer):
/// its `Sync` (256 bytes) and, on rank 0, the group's error record (the next 256). Every rank's kernel reports
/// into rank 0's record, so one rank's expired wait stops all of them.
public final class IPCPeerTable: @unchecked Sendable {
    // @unchecked: immutable after init but for `mappings`, a Mutex.

    /// Each rank's arena base address in this process (index = rank).
    public let arenaBases: [UInt64]
    /// Each rank's control block address in this process.
    public let controlBases: [UInt64]
    /// Each rank's `RankParts.peerRegions` offsets in its arena.
    public let offsets: [[Int]]
    /// Each rank's GPU, as it described it ("GPU 0 (NVIDIA H200)").
    public let gpus: [String]
    private let mappings: Mutex<[IPCMapping]>

    /// The group's error record (in rank 0's control block).
    public var errorRecordAddress: UInt64 { controlBases[0] + 256 }

    /// The kernel's `Peer` table (every rank's entry, in rank order).
    public var peerTable: [UInt8] {
        RankParts.peerTable(arenaBases: arenaBases, offsets: offsets, controlBases: controlBases)
    }

    /// Exports `arena` (on `device`), all-gathers every rank's handle through `rendezvous`, maps every peer's,
    /// then all-gathers whether every rank could: a rank that could not map a peer makes every rank throw the same
    /// `PeerMappingError`, before any launch.
    ///
    /// - Parameters:
    ///   - controlOffset: where the control block starts in `arena` (512 bytes).
    ///   - offsets: this rank's `RankParts.peerRegions` offsets in `arena`.
    public init(
        rendezvous: any RankExchange, device: CUDADevice, arena: DeviceBuffer<UInt8>, controlOffset: Int, offsets: [Int]
    ) throws {
        let me = rendezvous.rank
        let gpu = "GPU \(device.properties.ordinal) (\(device.properties.name))"
        let mine = RendezvousRecord([
            "arena": RendezvousRecord.hex(try arena.ipcHandle().bytes), "arena_bytes": "\(arena.byteCount)",
            "control": "\(controlOffset)", "offsets": offsets.map(String.init).joined(separator: ","), "gpu": gpu,
        ])
        let records = try rendezvous.allGather("memory handles", mine.bytes).map(RendezvousRecord.init(bytes:))
        gpus = records.map { $0["gpu"] ?? "an unknown GPU" }
        var arenaBases: [UInt64] = [], controlBases: [UInt64] = [], offsetLists: [[Int]] = [], mappings: [IPCMapping] = []
        var failure: PeerMappingError?
        for (q, r) in records.enumerated() {
            let parsed = (r["offsets"] ?? "").split(separator: ",").compactMap { Int($0) }
            offsetLists.append(parsed)
            if q == me {
                arenaBases.append(arena.address)
                controlBases.append(arena.address + UInt64(controlOffset))
                continue
            }
            guard failure == nil else { continue }
            do {
                guard parsed.count == RankParts.peerRegions.count, let control = r.int("control"),
                    let a = RendezvousRecord.bytes(fromHex: r["arena"] ?? "")
                else { throw MoEError(.invalidInput, "its record of handles is malformed") }
                let map = try IPCMapping(device: device, handle: IPCHandle(bytes: a), byteCount: r.int("arena_bytes") ?? 0)
                mappings.append(map)
                arenaBases.append(map.address)
                controlBases.append(map.address + UInt64(control))
            } catch {
                failure = PeerMappingError(rank: me, gpu: gpu, peer: q, peerGPU: gpus[q], detail: "\(error)")
            }
        }
        // Everyone learns whether everyone mapped everyone: no rank launches into a group with a hole.
        let verdict = failure.map {
            RendezvousRecord(["ok": "0", "peer": "\($0.peer)", "detail": $0.detail])
        } ?? RendezvousRecord(["ok": "1"])
        let verdicts = try rendezvous.allGather("memory mapped", verdict.bytes).map(RendezvousRecord.init(bytes:))
        if let failure { throw failure }
        for (q, v) in verdicts.enumerated() where v["ok"] != "1" {
            let peer = v.int("peer") ?? -1
            throw PeerMappingError(
                rank: q, gpu: gpus[q], peer: peer, peerGPU: peer >= 0 && peer < gpus.count ? gpus[peer] : "?",
                detail: v["detail"] ?? "unknown")
        }
        self.arenaBases = arenaBases
        self.controlBases = controlBases
        self.offsets = offsetLists
        self.mappings = Mutex(mappings)
    }

    /// The number of peer allocations this process holds mapped.
    public var mappedCount: Int { mappings.withLock { $0.count } }

    /// Unmaps every peer's memory now (before the peers free it); the addresses are invalid afterwards.
    public func unmap() { mappings.withLock { $0 = [] } }
}
