// Phase 1 of the fused kernel: the gate tasks and the routing tasks on one ticket counter, then the wait for the
// scan (routing_tasks.cuh; the decode prefix, phase_place.cuh). See moe.cu.
#pragma once
#include "moe_params.cuh"
#include "phase_dispatch.cuh"
#include "phase_fp8.cuh"
#include "gate_gemv.cuh"
#include "routing_tasks.cuh"
#include "phase_place.cuh"

namespace fmoe {

FMOE_DEVICE bool gate_phase(const Params &p, char *smem, Layout &L) {
    FMOE_TRACE_SCOPE(FMOE_EV_GATE_PHASE, -1, 0, 0);
    __shared__ int s_task, s_ok;
    const int tiles = (p.tokens + BT - 1) / BT;
    // Decode: a task per router row (gate_gemv.cuh), one token tile, logits written whole (no K slices).
    const bool gemv = gate_gemv(p);
    const int ks_count = gemv ? 1 : gate_k_split(p);
    constexpr int KSLICES = (H * (int)sizeof(T) + ROW_BYTES - 1) / ROW_BYTES;
    const int slices_per = (KSLICES + ks_count - 1) / ks_count;
    const int gate_tasks = gemv ? tiles * EG : tiles * NTE * ks_count;
    // tile_done[tile] counts the tile's gate tasks, then its route tasks.
    const int gate_done = gemv ? EG : NTE * ks_count;
    const int route_tokens = route_task_tokens(p), route_per_tile = BT / route_tokens;
    const int tasks = gate_tasks + tiles * route_per_tile;
    // Ranks: a rank without tokens still takes part in the count exchange (all zeros).
    if (RANKS > 1 && tiles == 0 && cta() == 0) finish_scan(p, 0);
    if (FMOE_TID == 0) s_ok = 1;
    for (;;) {
        // Every thread has read the previous task before thread 0 overwrites it (a task past its tile's last token
        // continues right after the read; without this barrier a slow warp could read the next task instead).
        sync_block();
        if (FMOE_TID == 0) s_task = atomicAdd(&p.sync->gate_ticket, 1);
        sync_block();
        const int task = s_task;
        if (task >= tasks) break;
        if (task >= gate_tasks) {
            // A route task: route_tokens tokens of a tile whose gate tasks have all finished (every gate ticket
            // was taken before this one, by blocks that are running, so the wait ends).
            const int tile = (task - gate_tasks) / route_per_tile;
            const int chunk = (task - gate_tasks) % route_per_tile;
            const int in_tile = min(BT, p.tokens - tile * BT);
            const int chunks = (in_tile + route_tokens - 1) / route_tokens;
            if (chunk >= chunks) continue;  // block-uniform: past the tile's last token
            FMOE_TRACE_SCOPE(FMOE_EV_ROUTE, -1, tile, chunk);
            const int t0 = tile * BT + chunk * route_tokens;
            const int n = min(route_tokens, in_tile - chunk * route_tokens);
#if FMOE_PREC == 4
            // Decode prefix: this block quantizes x (a few rows) while the gate tasks finish; the scan flag
            // releases the codes with the placement.
            if (decode_prefix(p)) quantize_x_fp8(p, 0, 1);
#endif
            if (FMOE_TID == 0) {
                // Acquire the tile's logits (wait_at_least fences after the load).
                s_ok = wait_at_least(&p.tile_done[tile], gate_done, p.err, p.budget_ns, FMOE_PHASE_GATE, tile, p.rank);
            }
            sync_block();
            if (!s_ok) break;  // recorded; the scan wait below sees the abort
            if (tile == 0 && chunk == 0) stamp(p, 8, true);
            stage_logits(p, t0, n, ks_count, route_rows(smem));
            sync_block();
            route_staged(p, t0, n, smem);
            if (decode_prefix(p)) {
                decode_finish(p, L, smem);
                continue;
            }
            // The tile's last route task ranks it; the last tile's block runs the scan.
            if (!last_arrival(&p.tile_done[tile], gate_done + chunks)) continue;
            rank_tile(p, tile, smem);
            if (tile == 0) stamp(p, 9, true);
            if (last_arrival(&p.sync->tiles_done, tiles)) finish_scan(p, tiles);
            continue;
        }
        if (gemv) {
            FMOE_TRACE_SCOPE(FMOE_EV_GATE, task, 0, 0);
            gate_gemv_task(p, task, smem);  // router row `task` of the one token tile
            release_block_writes();
            if (FMOE_TID == 0) atomicAdd(&p.tile_done[0], 1);
            continue;
        }
        const int tile = task / (NTE * ks_count), nt = (task / ks_count) % NTE, ks = task % ks_count;
        FMOE_TRACE_SCOPE(FMOE_EV_GATE, nt, tile, ks);
        const int k0 = ks * slices_per * ROW_BYTES;  // this slice's first byte of K
        const int k1 = min((ks + 1) * slices_per * ROW_BYTES, H * (int)sizeof(T));
        TileSource src;
        src.k_bytes = k1 > k0 ? k1 - k0 : 0;
        point_rows<BM>(src.a, src.a_valid, p.x, tile * BT, p.tokens, H, k0);
        point_rows<GBN>(src.b, src.b_valid, p.wg, nt * GBN, EG, H, k0);
        run_tile<GateEngine>(smem, src);
        const float *c = (const float *)smem;
        // One slice writes the logits; several write partials [slice][token][EG] for routing to sum.
        float *dst = ks_count == 1 ? p.logits : p.logits_part + (size_t)ks * p.tokens * EG;
        for (int i = FMOE_TID; i < BM * GBN; i += THREADS) {
            const int r = i / GBN, col = i % GBN;
            const int t = tile * BT + r, n = nt * GBN + col;
            if (t < p.tokens && n < EG) dst[(size_t)t * EG + n] = c[r * c_stride<GBN>() + col];
        }
        // Release the logits, then count the task (the tile's route tasks wait for the count).
        release_block_writes();
        if (FMOE_TID == 0) atomicAdd(&p.tile_done[tile], 1);
    }
    stamp(p, 1);
#if FMOE_PREC == 4
    // Every block, while the last route tasks and the scan finish (GEMM0 reads it after the barrier); the decode
    // prefix's routing block quantized it already.
    if (!decode_prefix(p)) quantize_x_fp8(p, cta(), ctas());
    if (RANKS > 1) {
        // Ranks: dispatch sends these codes to their owners once every block of the rank has counted its share
        // (dispatch_rows waits for xq_ready). System scope: an NVSHMEM put may hand them to a NIC.
        sync_block();
        if (FMOE_TID == 0) {
            fence_sys();
            atomicAdd(&p.sync->xq_ready, 1);
        }
    }
#endif
    // Everyone needs the scan before placing tokens.
    __shared__ int ok;
    if (FMOE_TID == 0) ok = wait_at_least(&p.sync->scan_done, p.epoch, p.err, p.budget_ns, FMOE_PHASE_SCAN, 0, 0);
    sync_block();
    return ok != 0;
}

}  // namespace fmoe
