// Phase 4: counting contributions per token, the combine list, and the weighted combine. See moe.cu.
#pragma once
#include "moe_params.cuh"

namespace fmoe {

// Warps that share one token's combine, each summing a contiguous slice of y[t]: a power of two, as many as keep
// the rank's warps busy when there are few tokens (one warp summing a decode token's k rows was the last 12 µs of
// qwen3-30b-a3b at S = 1 and the last 100 µs of DeepSeek-V3 at S = 64, H200), at most one float4 per lane per
// slice. Every element is still the same sum in the same order, so the bits do not depend on it.
FMOE_DEVICE int combine_slices(const Params &p) {
    constexpr int MAX_SLICES = H / 128 >= 16 ? 16 : (H / 128 >= 1 ? H / 128 : 1);
    const int warps = ctas() * (THREADS / 32);
    int c = 1;
    while (c < MAX_SLICES && (long long)p.tokens * (c * 2) <= warps) c *= 2;
    return c;
}

// Float4 columns a lane sums at once (FMOE_COMBINE_COLS, 2 by default): all their K (+ shared) loads are issued
// before the first FMA, so a warp keeps COLS times as many loads in flight. One column at a time, a DeepSeek-V3
// token (7168 columns, 9 rows) took 123 µs, latency-bound, and S = 4096's combine tail 0.5 ms (fp8 trace, H200,
// 2026-12-02). Each element is the same sum in the same order whatever COLS is. Rows in a 16-bit RetT
// (FMOE_RET_STORAGE) take half the registers a column, so twice the columns keep as many bytes in flight.
#ifndef FMOE_COMBINE_COLS
#define FMOE_COMBINE_COLS 2
#endif
#ifndef FMOE_COMBINE_COLS_T
#define FMOE_COMBINE_COLS_T 4
#endif

// The columns a lane sums at once for this shape: as many as asked, as long as their loads fit in 80 registers (two
// FP32 columns of deepseek-v3's 8 rows and shared row are 72; four 16-bit ones 80). At k = 16 two FP32 columns held
// 128 registers of loads, and the fp8 kernel with 256-row tiles spilled 8 B around the combine (E = 16, H = 1024,
// a shared expert). Fewer columns change neither the sums nor their order.
FMOE_DEVICE constexpr int combine_cols() {
    constexpr int asked = FMOE_RET_T ? FMOE_COMBINE_COLS_T : FMOE_COMBINE_COLS;
    constexpr int regs = K * (FMOE_RET_T ? 2 : 4) + (HAS_SHARED ? 4 : 0);  // one column's loads
    return asked * regs <= 80 ? asked : (80 / regs >= 1 ? 80 / regs : 1);
}

// y[t] = Σ_j w[t,j] · ybuf[slot_row[t,j]] in rank order, plus the (gated) shared expert, for float4 columns
// [slice · ⌈H/4 / slices⌉, ...) of the token. One warp.
FMOE_DEVICE void combine_token(const Params &p, int t, int slice, int slices) {
    FMOE_TRACE_WARP_SCOPE(FMOE_EV_COMBINE, t);
    const int lane = FMOE_TID & 31;
    constexpr int H4 = H / 4;
    const int per = (H4 + slices - 1) / slices;
    const int c0 = slice * per, c1 = min(H4, c0 + per);
    int rows[K];
    float w[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
        rows[j] = p.slot_row[(size_t)t * K + j];
        w[j] = p.weights[(size_t)t * K + j];
    }
    const float gs = HAS_SHARED ? p.shared_gate[t] : 0.f;
    constexpr int COLS = combine_cols(), NV = K + (HAS_SHARED ? 1 : 0);
    for (int c = c0 + lane; c < c1; c += 32 * COLS) {
        // Loads first (a column past the slice or a row without a source reads nothing), then the sums.
        // The routed rows as loaded (RetT, converted in the sums: ret4_f32) and the shared expert's FP32 row.
        Ret4 v[COLS][K];
        float4 s[COLS];
#pragma unroll
        for (int u = 0; u < COLS; ++u) {
            const int h = 4 * (c + 32 * u);
            const bool in = c + 32 * u < c1;
#pragma unroll
            for (int j = 0; j < K; ++j) {
                // One GPU: the expert output row; ranks: the pair's row of the return buffer.
                v[u][j] = Ret4{};
                if (!in || rows[j] < 0) continue;
                v[u][j] = RANKS > 1 ? load_ret4(&p.peers[p.rank].ret[((size_t)t * K + j) * H + h])
                                    : load_ret4(&p.ybuf[(size_t)rows[j] * H + h]);
            }
            s[u] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (HAS_SHARED && in) s[u] = *(const float4 *)&p.ys[(size_t)t * H + h];
        }
#pragma unroll
        for (int u = 0; u < COLS; ++u) {
            if (c + 32 * u >= c1) break;
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int j = 0; j < NV; ++j) {
                if (j < K && rows[j] < 0) continue;
                const float wj = j < K ? w[j] : gs;
                const float4 e = j < K ? ret4_f32(v[u][j]) : s[u];
                acc.x = fmaf(wj, e.x, acc.x); acc.y = fmaf(wj, e.y, acc.y);
                acc.z = fmaf(wj, e.z, acc.z); acc.w = fmaf(wj, e.w, acc.w);
            }
            store_y4(p, (size_t)t * H + 4 * (c + 32 * u), acc);
        }
    }
}

// A row block's GEMM1 is complete: count one contribution for each of its tokens; a token whose last
// contribution this is goes on the combine list (any idle warp of the grid combines it, see drain_combines).
FMOE_DEVICE void complete_row_block(const Params &p, const Layout &L, int x, int m) {
    const bool shared = is_shared(L, x);
    const int rows = task_rows(p, L, x);
    for (int r = m * BM + (int)FMOE_TID; r < rows && r < (m + 1) * BM; r += THREADS) {
        int t, q = 0;
        if (RANKS > 1) {
            // Ranks: the source's counters; a row's origin names its rank and (token, j) pair.
            const int o = shared ? (p.rank << PAIR_BITS) | (r * K) : p.peers[p.rank].row_origin[L.row_start[x] + r];
            q = o >> PAIR_BITS;
            t = (o & PAIR_MASK) / K;
        } else {
            t = shared ? r : p.row_token[L.row_start[x] + r];
        }
        int *pending = RANKS > 1 ? p.peers[q].pending : p.pending;
        const int *target = RANKS > 1 ? p.peers[q].target : p.target;
        Sync *sync = RANKS > 1 ? p.peers[q].sync : p.sync;
        u64 *list = RANKS > 1 ? p.peers[q].list : p.combine_list;
        // Release this block's rows (and everything this CTA acquired) before counting. Ranks: the source may be
        // another GPU, so the fences and the atomics on its counters are system-scoped.
        constexpr bool SYS = RANKS > 1;
#if FMOE_NVSHMEM
        if (SYS && nv_remote(p.peers[p.rank].sync, q)) {
            // A remote source: its counters through NVSHMEM atomics (the returns were completed by their writers
            // before this row block was counted done).
            fence_sys();
            if (nvshmem_int_atomic_fetch_add(&pending[t], 1, q) + 1 == nvshmem_int_g(&target[t], q)) {
                const int pos = nvshmem_int_atomic_fetch_add(&sync->list_tail, 1, q);
                nv_set_flag(&list[pos], (p.epoch << 32) | (u64)t, q);
            }
            continue;
        }
#endif
        fence_at<SYS>();
        if ((SYS ? atom_add_sys_i32(&pending[t], 1) : atomicAdd(&pending[t], 1)) + 1 == target[t]) {
            fence_at<SYS>();  // acquire the other contributions, then publish
            const int pos = SYS ? atom_add_sys_i32(&sync->list_tail, 1) : atomicAdd(&sync->list_tail, 1);
            st_flag<SYS>(&list[pos], (p.epoch << 32) | (u64)t);
        }
    }
}

// Combines listed tokens until the launch's GEMM1 work is counted done (gemm1_total on Sync::gemm1_done, see
// count_gemm1_tile) and the list is exhausted. Each warp claims one slice of a list position at a time
// (combine_slices per position); a position not yet written is waited for (bounded) unless all GEMM1 work has
// finished and the position lies past the final end of the list.
FMOE_DEVICE bool drain_combines(const Params &p, int gemm1_total) {
    const int lane = FMOE_TID & 31;
    const int slices = combine_slices(p);
    for (;;) {
        int ticket = 0;
        if (lane == 0) ticket = atomicAdd(&p.sync->combine_ticket, 1);
        ticket = __shfl_sync(0xffffffffu, ticket, 0);
        const int pos = ticket / slices, slice = ticket % slices;
        if (pos >= p.tokens) return true;  // at most S tokens are ever listed
        int token = -1;  // −2: nothing left
        if (lane == 0) {
            const u64 start = globaltimer_ns();
            u32 spins = 0;
            for (;;) {
                const u64 v = ld_flag<(RANKS > 1)>(&p.combine_list[pos]);  // ranks: pushed by peers
                if (v >= (p.epoch << 32)) { token = (int)(v & 0xffffffffull); break; }
                if (RANKS > 1) {
                    // Ranks: the count of this rank's tokens to combine is final once all its tiles are dispatched.
                    if (ld_relaxed_i32(&p.sync->dispatch_done) == (p.tokens + BT - 1) / BT) {
                        fence_sys();
                        if (pos >= ld_relaxed_i32(&p.sync->my_total)) { token = -2; break; }
                    }
                } else if (ld_relaxed_i32(&p.sync->gemm1_done) == gemm1_total) {
                    fence_gpu();
                    if (pos >= ld_relaxed_i32(&p.sync->list_tail)) { token = -2; break; }
                    // Otherwise the entry is being written: wait for it like any other, bounded below.
                }
                if (aborted(p.err)) break;
                // Downstream of every other wait: three budgets, so an upstream expiry is the one reported.
                if ((++spins & 63u) == 0 && globaltimer_ns() - start > 3 * p.budget_ns) {
                    report_error(p.err, FMOE_ERR_TIMEOUT, FMOE_PHASE_COMBINE, pos, p.rank, p.epoch << 32, v);
                    break;
                }
                __nanosleep(128);
            }
        }
        token = __shfl_sync(0xffffffffu, token, 0);
        if (token == -2) return true;
        if (token < 0) return false;
        // Acquire in every lane: each lane loads the entry itself and fences before reading the token's rows, so
        // each lane's reads are ordered after the pusher's release under the PTX memory model (a shuffle carries
        // no memory ordering). Lane 0 has seen the entry, so these loads return at once.
        const bool seen = wait_at_least<(RANKS > 1)>(&p.combine_list[pos], p.epoch << 32, p.err, p.budget_ns,
                                                     FMOE_PHASE_COMBINE, pos, p.rank);
        if (!__all_sync(0xffffffffu, seen)) return false;
        combine_token(p, token, slice, slices);
    }
}

}  // namespace fmoe
