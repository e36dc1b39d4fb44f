// FlashMoE's fused forward: a whole MoE layer in one persistent, cooperative launch.
//
// Roles: every CTA is a worker; work comes from device-side counters, never from the host.
//
// Phases of one launch (epoch = the launch number, kept and advanced by the device: on one GPU by finish_launch,
// for ranks by each rank's last block out, both in sched_launch.cuh):
//   1. Gate. Tasks (token tile of 128, expert tile, K slice) from a ticket counter: logits = x·Wgᵀ in FP32 (a
//      launch of at most 8 tokens, 16-bit router: a task per router row, gate_gemv.cuh). Then,
//      on the same counter, route tasks of 8 tokens wait for their tile's gate tasks and route a token per warp
//      (router.cuh), writing ids and weights; the tile's last route task ranks the tile (each pair's rank among the
//      tile's tokens routed to the same expert, and the tile's per-expert counts). The CTA that ranks the last tile
//      scans the counts (per expert over tiles) and publishes the scan with the epoch (routing_tasks.cuh).
//   2. Place. After the scan, a pair's slot in its expert is base[tile][e] + rank: the number of lower-index tokens
//      routed there, so slots and capacity drops never depend on timing. Kept pairs get a global row; each token
//      learns how many contributions it waits for. Grid barrier. (Decode prefix, one GPU and at most 8 tokens: the
//      block that routes them also ranks, scans and places them and releases it all with the scan flag; no grid
//      barrier, phase_place.cuh.)
//   3. Experts. One ticket counter hands out GEMM0 tasks (x, m, n) in (expert, row block, column tile) order,
//      then GEMM1 tasks. A GEMM0 tile computes act(x·W1ᵀ + b1) (or act(g)·u) for 128 gathered rows. The CTA whose
//      tile completes a row block's GEMM0 publishes the row block into a ring; GEMM1 tickets map to ring slots in
//      publication order, so every ticket ahead of a waiting one belongs to work that needs no wait: no deadlock.
//   4. Combine. The CTA whose GEMM1 tile completes a row block counts one contribution for each token in it; the
//      contribution that completes a token puts it on a combine list; idle warps sum each listed token's k expert
//      rows in rank order (plus the shared expert) and write y once (a few tokens split over several warps by
//      columns). No float atomics: the same bits every run.
// The shared expert is the last expert of the task space: every token is a row of it, and its gate, when present,
// is an extra row of the router weight.
//
// Ranks (FMOE_RANKS = R > 1, expert parallelism; fmoe_forward_ranks): a launch runs one or more ranks (all R on
// one GPU, or one GPU's share of them, its blocks split into groups, one per rank), each with its own tokens,
// buffers and counters; rank r owns a contiguous block of experts. Phase 1 is per rank. Then every rank
// all-gathers the per-expert counts (capacity follows the global token order, and each expert's rows sit in its
// owner's receive buffer in global order, so rows, tiles and bits equal one rank's) and stores each routed row
// straight into the owner's receive buffer. When its last row for an expert is stored, the source fences at
// system scope and publishes one 8-byte flag (epoch << 32 | rows) in the owner's memory; a pair with no rows gets
// the same flag with 0 rows. Flags are never cleared: the epoch of the next launch supersedes them. An owner's
// GEMM0 for a row block starts once the sources in that block have flagged. GEMM1 epilogues write straight into
// the source's return buffer and count the token's contribution there (system-scope atomics); the source combines
// its own tokens. No grid barrier: every dependency is a flag or a counter with a bounded wait.
//
// Files: moe_params.cuh (specialisation, shapes, Params/Peer/Sync), task_space.cuh (the Layout and its scans),
// phase_gate.cuh (phase 1; routing_tasks.cuh its routing, ranking and scan, gate_gemv.cuh the decode gate),
// phase_place.cuh (phase 2 and the decode prefix),
// phase_dispatch.cuh (ranks: count exchange and dispatch), phase_experts.cuh (phase 3's scheduler; its tiles in
// expert_tiles.cuh, and decode_tiles.cuh, where gemv.cuh runs the tiles of experts with at most 8 rows as
// weight-streaming GEMVs, fp8 by default), phase_combine.cuh
// (phase 4), sched_launch.cuh (the phases in order, the last block out); this file holds the entry points.
#include "moe_params.cuh"
#include "sched_launch.cuh"

using namespace fmoe;

// One GPU. The epoch is not an argument: every block reads the device epoch (sync->epoch, advanced by the previous
// launch's last block out) and adds one, so the same launch replays correctly from a CUDA graph.
// FMOE_TMA builds (common.cuh): 384 threads and a second parameter, the TMA operands' tensor maps; the last
// warpgroup leaves for the TMA engine's producer at once (phase_experts_tma.cuh) and the first 256 threads run every
// phase, with the registers the producer gives up.
extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, 1) fmoe_forward(const __grid_constant__ Params p
#if FMOE_TMA
                                                                           , const __grid_constant__ TmaMaps maps
#endif
) {
    extern __shared__ __align__(1024) char smem_raw[];
    // wgmma's 128-byte swizzle atoms need 1024-byte aligned stages; the host adds 1 KiB of slack.
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    __shared__ Params sp;
#if FMOE_TMA
    // The role test reads %tid.x through its own instruction: with threadIdx.x there, the compiler kept that one read
    // for every later use, live across both roles' setmaxnreg, and ptxas spilled it to local memory and reloaded it
    // in every phase (the fp8 TMA kernels' 28 B of spills, with the producer's; NVRTC 13.0, round 25).
    const u32 role_tid = fresh_tid();
    if (role_tid >= PHASE_THREADS) {
        tma_producer_main(p, sp, maps, smem);
        return;
    }
    regs_alloc<TMA_CONSUMER_REGS_FUSED>();
    if (FMOE_TID == 0) {
        s_tma.maps = &maps;
        s_tma.handed = 0;
    }
    tma_rendezvous();
#endif
    static_assert(sizeof(Params) % 4 == 0, "Params is copied in 32-bit words");
    for (int i = FMOE_TID; i < (int)(sizeof(Params) / 4); i += THREADS) ((u32 *)&sp)[i] = ((const u32 *)&p)[i];
    if (FMOE_TID == 0) { s_cta = blockIdx.x; s_ctas = gridDim.x; }
    sync_block();
    __shared__ int s_aborted;
    if (FMOE_TID == 0) {
        sp.epoch = ld_relaxed_u64(&p.sync->epoch) + 1;
        s_aborted = aborted(p.err);
    }
    sync_block();
    // A launch queued after a fault the host has not seen yet (a graph replay, launches queued back to back) runs
    // nothing: the counters are mid-protocol until the host resets them. Its last block still mirrors the record.
    if (!s_aborted) forward(sp, smem);
#if FMOE_TMA
    // A launch that ended before the expert phase (or ran none) still releases the producer, which waits for it.
    sync_block();
    if (!s_tma.handed) tma_hand_over(nullptr, false);
#endif
    finish_launch(sp);
}

// The ranks this launch runs: with `table` (all R on one GPU, or this GPU's share), blocks [i·blocks_per_rank,
// (i+1)·blocks_per_rank) run the i-th rank of the table with its parameters; with a null table, the one rank
// `one`, passed by value as on one GPU (a process's rank on the caller's stream: a CUDA graph captures the
// parameters with the launch, no copy into a table that a replay would have to repeat). As on one GPU, the epoch
// is not an argument: each rank's blocks read it from the rank's own Sync, so the same launch can be queued back
// to back or replayed from a CUDA graph. With R > 1 the rank's epoch is its done_epoch + 1: done_epoch is stored
// only by the rank's last block out (sched_launch.cuh), after every block of the rank has arrived there, so every
// block of this launch read the same value before any block could advance it, and the rank's next launch (same
// stream) starts after that store. Every rank runs every forward, so all ranks hold the same epoch in the same
// launch. A group of one runs the one-GPU path, whose epoch is sync->epoch, kept and wrapped by finish_launch
// exactly as fmoe_forward's.
extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, 1) fmoe_forward_ranks(const Params *__restrict__ table,
                                                                                 int blocks_per_rank,
                                                                                 const __grid_constant__ Params one) {
#if FMOE_TMA
    // Never launched: the host builds FMOE_TMA kernels for one-GPU operators only (FusedSpecialization).
    __trap();
#endif
    extern __shared__ __align__(1024) char smem_raw[];
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    __shared__ Params sp;
    __shared__ int s_run;
    if (FMOE_TID == 0) {
        sp = table != nullptr ? table[blockIdx.x / blocks_per_rank] : one;
        s_cta = blockIdx.x % blocks_per_rank;
        s_ctas = blocks_per_rank;
        sp.epoch = ld_relaxed_u64(RANKS == 1 ? &sp.sync->epoch : &sp.sync->done_epoch) + 1;
        // A launch queued after a fault (a graph replay, launches queued back to back) runs nothing: the group is
        // unusable until it is created again (the host resets nothing in place). The record is rank 0's, shared.
        s_run = !aborted(sp.err);
        // Ranks cannot wrap the 32-bit epoch tags on the device: a peer of the launch after a wrap would wait for
        // done_epoch >= 0 and write into this rank before it cleared its flags. The host wraps between eager
        // calls (every rank idle, barriers on both sides); a launch past epoch_wrap that the host never saw (graph
        // replays) refuses to run with FMOE_ERR_EPOCH_LIMIT. Every rank is at the same epoch, so every rank
        // refuses in the same launch and none waits for another.
        if (RANKS > 1 && s_run && sp.epoch > sp.epoch_wrap) {
            report_error(sp.err, FMOE_ERR_EPOCH_LIMIT, 0u, 0u, (u32)sp.rank, sp.epoch_wrap, sp.epoch);
            s_run = 0;
        }
    }
    sync_block();
    if (s_run) forward(sp, smem);
    if (RANKS == 1) finish_launch(sp);  // every block gets here (exits are block-uniform); one rank per launch
}

// Read by the host through cuModuleGetGlobal: the dynamic shared memory to launch with, and the row-block size of
// the gated W1/W3 packing (EBN / 2), so host and kernel can never disagree.
extern "C" __device__ const int fmoe_dynamic_smem = DYNAMIC_SMEM;
extern "C" __device__ const int fmoe_gated_pack_rows = EBN / 2;
extern "C" __device__ const int fmoe_params_bytes = (int)sizeof(Params);
extern "C" __device__ const int fmoe_gate_tiles = NTE;  // expert tiles of the gate GEMM (for the host's K split)
extern "C" __device__ const int fmoe_router_rows = EG;  // rows of the gate GEMM (for the host's K split)
// The most tokens of a launch whose gate the host may ask to run as gate_gemv.cuh's dot products (0: never).
extern "C" __device__ const int fmoe_gate_gemv_tokens = GATE_GEMV_ON ? GATE_GEMV_TOKENS : 0;
extern "C" __device__ const int fmoe_peer_bytes = (int)sizeof(Peer);
// Threads per block (256; 384 in FMOE_TMA builds) and, FMOE_TMA builds, the bytes of the tensor-map parameter.
extern "C" __device__ const int fmoe_block_threads = BLOCK_THREADS;
#if FMOE_TMA
extern "C" __device__ const int fmoe_tma_maps_bytes = (int)sizeof(TmaMaps);
#else
extern "C" __device__ const int fmoe_tma_maps_bytes = 0;
#endif
// Params' size, then each field's byte offset in declaration order, written by fmoe_params_probe (NVRTC has no
// constant offsetof): the host runs the probe once at load and compares its own encoding field by field
// (FusedParams.checkLayout), so a field added on one side only is caught before any forward.
#if FMOE_NVSHMEM
// Relocatable (LTO) builds read `extern` as a declaration: a linkage block makes it the definition.
extern "C" {
__device__ int fmoe_params_layout[60];
}
#else
extern "C" __device__ int fmoe_params_layout[60];
#endif
extern "C" __global__ void fmoe_params_probe() {
    Params q;
    const char *b = (const char *)&q;
#define FMOE_OFF(f) (int)((const char *)&q.f - b)
    const int layout[60] = {
        (int)sizeof(Params), FMOE_OFF(x), FMOE_OFF(wg), FMOE_OFF(sel_bias), FMOE_OFF(w1), FMOE_OFF(w2), FMOE_OFF(b1),
        FMOE_OFF(b2), FMOE_OFF(ws1), FMOE_OFF(ws2), FMOE_OFF(y), FMOE_OFF(ids), FMOE_OFF(weights), FMOE_OFF(slot_row),
        FMOE_OFF(logits), FMOE_OFF(logits_part), FMOE_OFF(rank_in_tile), FMOE_OFF(shared_gate), FMOE_OFF(tile_done),
        FMOE_OFF(counts), FMOE_OFF(base), FMOE_OFF(expert_load), FMOE_OFF(row_start), FMOE_OFF(rb_start),
        FMOE_OFF(task0_start), FMOE_OFF(row_token), FMOE_OFF(target), FMOE_OFF(pending), FMOE_OFF(done0),
        FMOE_OFF(done1), FMOE_OFF(ring), FMOE_OFF(combine_list), FMOE_OFF(hbuf), FMOE_OFF(hs), FMOE_OFF(ybuf),
        FMOE_OFF(ys), FMOE_OFF(sync), FMOE_OFF(err), FMOE_OFF(peers), FMOE_OFF(tile_dispatched), FMOE_OFF(rows_sent),
        FMOE_OFF(err_mirror), FMOE_OFF(xq), FMOE_OFF(xq_scale), FMOE_OFF(hq), FMOE_OFF(hq_scale), FMOE_OFF(hq_done), FMOE_OFF(tokens), FMOE_OFF(capacity), FMOE_OFF(rank), FMOE_OFF(gate_ksplit),
        FMOE_OFF(row_blocks), FMOE_OFF(max_tokens), FMOE_OFF(part_rows), FMOE_OFF(y_storage), FMOE_OFF(inject_fault),
        FMOE_OFF(pad), FMOE_OFF(epoch), FMOE_OFF(budget_ns), FMOE_OFF(epoch_wrap)};
#undef FMOE_OFF
    for (int i = 0; i < 60; ++i) fmoe_params_layout[i] = layout[i];
}
