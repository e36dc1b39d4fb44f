// Phase 3: the expert GEMM tiles and the ticket scheduler that runs them (and then drains the combines). See
// moe.cu.
#pragma once
#include "moe_params.cuh"
#include "phase_dispatch.cuh"
#include "phase_combine.cuh"
#include "phase_fp8.cuh"
#include "gemv.cuh"

namespace fmoe {

// ---- Phase 3: expert GEMMs and combine ---------------------------------------------------------------------------

// The A rows first … first + NR − 1 of expert x's GEMM0 (rows past `rows` read nothing): the token's x row, or
// (ranks, a routed expert) the row this rank received, in row order.
template <int NR>
FMOE_DEVICE void gemm0_a_rows(const Params &p, const Layout &L, int x, bool shared, int rows, int first,
                              TileSource &src) {
#pragma unroll
    for (int i = 0; i < NR / 32; ++i) {
        const int r = loader_row(i);
        src.a_valid[i] = first + r < rows;
        if (RANKS > 1 && !shared) {
            src.a[i] = (const char *)(p.peers[p.rank].recv +
                                      (size_t)(L.row_start[x] + (src.a_valid[i] ? first + r : 0)) * H);
        } else {
            int token = 0;
            if (src.a_valid[i]) token = shared ? first + r : p.row_token[L.row_start[x] + first + r];
            src.a[i] = (const char *)(p.x + (size_t)token * H);
        }
    }
}

// The first h row of expert x (task-space index): the shared expert's own buffer, or x's rows of hbuf.
FMOE_DEVICE T *h_rows(const Params &p, const Layout &L, int x) {
    return is_shared(L, x) ? p.hs : p.hbuf + (size_t)L.row_start[x] * I;
}

// GEMM0's epilogue for a staged tile c (NR rows, stride CS): h columns col0 … col0 + OUT_COLS − 1 of expert x's rows
// first … (of `rows`), activated (gated: activation(gate) · up, the up half OUT_COLS columns after the gate half;
// plain: with b1).
template <int NR, int CS, int OUT_COLS>
FMOE_DEVICE void gemm0_store(const Params &p, const Layout &L, int x, int rows, int first, int col0, const float *c) {
    const bool shared = is_shared(L, x);
    const int inter = shared ? IS : I;
    T *out = h_rows(p, L, x);
    for (int u = threadIdx.x; u < NR * OUT_COLS / 4; u += THREADS) {
        const int r = u / (OUT_COLS / 4), c4 = (u % (OUT_COLS / 4)) * 4;
        const int col = col0 + c4;
        if (first + r >= rows || col >= inter) continue;
        float v[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            if (GATED) {
                v[q] = activation(c[r * CS + c4 + q]) * c[r * CS + OUT_COLS + c4 + q];
            } else {
                const float b = (!shared && p.b1 != nullptr) ? p.b1[(size_t)x * I + col + q] : 0.f;
                v[q] = activation(c[r * CS + c4 + q] + b);
            }
        }
        store4(out + (size_t)(first + r) * inter + col, v[0], v[1], v[2], v[3]);
    }
}

FMOE_DEVICE void gemm0_task(const Params &p, const Layout &L, int x, int m, int n, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_GEMM0, x, m, n);
    const bool shared = is_shared(L, x);
    const int rows = shared ? p.tokens : rows_of(L, x);
    const int row0 = m * BM;
    const int n0 = shared ? N0S : N0;
    TileSource src;
    src.k_bytes = H * (int)sizeof(T);
    const T *w = shared ? p.ws1 : p.w1 + (size_t)x * N0 * H;
#if FMOE_PREC == 4
    if (!shared) gemm0_tile_fp8(p, L, x, rows, m, n, smem);  // phase_fp8.cuh
    else
#endif
    {
        gemm0_a_rows<BM>(p, L, x, shared, rows, row0, src);
        point_rows<EBN>(src.b, src.b_valid, w, n * EBN, n0, H);
        run_tile<SharedEngine>(smem, src);
    }
    constexpr int OUT_COLS = GATED ? EBN / 2 : EBN;
    gemm0_store<BM, c_stride<EBN>(), OUT_COLS>(p, L, x, rows, row0, n * OUT_COLS, (const float *)smem);
    __syncthreads();
}

// GEMM1's epilogue for a staged tile c (NR rows, stride CS): columns col0 … col0 + NC − 1 of rows first … of expert
// x, plus b2, into its FP32 rows (one GPU) or the source rank's return buffer (ranks).
template <int NR, int CS, int NC>
FMOE_DEVICE void gemm1_store(const Params &p, const Layout &L, int x, bool shared, int rows, int first, int col0,
                             const float *c) {
    float *out = shared ? p.ys : p.ybuf + (size_t)L.row_start[x] * H;
#if FMOE_NVSHMEM
    bool sent_remote = false;  // this thread put returns to a remote source
#endif
    for (int u = threadIdx.x; u < NR * NC / 4; u += THREADS) {
        const int r = u / (NC / 4), c4 = (u % (NC / 4)) * 4;
        const int col = col0 + c4;
        if (first + r >= rows || col >= H) continue;
        float4 v = *(const float4 *)&c[r * CS + c4];
        if (!shared && p.b2 != nullptr) {
            const float *b = p.b2 + (size_t)x * H + col;
            v.x += b[0]; v.y += b[1]; v.z += b[2]; v.w += b[3];
        }
        if (RANKS > 1 && !shared) {
            // Ranks: straight into the source's return buffer, at the (token, j) pair the row came from.
            const int o = p.peers[p.rank].row_origin[L.row_start[x] + first + r];
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
            *(float4 *)&out[(size_t)(first + r) * H + col] = v;
        }
    }
#if FMOE_NVSHMEM
    if (sent_remote) nv_complete_puts();  // returns to remote sources delivered before this tile counts as done
#endif
}

FMOE_DEVICE void gemm1_task(const Params &p, const Layout &L, int x, int m, int n, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_GEMM1, x, m, n);
    const bool shared = is_shared(L, x);
    const int rows = shared ? p.tokens : rows_of(L, x);
    const int row0 = m * BM;
    const int inter = shared ? IS : I;
    const T *a = h_rows(p, L, x);
    const T *w = shared ? p.ws2 : p.w2 + (size_t)x * H * I;
    TileSource src;
    src.k_bytes = inter * (int)sizeof(T);
#if FMOE_PREC == 4
    if (!shared) gemm1_tile_fp8(p, L, x, rows, m, n, smem);  // phase_fp8.cuh
    else
#endif
    {
        point_rows<BM>(src.a, src.a_valid, a, row0, rows, inter);
        point_rows<EBN>(src.b, src.b_valid, w, n * EBN, H, inter);
        run_tile<SharedEngine>(smem, src);
    }
    gemm1_store<BM, c_stride<EBN>(), EBN>(p, L, x, shared, rows, row0, n * EBN, (const float *)smem);
    __syncthreads();
}

// ---- Decode tiles ------------------------------------------------------------------------------------------------
// A launch with at most half as many 128 × 256 GEMM0 tiles as blocks (decode: a few rows of a few experts) runs
// every expert tile as DECODE_SPLIT tiles of 64 weight rows (WgmmaDecodeEngine, wgmma.cuh), 64 rows at a time:
// four times the tiles, so every SM streams weights, and half the zero rows per tile. The bits are the wide tiles'
// (every output element is the same instructions in the same K order). The choice is per launch and block-uniform
// (every block holds the same task space). FMOE_DECODE_TILES: 1 (default) chooses; 0 never and 2 always split (A/B
// runs).
#ifndef FMOE_DECODE_TILES
#define FMOE_DECODE_TILES 1
#endif
#if FMOE_WGMMA && FMOE_PREC >= 1 && FMOE_PREC <= 3
constexpr int DECODE_SPLIT = EBN / 64;
typedef WgmmaDecodeEngine<MMA> DecodeEngine;
constexpr int DECODE_STAGE_BYTES = (DecodeEngine::BM + DecodeEngine::BN) * ROW_BYTES;
// The ring's depth: as many stages as fit (12 in bf16), at most FMOE_DECODE_STAGES_MAX (16; lower for A/B runs).
// Bytes in flight matter: qwen3-30b-a3b S = 1 bf16 took 0.063 ms with 12 stages, 0.067 with 6, 0.069 with 4 (H200,
// 2026-12-02).
#ifndef FMOE_DECODE_STAGES_MAX
#define FMOE_DECODE_STAGES_MAX 16
#endif
constexpr int DECODE_STAGES = EXPERT_RING_BYTES / DECODE_STAGE_BYTES < FMOE_DECODE_STAGES_MAX
                                  ? EXPERT_RING_BYTES / DECODE_STAGE_BYTES
                                  : FMOE_DECODE_STAGES_MAX;
static_assert(DECODE_STAGES >= 3 && DecodeEngine::BM * DecodeEngine::C_STRIDE * 4 <= EXPERT_RING_BYTES,
              "the decode tiles' ring and staged tile live in the expert ring");

// GEMM0 decode tile q of expert tile n: weight rows n·EBN + … (gated: the 32 gate rows q·32 … and the 32 up rows
// that pair with them, EBN/2 further in the packing; plain: the 64 rows q·64 …), over row block m in passes of 64.
FMOE_DEVICE void gemm0_decode(const Params &p, const Layout &L, int x, int m, int n, int q, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_GEMM0, x, m, n * DECODE_SPLIT + q);
    const bool shared = is_shared(L, x);
    const int rows = shared ? p.tokens : rows_of(L, x);
    const int n0 = shared ? N0S : N0;
    const T *w = shared ? p.ws1 : p.w1 + (size_t)x * N0 * H;
    constexpr int OUT_COLS = GATED ? 32 : 64;
    const int col0 = n * (GATED ? EBN / 2 : EBN) + q * OUT_COLS;
    if (col0 >= (shared ? IS : I)) return;  // block-uniform: past the last column
    for (int r0 = m * BM; r0 < rows && r0 < (m + 1) * BM; r0 += DecodeEngine::BM) {
        TileSource src;
        src.k_bytes = H * (int)sizeof(T);
        gemm0_a_rows<DecodeEngine::BM>(p, L, x, shared, rows, r0, src);
#pragma unroll
        for (int i = 0; i < DecodeEngine::BN / 32; ++i) {
            const int r = loader_row(i);
            const int wrow = GATED ? n * EBN + (r < 32 ? q * 32 + r : EBN / 2 + q * 32 + r - 32) : n * EBN + q * 64 + r;
            src.b_valid[i] = wrow < n0;
            src.b[i] = (const char *)(w + (size_t)(src.b_valid[i] ? wrow : 0) * H);
        }
        gemm_tile_wgmma<DecodeEngine, DECODE_STAGES>(smem, src);
        gemm0_store<DecodeEngine::BM, DecodeEngine::C_STRIDE, OUT_COLS>(p, L, x, rows, r0, col0, (const float *)smem);
        __syncthreads();  // the staged tile is read before the next pass loads into the ring
    }
}

// GEMM1 decode tile q of expert tile n: output columns n·EBN + q·64 …, over row block m in passes of 64.
FMOE_DEVICE void gemm1_decode(const Params &p, const Layout &L, int x, int m, int n, int q, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_GEMM1, x, m, n * DECODE_SPLIT + q);
    const bool shared = is_shared(L, x);
    const int rows = shared ? p.tokens : rows_of(L, x);
    const int inter = shared ? IS : I;
    const T *a = h_rows(p, L, x);
    const T *w = shared ? p.ws2 : p.w2 + (size_t)x * H * I;
    const int col0 = n * EBN + q * DecodeEngine::BN;
    if (col0 >= H) return;  // block-uniform: past the last column
    for (int r0 = m * BM; r0 < rows && r0 < (m + 1) * BM; r0 += DecodeEngine::BM) {
        TileSource src;
        src.k_bytes = inter * (int)sizeof(T);
        point_rows<DecodeEngine::BM>(src.a, src.a_valid, a, r0, rows, inter);
        point_rows<DecodeEngine::BN>(src.b, src.b_valid, w, col0, H, inter);
        gemm_tile_wgmma<DecodeEngine, DECODE_STAGES>(smem, src);
        gemm1_store<DecodeEngine::BM, DecodeEngine::C_STRIDE, DecodeEngine::BN>(p, L, x, shared, rows, r0, col0,
                                                                                (const float *)smem);
        __syncthreads();
    }
}
#else
constexpr int DECODE_SPLIT = 1;
FMOE_DEVICE void gemm0_decode(const Params &, const Layout &, int, int, int, int, char *) {}
FMOE_DEVICE void gemm1_decode(const Params &, const Layout &, int, int, int, int, char *) {}
#endif

#if FMOE_PREC >= 2
// Tile n (or its decode part q of `split`) of GEMM `gemm` (0 or 1) of routed expert x, which has a few rows
// (gemv_expert), as a GEMV (gemv.cuh): the same weight rows and output columns as the tile it stands for, staged
// with stride GEMV_CS for the tile's own epilogue. Not inlined: one copy for both GEMMs, with registers of its own
// (inlined twice into a bf16 kernel it took paper-e64's with ranks from 236 registers to 255 and 4 bytes of spills
// on sm_90a).
__device__ __noinline__ void gemv_task(const Params &p, const Layout &L, int gemm, int x, int n, int q, int split,
                                       char *smem) {
    FMOE_TRACE_SCOPE(gemm == 0 ? FMOE_EV_GEMM0 : FMOE_EV_GEMM1, x, 0, n * split + q);
    const int rows = rows_of(L, x), tile_rows = EBN / split;
    const float *c = (const float *)smem;
    constexpr int WIDE_COLS = GATED ? EBN / 2 : EBN;  // GEMM0: h columns of a wide tile
    const int out_cols = WIDE_COLS / split;
    const int col0 = gemm == 0 ? n * WIDE_COLS + q * out_cols : n * EBN + q * tile_rows;
    if (col0 >= (gemm == 0 ? I : H)) return;  // block-uniform: a decode part past the last column
    // Weight rows: GEMM0 gated, the tile's gate rows, then the up rows that pair with them (EBN / 2 further in the
    // packing); otherwise the tile's rows in order (GEMM1: W2's rows are the output columns, from col0).
    GemvRows wr{n * EBN + q * tile_rows, 0, tile_rows};
    if (gemm == 0 && GATED) wr = GemvRows{n * EBN + q * out_cols, n * EBN + EBN / 2 + q * out_cols, out_cols};
    __shared__ GemvOperands op;
    gemv_operands(p, L, gemm, x, op);
    __syncthreads();
    gemv_tile(smem, op, tile_rows, wr);
    if (gemm == 0) {
        if (split == 1) gemm0_store<GEMV_TOKENS, GEMV_CS, WIDE_COLS>(p, L, x, rows, 0, col0, c);
        else gemm0_store<GEMV_TOKENS, GEMV_CS, WIDE_COLS / DECODE_SPLIT>(p, L, x, rows, 0, col0, c);
    } else {
        if (split == 1) gemm1_store<GEMV_TOKENS, GEMV_CS, EBN>(p, L, x, false, rows, 0, col0, c);
        else gemm1_store<GEMV_TOKENS, GEMV_CS, EBN / DECODE_SPLIT>(p, L, x, false, rows, 0, col0, c);
    }
    __syncthreads();
}
#else
FMOE_DEVICE void gemv_task(const Params &, const Layout &, int, int, int, int, int, char *) {}
#endif

// How many tiles each expert tile runs as in this launch: DECODE_SPLIT when the wide GEMM0 tiles would leave at
// least half of the blocks idle, else 1. Per SM a decode tile streams its weights more slowly than a wide one,
// so splitting pays only when it brings idle SMs in: paper-e64 S = 1 (16 wide tiles) 0.090 → 0.062 ms,
// qwen3-30b-a3b S = 1 (48) 0.084 → 0.082 ms, but qwen3-30b-a3b S = 3 (132) and deepseek-v3 S = 1 (144)
// 0.113 → 0.134 and 0.301 → 0.337 ms (H200, 2026-12-01).
FMOE_DEVICE int expert_split(int gemm0_tiles) {
    if (DECODE_SPLIT == 1 || FMOE_DECODE_TILES == 0) return 1;
    return FMOE_DECODE_TILES == 2 || 2 * gemm0_tiles <= ctas() ? DECODE_SPLIT : 1;
}

// Puts row block rb on the GEMM1 ring (thread 0, after acquiring every GEMM0 tile of the block).
FMOE_DEVICE void publish_row_block(const Params &p, int rb) {
#if FMOE_INJECT_FAULT == 1
    // Test builds: a launch asked to fault never publishes row block 0, so a GEMM1 wait expires.
    if (rb == 0 && p.inject_fault) return;
#endif
    const int pos = atomicAdd(&p.sync->ring_tail, 1);
    fence_gpu();
    st_relaxed_u64(&p.ring[pos], (p.epoch << 32) | (u64)rb);
}

// GEMM1 tickets at decode (split > 1: an expert has one row block, so grouped row blocks share no W2 slab) walk the
// ring one row block at a time, in publication order (FMOE_DECODE_RING 1, default; 0 keeps RING_GROUP). With
// groups of 8, the first GEMM1 tickets after qwen3-30b-a3b S = 1's first GEMM0 wave mapped to row blocks whose
// GEMM0 was still in its second wave: 24 blocks waited up to 16 µs (trace, H200, 2026-12-02).
#ifndef FMOE_DECODE_RING
#define FMOE_DECODE_RING 1
#endif

FMOE_DEVICE bool expert_phase(const Params &p, const Layout &L, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_EXPERT_PHASE, -1, 0, 0);
    __shared__ int s_ticket, s_last, s_rb;
    // Tickets count narrow tiles: each 128 × 256 tile of the task space is `split` tiles (decode), in a row.
    const int split = expert_split(L.task0_start[L.xs]);
    const int t0_total = L.task0_start[L.xs] * split;
    const int rbs = L.rb_start[L.xs];
    const int nt1 = NT1 * split;
    const int total = t0_total + rbs * nt1;
    const int group = FMOE_DECODE_RING && split > 1 ? 1 : RING_GROUP;
    for (;;) {
        if (threadIdx.x == 0) s_ticket = atomicAdd(&p.sync->ticket, 1);
        __syncthreads();
        const int ticket = s_ticket;
        if (ticket >= total) {
            // Warps drain on their own; the block leaves together, with one answer (block-uniform exits).
            const bool drained = drain_combines(p, rbs * nt1);
            return __syncthreads_and(drained) != 0;
        }
        if (ticket < t0_total) {
            // Column-tile-major within an expert: the CTAs running at once share one weight slab across all of the
            // expert's row blocks, so each slab is read from HBM about once (row-block-major re-read it per block).
            const int wide = ticket / split, q = ticket % split;
            const int x = find_segment(L.task0_start, L.xs, wide);
            const int nt = (is_shared(L, x) ? NT0S : NT0) * split;
            const int mt = L.rb_start[x + 1] - L.rb_start[x];
            const int local = wide - L.task0_start[x];
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
            if (gemv_expert(L, x)) gemv_task(p, L, 0, x, n, q, split, smem);  // decode: a few rows
            else if (split > 1) gemm0_decode(p, L, x, m, n, q, smem);
            else gemm0_task(p, L, x, m, n, smem);
            const int rb = L.rb_start[x] + m;
#if FMOE_PREC == 4
            // fp8: the block that completes a routed row block's GEMM0 quantizes its h (last_arrival acquired the
            // other tiles' h), then releases the codes with the ring entry.
            if (last_arrival(&p.done0[rb], nt)) {
                if (!is_shared(L, x)) {
                    quantize_h_fp8(p, L, x, m);
                    __threadfence();
                    __syncthreads();
                }
                if (threadIdx.x == 0) publish_row_block(p, rb);
            }
#else
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0 && atomicAdd(&p.done0[rb], 1) == nt - 1) {
                fence_gpu();  // acquire the other tiles of the block, then release them with the ring entry
                publish_row_block(p, rb);
            }
#endif
        } else {
            // GEMM1 tickets walk the ring in groups of `group` row blocks (RING_GROUP; one at decode, above),
            // column tile outer: blocks published together (usually one expert's) share each W2 slab in L2.
            const int j = (ticket - t0_total) / split, q = (ticket - t0_total) % split;
            const int full = rbs / group, span = group * NT1;
            int pos, n;
            if (j < full * span) {
                pos = (j / span) * group + j % group;
                n = (j % span) / group;
            } else {
                const int rest = rbs - full * group, k = j - full * span;
                pos = full * group + k % rest;
                n = k / rest;
            }
            if (threadIdx.x == 0) {
                // A ring entry waits on GEMM0 work that may itself wait for rows: twice the budget, so the upstream
                // wait (the root cause) is the one that expires and gets reported.
                u64 entry = 0;
                s_last = wait_at_least(&p.ring[pos], p.epoch << 32, p.err, 2 * p.budget_ns, FMOE_PHASE_TASK, pos,
                                       p.rank, &entry);
                s_rb = (int)(entry & 0xffffffffull);
            }
            __syncthreads();
            if (!s_last) return false;
            const int rb = s_rb;
            const int x = find_segment(L.rb_start, L.xs, rb);
            const int m = rb - L.rb_start[x];
            FMOE_TRACE_WAIT(FMOE_EV_TASK_WAIT);
            if (gemv_expert(L, x)) gemv_task(p, L, 1, x, n, q, split, smem);
            else if (split > 1) gemm1_decode(p, L, x, m, n, q, smem);
            else gemm1_task(p, L, x, m, n, smem);
            if (last_arrival(&p.done1[rb], nt1)) complete_row_block(p, L, x, m);
            __syncthreads();
            // Release this tile's pushes (if any) before counting it done: drain_combines reads the list's final
            // end only after every tile is counted.
            if (threadIdx.x == 0) { fence_gpu(); atomicAdd(&p.sync->tiles1_done, 1); }
        }
    }
}

}  // namespace fmoe
