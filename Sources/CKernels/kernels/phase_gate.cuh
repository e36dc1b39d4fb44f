// Phase 1 (gate, routing, scan) and phase 2 (place) of the fused kernel. See moe.cu.
#pragma once
#include "moe_params.cuh"
#include "phase_dispatch.cuh"
#include "phase_fp8.cuh"
#include "gate_gemv.cuh"

namespace fmoe {

// ---- Phase 1: gate, routing, scan --------------------------------------------------------------------------------

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
constexpr int ROUTE_TASKS_PER_TILE = BT / ROUTE_TASK_TOKENS;
static_assert(ROUTE_TASK_TOKENS <= ROUTE_CHUNK, "a route task's rows must fit the staging area");

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
            const int i = b0 + b * THREADS + threadIdx.x;
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
            const int i = b0 + b * THREADS + threadIdx.x;
            if (i < n_elems) rows[(i / EG) * (EG + 1) + i % EG] = acc[b];
        }
    }
}

// Routes the staged tokens [t0, t0 + n), a warp per token: ids, weights and the shared gate to global memory.
FMOE_DEVICE void route_staged(const Params &p, int t0, int n, char *smem) {
    typedef WarpRouter<E, K, FMOE_SCORING, FMOE_GROUPS, FMOE_GROUPS_KEPT, FMOE_RENORM != 0> R;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
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
    __syncthreads();  // the staging area and masks are free
    for (int i = threadIdx.x; i < E * 4; i += THREADS) masks[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n * K; i += THREADS) {
        const int e = p.ids[(size_t)t0 * K + i];
        tile_ids[i] = e;
        const int lt = i / K;
        if (e >= 0) atomicOr(&masks[e * 4 + (lt >> 5)], 1u << (lt & 31));
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n * K; i += THREADS) {
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
    for (int e = threadIdx.x; e < E; e += THREADS) {
        const u32 *m = masks + e * 4;
        p.counts[(size_t)tile * E + e] = __popc(m[0]) + __popc(m[1]) + __popc(m[2]) + __popc(m[3]);
    }
}

// Exclusive scans that turn per-tile counts into slots, rows, row blocks and GEMM0 tickets. Run by the one CTA
// that routed the last tile. Each thread owns experts; the loads over tiles are independent (unrolled, so many
// are in flight) and coalesced across threads.
FMOE_DEVICE void scan_counts(const Params &p, int tiles) {
    __shared__ int kept[E];
    for (int e = threadIdx.x; e < E; e += THREADS) {
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
    __syncthreads();
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
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) { fence_gpu(); st_relaxed_u64(&p.sync->scan_done, p.epoch); }
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

FMOE_DEVICE void place_phase(const Params &p, const Layout &L, int worker, int workers);
FMOE_DEVICE void reset_expert_counters(const Params &p, const Layout &L, int worker, int workers);
FMOE_DEVICE void place_pairs(const Params &p, const Layout &L);

// FMOE_DECODE_PLACE_PAIRS 1 (default): the decode prefix places a thread per (token, rank) pair (place_pairs); 0
// (A/B runs): a thread per token (place_phase), whose k pairs' loads wait behind each other's stores (the compiler
// cannot know that a row_token store leaves the next pair's ids, base and rank alone). qwen3-30b-a3b S = 1: place
// 3.5 → 0.7 µs and the expert phase 3.7 µs sooner (H200 traces, 2026-12-02, Benchmarks/RESULTS.md "Round 12").
// Polling the scan flag more slowly (1 µs between loads instead of 64 ns) did not shorten the chain.
#ifndef FMOE_DECODE_PLACE_PAIRS
#define FMOE_DECODE_PLACE_PAIRS 1
#endif

// The decode prefix's block, after routing the launch's tokens (route_staged): rank the one tile, scan, fill L from
// the scan, place, then release (the scan flag). Every step reads only this block's own writes, ordered by the
// block's barriers; the release covers them all for the blocks that acquire the flag. Not inlined: a second
// inlined copy of ranking, scan and placement changed the register allocation of the whole kernel (sm_90a SASS)
// and cost qwen3-30b-a3b S = 64, which never runs it, 7 µs (0.372 → 0.379 ms, H200, 2026-12-02).
__device__ __noinline__ void decode_finish(const Params &p, Layout &L, char *smem) {
    rank_tile(p, 0, smem);  // starts with a barrier: every warp's ids are written
    __syncthreads();        // the tile's counts, for the scan
    {
        FMOE_TRACE_SCOPE(FMOE_EV_SCAN, -1, 1, 0);
        scan_counts(p, 1);
        __syncthreads();
    }
    load_layout(p, L);
    if (FMOE_STOP_AFTER != 1) {
        if (FMOE_DECODE_PLACE_PAIRS) place_pairs(p, L);
        else place_phase(p, L, 0, 1);
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) { fence_gpu(); st_relaxed_u64(&p.sync->scan_done, p.epoch); }
}

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
    const int tasks = gate_tasks + tiles * ROUTE_TASKS_PER_TILE;
    // Ranks: a rank without tokens still takes part in the count exchange (all zeros).
    if (RANKS > 1 && tiles == 0 && cta() == 0) finish_scan(p, 0);
    if (threadIdx.x == 0) s_ok = 1;
    for (;;) {
        // Every thread has read the previous task before thread 0 overwrites it (a task past its tile's last token
        // continues right after the read; without this barrier a slow warp could read the next task instead).
        __syncthreads();
        if (threadIdx.x == 0) s_task = atomicAdd(&p.sync->gate_ticket, 1);
        __syncthreads();
        const int task = s_task;
        if (task >= tasks) break;
        if (task >= gate_tasks) {
            // A route task: ROUTE_TASK_TOKENS tokens of a tile whose gate tasks have all finished (every gate
            // ticket was taken before this one, by blocks that are running, so the wait ends).
            const int tile = (task - gate_tasks) / ROUTE_TASKS_PER_TILE;
            const int chunk = (task - gate_tasks) % ROUTE_TASKS_PER_TILE;
            const int in_tile = min(BT, p.tokens - tile * BT);
            const int chunks = (in_tile + ROUTE_TASK_TOKENS - 1) / ROUTE_TASK_TOKENS;
            if (chunk >= chunks) continue;  // block-uniform: past the tile's last token
            FMOE_TRACE_SCOPE(FMOE_EV_ROUTE, -1, tile, chunk);
            const int t0 = tile * BT + chunk * ROUTE_TASK_TOKENS;
            const int n = min(ROUTE_TASK_TOKENS, in_tile - chunk * ROUTE_TASK_TOKENS);
#if FMOE_PREC == 4
            // Decode prefix: this block quantizes x (a few rows) while the gate tasks finish; the scan flag
            // releases the codes with the placement.
            if (decode_prefix(p)) quantize_x_fp8(p, 0, 1);
#endif
            if (threadIdx.x == 0) {
                // Acquire the tile's logits (wait_at_least fences after the load).
                s_ok = wait_at_least(&p.tile_done[tile], gate_done, p.err, p.budget_ns, FMOE_PHASE_GATE, tile, p.rank);
            }
            __syncthreads();
            if (!s_ok) break;  // recorded; the scan wait below sees the abort
            if (tile == 0 && chunk == 0) stamp(p, 8, true);
            stage_logits(p, t0, n, ks_count, route_rows(smem));
            __syncthreads();
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
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) atomicAdd(&p.tile_done[0], 1);
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
        for (int i = threadIdx.x; i < BM * GBN; i += THREADS) {
            const int r = i / GBN, col = i % GBN;
            const int t = tile * BT + r, n = nt * GBN + col;
            if (t < p.tokens && n < EG) dst[(size_t)t * EG + n] = c[r * c_stride<GBN>() + col];
        }
        // Release the logits, then count the task (the tile's route tasks wait for the count).
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) atomicAdd(&p.tile_done[tile], 1);
    }
    stamp(p, 1);
#if FMOE_PREC == 4
    // Every block, while the last route tasks and the scan finish (GEMM0 reads it after the barrier); the decode
    // prefix's routing block quantized it already.
    if (!decode_prefix(p)) quantize_x_fp8(p, cta(), ctas());
#endif
    // Everyone needs the scan before placing tokens.
    __shared__ int ok;
    if (threadIdx.x == 0) ok = wait_at_least(&p.sync->scan_done, p.epoch, p.err, p.budget_ns, FMOE_PHASE_SCAN, 0, 0);
    __syncthreads();
    return ok != 0;
}

// ---- Phase 2: place ----------------------------------------------------------------------------------------------

// Worker `worker` of `workers` blocks (every block of the launch, or the decode prefix's one block when
// FMOE_DECODE_PLACE_PAIRS is 0): the tokens' rows and contribution counts, the row blocks' GEMM counters, and
// (worker 0) the expert phase's counters.
FMOE_DEVICE void place_phase(const Params &p, const Layout &L, int worker, int workers) {
    FMOE_TRACE_SCOPE(FMOE_EV_PLACE, -1, 0, 0);
    for (int t = worker * THREADS + threadIdx.x; t < p.tokens; t += workers * THREADS) {
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
        p.target[t] = contributions;
        p.pending[t] = 0;
        if (contributions == 0) {
            for (int h = 0; h < H; h += 4) store_y4(p, (size_t)t * H + h, make_float4(0.f, 0.f, 0.f, 0.f));
        }
    }
    reset_expert_counters(p, L, worker, workers);
}

// The decode prefix's placement (one token tile, its ranks and counts from rank_tile and the scan): a thread per
// (token, rank) pair, the tokens' contribution counts summed in shared memory. The same rows, slots and counts as
// place_phase.
FMOE_DEVICE void place_pairs(const Params &p, const Layout &L) {
    FMOE_TRACE_SCOPE(FMOE_EV_PLACE, -1, 0, 0);
    __shared__ int contributions[ROUTE_TASK_TOKENS];
    if (threadIdx.x < p.tokens) contributions[threadIdx.x] = HAS_SHARED ? 1 : 0;
    __syncthreads();
    for (int i = threadIdx.x; i < p.tokens * K; i += THREADS) {
        const int t = i / K, e = p.ids[i];
        int row = -1;
        if (e >= 0) {
            const int slot = p.base[e] + p.rank_in_tile[i];  // tile 0's base
            if (slot < rows_of(L, e)) {
                row = L.row_start[e] + slot;
                p.row_token[row] = t;
                atomicAdd(&contributions[t], 1);
            }
        }
        p.slot_row[i] = row;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < p.tokens; t += THREADS) {
        p.target[t] = contributions[t];
        p.pending[t] = 0;
        if (contributions[t] == 0) {
            for (int h = 0; h < H; h += 4) store_y4(p, (size_t)t * H + h, make_float4(0.f, 0.f, 0.f, 0.f));
        }
    }
    reset_expert_counters(p, L, 0, 1);
}

// The row blocks' GEMM counters and (worker 0) the expert phase's counters, zeroed for this launch.
FMOE_DEVICE void reset_expert_counters(const Params &p, const Layout &L, int worker, int workers) {
    const int rbs = L.rb_start[XS];
    for (int i = worker * THREADS + threadIdx.x; i < rbs; i += workers * THREADS) {
        p.done0[i] = 0;
        p.done1[i] = 0;
    }
    if (worker == 0 && threadIdx.x == 0) {
        p.sync->ticket = 0;
        p.sync->ring_tail = 0;
        p.sync->list_tail = 0;
        p.sync->combine_ticket = 0;
        p.sync->tiles1_done = 0;
    }
}

}  // namespace fmoe
