// Phase 2 of the fused kernel (place), and the decode prefix: one block routes, ranks, scans and places a launch
// of a few tokens (phase_gate.cuh calls it). See moe.cu.
#pragma once
#include "moe_params.cuh"
#include "routing_tasks.cuh"
#include "phase_fp8.cuh"

namespace fmoe {

// ---- Phase 2: place ----------------------------------------------------------------------------------------------

// The row blocks' GEMM counters (fp8: and their h groups') and (worker 0) the expert phase's counters, zeroed for this launch.
FMOE_DEVICE void reset_expert_counters(const Params &p, const Layout &L, int worker, int workers) {
    const int rbs = L.rb_start[XS];
    for (int i = worker * THREADS + FMOE_TID; i < rbs; i += workers * THREADS) {
        p.done0[i] = 0;
        p.done1[i] = 0;
    }
#if FMOE_PREC == 4
    // fp8: the row blocks' per-group GEMM0 counts (count_h_groups, phase_experts.cuh).
    for (int i = worker * THREADS + FMOE_TID; i < rbs * KB_I; i += workers * THREADS) p.hq_done[i] = 0;
#endif
    if (worker == 0 && FMOE_TID == 0) {
        p.sync->ticket = 0;
        p.sync->ring_tail = 0;
        p.sync->list_tail = 0;
        p.sync->combine_ticket = 0;
        p.sync->gemm1_done = 0;
    }
}

// Worker `worker` of `workers` blocks (every block of the launch, or the decode prefix's one block when
// DECODE_PLACE_PAIRS is false): the tokens' rows and contribution counts, the row blocks' GEMM counters, and
// (worker 0) the expert phase's counters.
FMOE_DEVICE void place_phase(const Params &p, const Layout &L, int worker, int workers) {
    FMOE_TRACE_SCOPE(FMOE_EV_PLACE, -1, 0, 0);
    for (int t = worker * THREADS + FMOE_TID; t < p.tokens; t += workers * THREADS) {
        const int tile = t / BT;
        int contributions = HAS_SHARED ? 1 : 0;
#pragma unroll
        for (int j = 0; j < K; ++j) {
            const int e = p.ids[(size_t)t * K + j];
            int row = -1;
            if (e >= 0) {
                const int slot = p.base[(size_t)tile * E + e] + p.rank_in_tile[(size_t)t * K + j];
                if (slot < rows_of(L, e)) {
                    row = L.row_start[e] + slot;
                    p.row_token[row] = t;
                    ++contributions;
                }
            }
            p.slot_row[(size_t)t * K + j] = row;
        }
        set_token_target(p, t, contributions);
    }
    reset_expert_counters(p, L, worker, workers);
}

// Placement a thread per (token, rank) pair: worker `worker` of `workers` blocks takes TP tokens at a time (a
// block's threads' worth of pairs, and at least the decode prefix's tokens), their contribution counts summed in
// shared memory. The same rows, slots and counts as place_phase, whose thread per token waits for each pair's
// loads behind the previous pair's stores (the compiler cannot know that a row_token store leaves the next pair's
// ids, base and rank alone).
FMOE_DEVICE void place_pairs(const Params &p, const Layout &L, int worker, int workers) {
    FMOE_TRACE_SCOPE(FMOE_EV_PLACE, -1, 0, 0);
    constexpr int TP = THREADS / K > ROUTE_TASK_TOKENS ? THREADS / K : ROUTE_TASK_TOKENS;
    __shared__ int contributions[TP];
    for (int t0 = worker * TP; t0 < p.tokens; t0 += workers * TP) {
        const int n = min(TP, p.tokens - t0);
        if (FMOE_TID < n) contributions[FMOE_TID] = HAS_SHARED ? 1 : 0;
        sync_block();
        for (int u = FMOE_TID; u < n * K; u += THREADS) {
            const int i = t0 * K + u, t = i / K, e = p.ids[i];
            int row = -1;
            if (e >= 0) {
                const int slot = p.base[(size_t)(t / BT) * E + e] + p.rank_in_tile[i];
                if (slot < rows_of(L, e)) {
                    row = L.row_start[e] + slot;
                    p.row_token[row] = t;
                    atomicAdd(&contributions[t - t0], 1);
                }
            }
            p.slot_row[i] = row;
        }
        sync_block();
        if (FMOE_TID < n) set_token_target(p, t0 + FMOE_TID, contributions[FMOE_TID]);
        sync_block();  // every count is read before the next pass resets them
    }
    reset_expert_counters(p, L, worker, workers);
}

// ---- The decode prefix -------------------------------------------------------------------------------------------

// Decode prefix (FMOE_DECODE_PREFIX 1, default; 0 for A/B runs): one GPU and a launch of at most one route task's
// tokens. The block that routes them also ranks, scans, places every pair and resets the expert phase's counters,
// then releases all of it with the scan flag; the other blocks skip placement and the grid barrier. The general
// path hands the work between blocks four times (route → rank → scan → place → barrier), each hand-off a fence and
// a counter round trip: 12 µs from the route's end to the first expert task of qwen3-30b-a3b at S = 1 (H200 trace,
// 2026-12-02). Block-uniform and launch-uniform: every block computes it from the token count.
#ifndef FMOE_DECODE_PREFIX
#define FMOE_DECODE_PREFIX 1
#endif
FMOE_DEVICE bool decode_prefix(const Params &p) {
    return FMOE_DECODE_PREFIX && RANKS == 1 && p.tokens >= 1 && p.tokens <= ROUTE_TASK_TOKENS;
}

// FMOE_DECODE_PLACE_PAIRS: how the decode prefix places its pairs. 1: a thread per (token, rank) pair
// (place_pairs); 0: a thread per token (place_phase), whose k pairs' loads wait behind each other's stores (the
// compiler cannot know that a row_token store leaves the next pair's ids, base and rank alone); 2 (default): pairs
// when K > 2. qwen3-30b-a3b S = 1 (k = 8): place 3.5 → 1.4 µs and the gate phase over at 17.4 µs instead of 19.3
// (call 3's trace), 0.068 → 0.057 ms;
// paper-e64 S = 1 (k = 2, a chain of two): 0.047 – 0.049 ms a token at a time, 0.050 in pairs in all three runs
// (H200, 2026-12-02, Benchmarks/RESULTS.md "Round 12"). Polling the scan flag more slowly (1 µs between loads
// instead of 64 ns) did not shorten the chain.
#ifndef FMOE_DECODE_PLACE_PAIRS
#define FMOE_DECODE_PLACE_PAIRS 2
#endif
constexpr bool DECODE_PLACE_PAIRS = FMOE_DECODE_PLACE_PAIRS == 2 ? K > 2 : FMOE_DECODE_PLACE_PAIRS != 0;
// FMOE_PLACE_PAIRS 1: every launch places a thread per pair (place_pairs over all blocks) when DECODE_PLACE_PAIRS
// would; 0 keeps place_phase's thread per token outside the decode prefix. At qwen3-30b-a3b S = 4096 (k = 8) the
// blocks that hold tokens placed them in 3 – 6.2 µs a token at a time, and every block waited for them at the grid
// barrier; in pairs every block places in 1.2 – 1.8 µs (H200 traces, 2026-12-02, Benchmarks/RESULTS.md
// "Round 15"). With FMOE_ROUTE_FIT: qwen3-30b-a3b S = 4096 0.921 → 0.908 ms, paper-e64 S = 8192 0.748 → 0.736.
#ifndef FMOE_PLACE_PAIRS
#define FMOE_PLACE_PAIRS 1
#endif
constexpr bool PLACE_PAIRS = FMOE_PLACE_PAIRS && DECODE_PLACE_PAIRS;

// The decode prefix's block, after routing the launch's tokens (route_staged): rank the one tile, scan, fill L from
// the scan, place, then release (the scan flag). Every step reads only this block's own writes, ordered by the
// block's barriers; the release covers them all for the blocks that acquire the flag. Not inlined: a second
// inlined copy of ranking, scan and placement changed the register allocation of the whole kernel (sm_90a SASS)
// and cost qwen3-30b-a3b S = 64, which never runs it, 7 µs (0.372 → 0.379 ms, H200, 2026-12-02).
__device__ __noinline__ void decode_finish(const Params &p, Layout &L, char *smem) {
    rank_tile(p, 0, smem);  // starts with a barrier: every warp's ids are written
    sync_block();        // the tile's counts, for the scan
    {
        FMOE_TRACE_SCOPE(FMOE_EV_SCAN, -1, 1, 0);
        scan_counts(p, 1);
        sync_block();
    }
    load_layout(p, L);
    if (FMOE_STOP_AFTER != 1) {
        if (DECODE_PLACE_PAIRS) place_pairs(p, L, 0, 1);
        else place_phase(p, L, 0, 1);
    }
    release_block_writes();
    if (FMOE_TID == 0) st_relaxed_u64(&p.sync->scan_done, p.epoch);
}

}  // namespace fmoe
