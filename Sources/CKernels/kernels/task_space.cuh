// The task space: the Layout every block keeps after the scan (each task-space expert's first row, row block
// and GEMM0 ticket) and the scans that fill it. See moe.cu (phases 1–3).
#pragma once
#include "moe_params.cuh"

namespace fmoe {

// Shared-memory arrays every CTA keeps after the scan (static, sized by E).
struct Layout {
    int xs;  // task-space experts: this rank's routed experts, then the shared one (index xs − 1)
    int row_start[XS + 1];
    int rb_start[XS + 1];
    int task0_start[XS + 1];
    // Ranks only (sized 1 otherwise): per global expert, the rows lower ranks keep, every rank's kept total, and
    // the first row of the expert in its owner's receive buffer.
    int before_me[RANKS > 1 ? E : 1];
    int kept_total[RANKS > 1 ? E : 1];
    int owner_row_start[RANKS > 1 ? E : 1];
#if FMOE_RANKS > 1
    int global_rows;  // every rank's kept rows: the routed rows one rank would have (launch_rows)
#endif
};

FMOE_DEVICE bool is_shared(const Layout &L, int x) { return x == L.xs - 1; }
// The launch's routed rows as one rank counts them: the task space's routed rows, or with ranks every rank's.
FMOE_DEVICE int launch_rows(const Layout &L) {
#if FMOE_RANKS > 1
    return L.global_rows;
#else
    return L.row_start[L.xs - 1];
#endif
}
FMOE_DEVICE int rows_of(const Layout &L, int x) { return is_shared(L, x) ? 0 : L.row_start[x + 1] - L.row_start[x]; }
// The rows task-space expert x computes in this launch: every token for the shared expert, else its kept rows.
FMOE_DEVICE int task_rows(const Params &p, const Layout &L, int x) {
    return is_shared(L, x) ? p.tokens : rows_of(L, x);
}

// The task space's exclusive scans: for `routed` routed experts (kept(x) rows each) and then the shared expert
// (every token when present, else empty), each one's first row, first row block and first GEMM0 ticket; entry
// routed + 1 holds the totals. By the whole block (every thread calls it): warp scans of THREADS entries at a time
// plus a carry (one thread's loop over qwen3-30b-a3b's 129 entries was most of the 3.7 µs scan on decode's
// critical path; H200 trace, 2026-12-02).
template <class Kept>
FMOE_DEVICE void task_space(int routed, int tokens, Kept kept, int *row_start, int *rb_start,
                            int *task0_start) {
    __shared__ int warp_sum[3][THREADS / 32];
    __shared__ int carry[3];
    const int lane = FMOE_TID & 31, warp = FMOE_TID >> 5;
    if (FMOE_TID < 3) carry[FMOE_TID] = 0;
    sync_block();
    for (int x0 = 0; x0 <= routed; x0 += THREADS) {
        const int x = x0 + FMOE_TID;
        int v[3] = {0, 0, 0};
        if (x <= routed) {
            const int rows = x < routed ? kept(x) : (HAS_SHARED ? tokens : 0);
            const int mt = (rows + BM - 1) / BM;
            v[0] = x < routed ? rows : 0;
            v[1] = mt;
            v[2] = mt * (x < routed ? NT0 : NT0S);
        }
        int inc[3];
#pragma unroll
        for (int q = 0; q < 3; ++q) {
            inc[q] = v[q];
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const int u = __shfl_up_sync(~0u, inc[q], o);
                if (lane >= o) inc[q] += u;
            }
            if (lane == 31) warp_sum[q][warp] = inc[q];
        }
        sync_block();
        int before[3];
#pragma unroll
        for (int q = 0; q < 3; ++q) {
            before[q] = carry[q];
            for (int w = 0; w < warp; ++w) before[q] += warp_sum[q][w];
        }
        if (x <= routed) {
            row_start[x] = before[0] + inc[0] - v[0];
            rb_start[x] = before[1] + inc[1] - v[1];
            task0_start[x] = before[2] + inc[2] - v[2];
        }
        sync_block();  // every thread has read carry and warp_sum
        if (FMOE_TID == THREADS - 1) {
#pragma unroll
            for (int q = 0; q < 3; ++q) carry[q] = before[q] + inc[q];
        }
        sync_block();
    }
    if (FMOE_TID == 0) {
        row_start[routed + 1] = carry[0];
        rb_start[routed + 1] = carry[1];
        task0_start[routed + 1] = carry[2];
    }
}

// One GPU: the block's copy of the task space, from the scan's global arrays (after acquiring the scan flag, or
// written by this block before a barrier). Ends with a barrier.
FMOE_DEVICE void load_layout(const Params &p, Layout &L) {
    L.xs = XS;
    for (int i = FMOE_TID; i <= XS; i += THREADS) {
        L.row_start[i] = p.row_start[i];
        L.rb_start[i] = p.rb_start[i];
        L.task0_start[i] = p.task0_start[i];
    }
    sync_block();
}

// Largest x with table[x] <= v (table ascending, table[0] = 0).
FMOE_DEVICE int find_segment(const int *table, int n, int v) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (table[mid] <= v) lo = mid; else hi = mid - 1;
    }
    return lo;
}

}  // namespace fmoe
