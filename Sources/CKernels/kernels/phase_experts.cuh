// Phase 3: the expert GEMM tiles and the ticket scheduler that runs them (and then drains the combines). See
// moe.cu.
#pragma once
#include "moe_params.cuh"
#include "phase_dispatch.cuh"
#include "phase_combine.cuh"

namespace fmoe {

// ---- Phase 3: expert GEMMs and combine ---------------------------------------------------------------------------

#if FMOE_PREC == 4
// One tile of precision fp8: the shared expert (BF16) on SharedEngine; a routed expert x on the E4M3 engine, from
// the BF16 A rows of `src` (k = kdim) and expert x's weight image in `w` (image_bytes each, layout in
// moe_params.cuh): B rows n·128… of its codes ([rows, kdim] bytes) and their granule scales ([granules][kb]).
FMOE_DEVICE void expert_tile_fp8(char *smem, const TileSource &src, bool shared, const void *w, int x,
                                 size_t image_bytes, size_t code_bytes, int n, int rows, int granules, int kdim,
                                 int kb) {
    if (shared) {
        run_tile<SharedEngine>(smem, src);
        return;
    }
    const unsigned char *codes = (const unsigned char *)w + (size_t)x * image_bytes;
    const float *scales = (const float *)(codes + code_bytes);
    Fp8Source f;
#pragma unroll
    for (int i = 0; i < BM / 32; ++i) {
        f.a[i] = src.a[i];
        f.a_valid[i] = src.a_valid[i];
    }
    point_rows<FP8_BN>(f.b, f.b_valid, codes, n * FP8_BN, rows, (size_t)kdim);
    f.k_bytes_a = kdim * 2;
    f.k_bytes_b = kdim;
    f.b_scale = scales + (size_t)(2 * n) * kb;
    f.kb_count = kb;
    f.granule1 = 2 * n + 1 < granules;
    gemm_tile_fp8<STAGES>(smem, f);
}
#endif

FMOE_DEVICE void gemm0_task(const Params &p, const Layout &L, int x, int m, int n, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_GEMM0, x, m, n);
    const bool shared = is_shared(L, x);
    const int rows = shared ? p.tokens : rows_of(L, x);
    const int row0 = m * BM;
    const int n0 = shared ? N0S : N0;
    TileSource src;
    src.k_bytes = H * (int)sizeof(T);
    const T *w = shared ? p.ws1 : p.w1 + (size_t)x * N0 * H;
#pragma unroll
    for (int i = 0; i < BM / 32; ++i) {
        const int r = loader_row(i);
        src.a_valid[i] = row0 + r < rows;
        if (RANKS > 1 && !shared) {
            // Ranks: the rows were stored into this rank's receive buffer, in row order.
            src.a[i] = (const char *)(p.peers[p.rank].recv + (size_t)(L.row_start[x] + (src.a_valid[i] ? row0 + r : 0)) * H);
        } else {
            int token = 0;
            if (src.a_valid[i]) token = shared ? row0 + r : p.row_token[L.row_start[x] + row0 + r];
            src.a[i] = (const char *)(p.x + (size_t)token * H);
        }
    }
    point_rows<EBN>(src.b, src.b_valid, w, n * EBN, n0, H);
#if FMOE_PREC == 4
    expert_tile_fp8(smem, src, shared, p.w1, x, W1_EXPERT_BYTES, W1_CODES, n, N0, G0, H, KB_H);
#else
    run_tile<ExpertEngine>(smem, src);
#endif
    const float *c = (const float *)smem;
    constexpr int C_STRIDE = c_stride<EBN>();
    const int inter = shared ? IS : I;
    T *out = shared ? p.hs : p.hbuf + (size_t)L.row_start[x] * I;
    constexpr int OUT_COLS = GATED ? EBN / 2 : EBN;
    const int col0 = n * OUT_COLS;
    for (int u = threadIdx.x; u < BM * OUT_COLS / 4; u += THREADS) {
        const int r = u / (OUT_COLS / 4), c4 = (u % (OUT_COLS / 4)) * 4;
        const int col = col0 + c4;
        if (row0 + r >= rows || col >= inter) continue;
        float v[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            if (GATED) {
                v[q] = activation(c[r * C_STRIDE + c4 + q]) * c[r * C_STRIDE + EBN / 2 + c4 + q];
            } else {
                const float b = (!shared && p.b1 != nullptr) ? p.b1[(size_t)x * I + col + q] : 0.f;
                v[q] = activation(c[r * C_STRIDE + c4 + q] + b);
            }
        }
        store4(out + (size_t)(row0 + r) * inter + col, v[0], v[1], v[2], v[3]);
    }
    __syncthreads();
}

FMOE_DEVICE void gemm1_task(const Params &p, const Layout &L, int x, int m, int n, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_GEMM1, x, m, n);
    const bool shared = is_shared(L, x);
    const int rows = shared ? p.tokens : rows_of(L, x);
    const int row0 = m * BM;
    const int inter = shared ? IS : I;
    const T *a = shared ? p.hs : p.hbuf + (size_t)L.row_start[x] * I;
    const T *w = shared ? p.ws2 : p.w2 + (size_t)x * H * I;
    TileSource src;
    src.k_bytes = inter * (int)sizeof(T);
    point_rows<BM>(src.a, src.a_valid, a, row0, rows, inter);
    point_rows<EBN>(src.b, src.b_valid, w, n * EBN, H, inter);
#if FMOE_PREC == 4
    expert_tile_fp8(smem, src, shared, p.w2, x, W2_EXPERT_BYTES, W2_CODES, n, H, G1, I, KB_I);
#else
    run_tile<ExpertEngine>(smem, src);
#endif
    const float *c = (const float *)smem;
    constexpr int C_STRIDE = c_stride<EBN>();
    float *out = shared ? p.ys : p.ybuf + (size_t)L.row_start[x] * H;
#if FMOE_NVSHMEM
    bool sent_remote = false;  // this thread put returns to a remote source
#endif
    for (int u = threadIdx.x; u < BM * EBN / 4; u += THREADS) {
        const int r = u / (EBN / 4), c4 = (u % (EBN / 4)) * 4;
        const int col = n * EBN + c4;
        if (row0 + r >= rows || col >= H) continue;
        float4 v = *(const float4 *)&c[r * C_STRIDE + c4];
        if (!shared && p.b2 != nullptr) {
            const float *b = p.b2 + (size_t)x * H + col;
            v.x += b[0]; v.y += b[1]; v.z += b[2]; v.w += b[3];
        }
        if (RANKS > 1 && !shared) {
            // Ranks: straight into the source's return buffer, at the (token, j) pair the row came from.
            const int o = p.peers[p.rank].row_origin[L.row_start[x] + row0 + r];
#if FMOE_NVSHMEM
            static_assert(!FMOE_RET_STORAGE, "the NVSHMEM transport returns FP32 rows only (no storage returns)");
            if (nv_remote(p.peers[p.rank].sync, o >> PAIR_BITS)) {
                // A remote source: four single-float puts, completed below before the tile is counted done.
                float *d = &p.peers[o >> PAIR_BITS].ret[(size_t)(o & PAIR_MASK) * H + col];
                nvshmem_float_p(d, v.x, o >> PAIR_BITS); nvshmem_float_p(d + 1, v.y, o >> PAIR_BITS);
                nvshmem_float_p(d + 2, v.z, o >> PAIR_BITS); nvshmem_float_p(d + 3, v.w, o >> PAIR_BITS);
                sent_remote = true;
                continue;
            }
#endif
            store_ret4(&p.peers[o >> PAIR_BITS].ret[(size_t)(o & PAIR_MASK) * H + col], v);
        } else {
            *(float4 *)&out[(size_t)(row0 + r) * H + col] = v;
        }
    }
#if FMOE_NVSHMEM
    if (sent_remote) nv_complete_puts();  // returns to remote sources delivered before this tile counts as done
#endif
    __syncthreads();
}

FMOE_DEVICE bool expert_phase(const Params &p, const Layout &L, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_EXPERT_PHASE, -1, 0, 0);
    __shared__ int s_ticket, s_last, s_rb;
    const int t0_total = L.task0_start[L.xs];
    const int rbs = L.rb_start[L.xs];
    const int total = t0_total + rbs * NT1;
    for (;;) {
        if (threadIdx.x == 0) s_ticket = atomicAdd(&p.sync->ticket, 1);
        __syncthreads();
        const int ticket = s_ticket;
        if (ticket >= total) {
            // Warps drain on their own; the block leaves together, with one answer (block-uniform exits).
            const bool drained = drain_combines(p, rbs * NT1);
            return __syncthreads_and(drained) != 0;
        }
        if (ticket < t0_total) {
            // Column-tile-major within an expert: the CTAs running at once share one weight slab across all of the
            // expert's row blocks, so each slab is read from HBM about once (row-block-major re-read it per block).
            const int x = find_segment(L.task0_start, L.xs, ticket);
            const int nt = is_shared(L, x) ? NT0S : NT0;
            const int mt = L.rb_start[x + 1] - L.rb_start[x];
            const int local = ticket - L.task0_start[x];
            const int n = local / mt, m = local % mt;
            if (RANKS > 1) {
                // Ranks: start when the block's rows are in (routed: every source overlapping the block has
                // delivered; shared: this rank dispatched the token tile, so targets are set).
                if (threadIdx.x == 0) {
                    s_last = is_shared(L, x) ? wait_at_least(&p.tile_dispatched[m], p.epoch, p.err, p.budget_ns,
                                                             FMOE_PHASE_TILES, m, p.rank)
                                             : wait_rows(p, L, x, m);
                }
                __syncthreads();
                if (!s_last) return false;
                if (ticket == 0) stamp(p, 12, true);
            }
            gemm0_task(p, L, x, m, n, smem);
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) {
                const int rb = L.rb_start[x] + m;
                if (atomicAdd(&p.done0[rb], 1) == nt - 1) {
                    fence_gpu();  // acquire the other tiles of the block, then release them with the ring entry
#if FMOE_INJECT_FAULT == 1
                    // Test builds: a launch asked to fault never publishes row block 0, so a GEMM1 wait expires.
                    if (rb != 0 || !p.inject_fault)
#endif
                    {
                        const int pos = atomicAdd(&p.sync->ring_tail, 1);
                        fence_gpu();
                        st_relaxed_u64(&p.ring[pos], (p.epoch << 32) | (u64)rb);
                    }
                }
            }
        } else {
            // GEMM1 tickets walk the ring in groups of RING_GROUP row blocks, column tile outer: blocks published
            // together (usually one expert's) share each W2 slab while it is in L2.
            const int j = ticket - t0_total;
            const int full = rbs / RING_GROUP, span = RING_GROUP * NT1;
            int pos, n;
            if (j < full * span) {
                pos = (j / span) * RING_GROUP + j % RING_GROUP;
                n = (j % span) / RING_GROUP;
            } else {
                const int rest = rbs - full * RING_GROUP, k = j - full * span;
                pos = full * RING_GROUP + k % rest;
                n = k / rest;
            }
            if (threadIdx.x == 0) {
                // A ring entry waits on GEMM0 work that may itself wait for rows: twice the budget, so the upstream
                // wait (the root cause) is the one that expires and gets reported.
                s_last = wait_at_least(&p.ring[pos], p.epoch << 32, p.err, 2 * p.budget_ns, FMOE_PHASE_TASK, pos,
                                       p.rank);
                s_rb = (int)(ld_relaxed_u64(&p.ring[pos]) & 0xffffffffull);
            }
            __syncthreads();
            if (!s_last) return false;
            const int rb = s_rb;
            const int x = find_segment(L.rb_start, L.xs, rb);
            const int m = rb - L.rb_start[x];
            FMOE_TRACE_WAIT(FMOE_EV_TASK_WAIT);
            gemm1_task(p, L, x, m, n, smem);
            if (last_arrival(&p.done1[rb], NT1)) complete_row_block(p, L, x, m);
            __syncthreads();
            // Release this tile's pushes (if any) before counting it done: drain_combines reads the list's final
            // end only after every tile is counted.
            if (threadIdx.x == 0) { fence_gpu(); atomicAdd(&p.sync->tiles1_done, 1); }
        }
    }
}

}  // namespace fmoe
