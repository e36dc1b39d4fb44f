// Phase 1's routing tasks (phase_gate.cuh runs them): a token tile's logits staged and routed, its pairs ranked,
// and the scan of every tile's counts. See moe.cu.
#pragma once
#include "moe_params.cuh"
#include "phase_dispatch.cuh"

namespace fmoe {

// Routing. A token tile's logits are staged in shared memory (rows padded to EG + 1 floats), summing the K-slice
// partials of a split gate in slice order, ROUTE_BATCH elements a thread at a time so that many loads are in
// flight; then a warp routes each token (WarpRouter) and writes its ids, weights and shared gate. Once all of a
// tile's tokens are routed, rank_tile turns the tile's ids into each pair's rank among the tile's earlier tokens
// routed to the same expert, and the tile's per-expert counts. Every block routes: a tile's tokens are route tasks
// of ROUTE_TASK_TOKENS (a warp each) on the gate's ticket counter after the gate tasks. (When the block that
// finished a tile's last gate task routed the whole tile, qwen3-30b-a3b at S = 64 spent 60 µs routing on one block,
// on the critical path, and ran 24 µs slower than with route tasks; H200, commits f92c173 and 764fc97.)
constexpr int ROUTE_BATCH = 8;
constexpr int ROUTE_TASK_TOKENS = THREADS / 32;             // a route task: one token per warp
static_assert(ROUTE_TASK_TOKENS <= ROUTE_CHUNK, "a route task's rows must fit the staging area");

// FMOE_ROUTE_FIT 1: a launch with more route tasks than blocks routes larger tasks (16, 32, … up to ROUTE_CHUNK
// tokens, several a warp), the fewest that still leave one task a block, so each block pays a task's waits,
// staging and count once instead of once per 8 tokens; 0: ROUTE_TASK_TOKENS always. Launch-uniform (from the token
// count and the grid). Each token is routed exactly as before, so the bits do not depend on it. Measured (H200,
// 2026-12-02, Benchmarks/RESULTS.md "Round 15"): qwen3-30b-a3b S = 4096 bf16 routes in 128 tasks of 32 tokens
// instead of 512 of 8 and its tokens are routed by 38 µs instead of 51 (trace); alone, paper-e64 S = 8192
// 0.744 → 0.724 ms and paper-e32 S = 8192 0.659 → 0.639.
#ifndef FMOE_ROUTE_FIT
#define FMOE_ROUTE_FIT 1
#endif
FMOE_DEVICE int route_task_tokens(const Params &p) {
    int q = ROUTE_TASK_TOKENS;
    if (FMOE_ROUTE_FIT) {
        const int tiles = (p.tokens + BT - 1) / BT;
        while (q < ROUTE_CHUNK && tiles * (BT / q) > ctas()) q *= 2;
    }
    return q;
}

// Routing's shared memory: masks [E][4] (bit t of expert e: token t of the tile chose e), the tile's ids [BT][K],
// staged logit rows [ROUTE_CHUNK][EG + 1] (a route task uses ROUTE_TASK_TOKENS of them).
FMOE_DEVICE u32 *route_masks(char *smem) { return (u32 *)smem; }
FMOE_DEVICE int *route_tile_ids(char *smem) { return (int *)(route_masks(smem) + E * 4); }
FMOE_DEVICE float *route_rows(char *smem) { return (float *)(route_tile_ids(smem) + BT * K); }

// Tokens [t0, t0 + n) (n ≤ ROUTE_CHUNK): their logits, summed over the gate's K slices, into rows.
FMOE_DEVICE void stage_logits(const Params &p, int t0, int n, int ks_count, float *rows) {
    const int n_elems = n * EG;
    for (int b0 = 0; b0 < n_elems; b0 += THREADS * ROUTE_BATCH) {
        size_t src[ROUTE_BATCH];
        float acc[ROUTE_BATCH];
#pragma unroll
        for (int b = 0; b < ROUTE_BATCH; ++b) {
            const int i = b0 + b * THREADS + FMOE_TID;
            src[b] = i < n_elems ? (size_t)(t0 + i / EG) * EG + i % EG : 0;
            acc[b] = 0.f;
        }
        if (ks_count == 1) {
#pragma unroll
            for (int b = 0; b < ROUTE_BATCH; ++b) acc[b] = p.logits[src[b]];
        } else {
#pragma unroll 4
            for (int q = 0; q < ks_count; ++q) {  // unrolled: the next slices' loads issue before these adds
                const float *part = p.logits_part + (size_t)q * p.tokens * EG;
                float v[ROUTE_BATCH];
#pragma unroll
                for (int b = 0; b < ROUTE_BATCH; ++b) v[b] = part[src[b]];  // independent: all in flight
#pragma unroll
                for (int b = 0; b < ROUTE_BATCH; ++b) acc[b] += v[b];    // slice order
            }
        }
#pragma unroll
        for (int b = 0; b < ROUTE_BATCH; ++b) {
            const int i = b0 + b * THREADS + FMOE_TID;
            if (i < n_elems) rows[(i / EG) * (EG + 1) + i % EG] = acc[b];
        }
    }
}

// Routes the staged tokens [t0, t0 + n), a warp per token: ids, weights and the shared gate to global memory.
FMOE_DEVICE void route_staged(const Params &p, int t0, int n, char *smem) {
    typedef WarpRouter<E, K, FMOE_SCORING, FMOE_GROUPS, FMOE_GROUPS_KEPT, FMOE_RENORM != 0> R;
    const int warp = FMOE_TID >> 5, lane = FMOE_TID & 31;
    for (int j = warp; j < n; j += THREADS / 32) {
        const int t = t0 + j;
        FMOE_TRACE_WARP_SCOPE(FMOE_EV_ROUTE_TOKEN, t);
        float *l = route_rows(smem) + j * (EG + 1);
        int ids[K];
        float w[K];
        // The router uses entries [0, E) of the row as scratch; the shared gate's logit (entry E) stays.
        R::route(l, p.sel_bias, lane, ids, w);
        if (lane == 0) {
#pragma unroll
            for (int q = 0; q < K; ++q) {
                p.ids[(size_t)t * K + q] = ids[q];
                p.weights[(size_t)t * K + q] = w[q];
            }
            if (HAS_SHARED) p.shared_gate[t] = EG > E ? 1.f / (1.f + expf(-l[E])) : 1.f;
        }
    }
}

// A routed tile (its ids in global memory, written before a release this block acquired, or by this block before
// a __syncthreads): per pair, its rank among the tile's earlier tokens routed to the same expert (a popcount of
// the expert's mask), and per expert the tile's count.
FMOE_DEVICE void rank_tile(const Params &p, int tile, char *smem) {
    u32 *masks = route_masks(smem);
    int *tile_ids = route_tile_ids(smem);
    const int t0 = tile * BT;
    const int n = min(BT, p.tokens - t0);
    sync_block();  // the staging area and masks are free
    for (int i = FMOE_TID; i < E * 4; i += THREADS) masks[i] = 0;
    sync_block();
    for (int i = FMOE_TID; i < n * K; i += THREADS) {
        const int e = p.ids[(size_t)t0 * K + i];
        tile_ids[i] = e;
        const int lt = i / K;
        if (e >= 0) atomicOr(&masks[e * 4 + (lt >> 5)], 1u << (lt & 31));
    }
    sync_block();
    for (int i = FMOE_TID; i < n * K; i += THREADS) {
        const int lt = i / K;
        const int e = tile_ids[i];
        int rank = 0;
        if (e >= 0) {
            const u32 *m = masks + e * 4;
            for (int wd = 0; wd < (lt >> 5); ++wd) rank += __popc(m[wd]);
            rank += __popc(m[lt >> 5] & ((1u << (lt & 31)) - 1u));
        }
        p.rank_in_tile[(size_t)t0 * K + i] = rank;
    }
    for (int e = FMOE_TID; e < E; e += THREADS) {
        const u32 *m = masks + e * 4;
        p.counts[(size_t)tile * E + e] = __popc(m[0]) + __popc(m[1]) + __popc(m[2]) + __popc(m[3]);
    }
}

// Exclusive scans that turn per-tile counts into slots, rows, row blocks and GEMM0 tickets. Run by the one CTA
// that routed the last tile. Each thread owns experts; the loads over tiles are independent (unrolled, so many
// are in flight) and coalesced across threads.
FMOE_DEVICE void scan_counts(const Params &p, int tiles) {
    __shared__ int kept[E];
    for (int e = FMOE_TID; e < E; e += THREADS) {
        int run = 0;
        int tile = 0;
        for (; tile + 8 <= tiles; tile += 8) {
            int c[8];
#pragma unroll
            for (int q = 0; q < 8; ++q) c[q] = p.counts[(size_t)(tile + q) * E + e];
#pragma unroll
            for (int q = 0; q < 8; ++q) {
                p.base[(size_t)(tile + q) * E + e] = run;
                run += c[q];
            }
        }
        for (; tile < tiles; ++tile) {
            const int c = p.counts[(size_t)tile * E + e];
            p.base[(size_t)tile * E + e] = run;
            run += c;
        }
        p.expert_load[e] = run;
        kept[e] = run < p.capacity ? run : p.capacity;
    }
    sync_block();
    if (RANKS > 1) return;  // ranks: capacity and rows follow the global counts (publish_counts, rank_layout)
    task_space(E, p.tokens, [&](int x) { return kept[x]; }, p.row_start, p.rb_start, p.task0_start);
}

// The block that finishes the routing scans the tile counts (ranks also publish them to every rank), then releases
// the scan with the epoch: every block of the rank waits for it before placing or dispatching tokens.
FMOE_DEVICE void finish_scan(const Params &p, int tiles) {
    FMOE_TRACE_SCOPE(FMOE_EV_SCAN, -1, tiles, 0);
    stamp(p, 6, true);
    scan_counts(p, tiles);
    if (RANKS > 1) {
        if (!wait_peers_done(p)) return;  // recorded; the rank's blocks see the abort flag
        publish_counts(p, p.row_blocks);
    }
    stamp(p, 7, true);
    release_block_writes();
    if (FMOE_TID == 0) st_relaxed_u64(&p.sync->scan_done, p.epoch);
}

// How many slices the gate's K is split into: enough (token tile, expert tile, K slice) tasks to occupy the grid
// when there are few token tiles; partial logits are summed in slice order by the tile's last task (deterministic).
// The host picks it from the global token count and the whole grid, so a layer split over ranks sums the partials
// exactly as the single-rank run does (same logits, same bits).
FMOE_DEVICE int gate_k_split(const Params &p) {
    constexpr int KSLICES = (H * (int)sizeof(T) + ROW_BYTES - 1) / ROW_BYTES;
    int ks = p.gate_ksplit < 1 ? 1 : (p.gate_ksplit > GATE_KSPLIT_MAX ? GATE_KSPLIT_MAX : p.gate_ksplit);
    ks = ks < KSLICES ? ks : KSLICES;
    // The partials of a split gate need ks · S rows: a split the region cannot hold runs unsplit instead of
    // writing past it (the host sizes the region so it never does: FusedWorkspace.partialLogitsRows).
    if (ks > 1 && (long long)ks * p.tokens > (long long)p.part_rows) ks = 1;
    return ks;
}

}  // namespace fmoe
