// Phase 3: the ticket scheduler that runs the expert tiles (expert_tiles.cuh, decode_tiles.cuh), then drains the combines
// (phase_combine.cuh). See moe.cu.
#pragma once
#include "moe_params.cuh"
#include "phase_dispatch.cuh"
#include "phase_combine.cuh"
#include "phase_fp8.cuh"
#include "decode_tiles.cuh"

namespace fmoe {

// How many tiles each expert tile runs as in this launch: decode_split's (decode_tiles.cuh) when the wide GEMM0
// tiles would leave at least half of the blocks idle, else 1. Per SM a decode tile streams its weights more slowly
// than a wide one, so splitting pays only when it brings idle SMs in: paper-e64 S = 1 (16 wide tiles) 0.090 →
// 0.062 ms, qwen3-30b-a3b S = 1 (48) 0.084 → 0.082 ms, but qwen3-30b-a3b S = 3 (132) and deepseek-v3 S = 1 (144)
// 0.113 → 0.134 and 0.301 → 0.337 ms (H200, 2026-12-01).
FMOE_DEVICE int expert_split(int gemm0_tiles) {
    if (DECODE_SPLIT == 1 || FMOE_DECODE_TILES == 0) return 1;
    return FMOE_DECODE_TILES == 2 || 2 * gemm0_tiles <= ctas() ? decode_split(gemm0_tiles) : 1;
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

// Counts a GEMM0 tile of row block rb done (nt tiles make the block); the block's last tile puts it on the ring.
// Release: release_block_writes (sync.cuh) before the count.
FMOE_DEVICE void count_gemm0_tile(const Params &p, int rb, int nt) {
    release_block_writes();
    if (FMOE_TID == 0 && atomicAdd(&p.done0[rb], 1) == nt - 1) {
        fence_gpu();  // acquire the other tiles of the block, then release them with the ring entry
        publish_row_block(p, rb);
    }
}

#if FMOE_PREC == 4
// fp8 h is quantized per (row block, 128-channel group) by the block whose GEMM0 tile completes the group
// (FMOE_H_GROUPS 1, default), so no block quantizes a whole row block while GEMM1 or its next queued tile waits: at
// mixtral-8x7b (I = 14,336) that took one block 640 – 770 µs a row block (round 26, Benchmarks/RESULTS.md). 0 keeps
// the whole-row-block quantization everywhere. Decode launches (split > 1: a task is a slice of a tile) and GEMV
// experts (a few rows) always keep it.
#ifndef FMOE_H_GROUPS
#define FMOE_H_GROUPS 1
#endif
// h columns a GEMM0 column tile (EBN weight rows) writes, and the tiles that write one group: a gated tile's EBN rows
// are EBN/2 gate and EBN/2 up rows (moe_params.cuh), so two tiles a group; a plain tile writes EBN = 128 columns.
constexpr int H_TILE_COLS = GATED ? EBN / 2 : EBN;
constexpr int GROUP_TILES = FP8_GROUP / H_TILE_COLS;
static_assert(FP8_GROUP % H_TILE_COLS == 0, "a GEMM0 column tile's h columns lie in one 128-channel group");
static_assert((NT0 + GROUP_TILES - 1) / GROUP_TILES == KB_I, "done0 counts a row block's KB_I groups");

// Whether routed expert x's row blocks are quantized per group in a launch of `split` tiles an expert tile.
FMOE_DEVICE bool h_by_group(const Layout &L, int x, int split) {
    return FMOE_H_GROUPS && split == 1 && !is_shared(L, x) && !gemv_expert(L, x);
}

// Counts GEMM0 column tiles n0 … n0 + tiles − 1 of routed expert x's row block m (row block rb) on their groups'
// counters (p.hq_done); the block whose count completes a group (last_arrival: it acquired the group's other tile)
// quantizes that group's rows. Returns the groups this block completed (block-uniform). The last group has one tile
// when NT0 is odd (gated, I not a multiple of 128).
template <bool TMA_READS>
FMOE_DEVICE int count_h_groups(const Params &p, const Layout &L, int x, int m, int rb, int n0, int tiles) {
    int completed = 0;
    for (int g = n0 / GROUP_TILES; g <= (n0 + tiles - 1) / GROUP_TILES; ++g) {
        const int mine = min(n0 + tiles, (g + 1) * GROUP_TILES) - max(n0, g * GROUP_TILES);
        if (!last_arrival(&p.hq_done[(size_t)rb * KB_I + g], min(GROUP_TILES, NT0 - g * GROUP_TILES), mine)) continue;
        quantize_h_fp8<1>(p, L, x, m, g);  // group g of the row block (phase_fp8.cuh)
        // GEMM1 may read the codes by TMA (the async proxy): each thread fences its own writes to it. They are
        // released with the block's done0 count (count_gemm0_tile_fp8's last_arrival: release_block_writes).
        if (TMA_READS) asm volatile("fence.proxy.async.global;\n" ::: "memory");
        ++completed;
    }
    return completed;
}

// fp8: counts `tiles` GEMM0 column tiles n0 … of task-space expert x's row block m (row block rb; `nt` make the
// block) in a launch of `split` tiles an expert tile. Per group (h_by_group): the tiles count on their groups
// (count_h_groups), and only a block that completed groups counts them on done0, which KB_I groups complete; the
// last publishes the row block. A group's other tiles' h reaches GEMM1 through that chain of releases and acquires
// (tile → group count → quantizing block → done0 → ring). Otherwise done0 counts tiles, and the block whose count
// completes a routed row block quantizes its whole h (last_arrival acquired the other tiles' h), then releases the
// codes with the ring entry. TMA_READS: GEMM1 reads the codes by TMA (phase_experts_tma_fp8.cuh), the async proxy, so
// each thread first fences its own writes to it.
template <bool TMA_READS = false>
FMOE_DEVICE void count_gemm0_tile_fp8(const Params &p, const Layout &L, int x, int m, int rb, int nt, int n0,
                                      int split, int tiles = 1) {
    if (h_by_group(L, x, split)) {
        const int groups = count_h_groups<TMA_READS>(p, L, x, m, rb, n0, tiles);
        if (groups > 0 && last_arrival(&p.done0[rb], KB_I, groups) && FMOE_TID == 0) publish_row_block(p, rb);
        return;
    }
    if (!last_arrival(&p.done0[rb], nt, tiles)) return;
    if (!is_shared(L, x)) {
        quantize_h_fp8(p, L, x, m);
        if (TMA_READS) asm volatile("fence.proxy.async.global;\n" ::: "memory");
        // Release: publish_row_block fences after the barrier (sync.cuh, release_block_writes).
        if (FMOE_RELEASE_FENCE == 0) __threadfence();
        sync_block();
    }
    if (FMOE_TID == 0) publish_row_block(p, rb);
}
#endif

// Counts a GEMM1 tile of expert x's row block m (row block rb of the task space) done (nt1 tiles make the block).
// The block's last tile counts its tokens' contributions (pushing the completed ones on the combine list), then the
// launch's completed row blocks: drain_combines reads the list's final end only after every row block is counted,
// so the pushes are released first. Only that tile pays the second barrier and fence (FMOE_COUNT_BLOCKS1 1; 0,
// round 17's form, counted every GEMM1 tile of the launch after a barrier and a fence).
#ifndef FMOE_COUNT_BLOCKS1
#define FMOE_COUNT_BLOCKS1 1
#endif
// What Sync::gemm1_done reaches once a launch of `rbs` row blocks of `nt1` GEMM1 tiles each has counted them all.
FMOE_DEVICE int gemm1_done_target(int rbs, int nt1) { return FMOE_COUNT_BLOCKS1 ? rbs : rbs * nt1; }
// `tiles`: tiles counted at once (the fp8 TMA engine's pairs, phase_experts_tma_fp8.cuh).
FMOE_DEVICE void count_gemm1_tile(const Params &p, const Layout &L, int x, int m, int rb, int nt1, int tiles = 1) {
    const bool last = last_arrival(&p.done1[rb], nt1, tiles);
    if (last) complete_row_block(p, L, x, m);
    if (FMOE_COUNT_BLOCKS1 && !last) return;  // block-uniform
    sync_block();
    if (FMOE_TID == 0) { fence_gpu(); atomicAdd(&p.sync->gemm1_done, 1); }
}

// GEMM1 tickets at decode (split > 1: an expert has one row block, so grouped row blocks share no W2 slab) walk the
// ring one row block at a time, in publication order (FMOE_DECODE_RING 1, default; 0 keeps RING_GROUP). With
// groups of 8, the first GEMM1 tickets after qwen3-30b-a3b S = 1's first GEMM0 wave mapped to row blocks whose
// GEMM0 was still in its second wave: 24 blocks waited up to 16 µs (trace, H200, 2026-12-02).
#ifndef FMOE_DECODE_RING
#define FMOE_DECODE_RING 1
#endif

// GEMM1 wide tile j (of rbs row blocks × `cols` column tiles, or chains of CHAIN1 column tiles) walks the ring in
// groups of `group` row blocks, column tile outer: ring position `pos`, column tile (chain) `n`.
FMOE_DEVICE void gemm1_ring_slot(int j, int rbs, int group, int cols, int &pos, int &n) {
    const int full = rbs / group, span = group * cols;
    if (j < full * span) {
        pos = (j / span) * group + j % group;
        n = (j % span) / group;
    } else {
        const int rest = rbs - full * group, k = j - full * span;
        pos = full * group + k % rest;
        n = k / rest;
    }
}

#if FMOE_ACC_EPILOGUES
// GEMM1 column tiles n0 … n0 + CHAIN1 − 1 of expert x's row block m (row block rb of the task space) as one chain.
FMOE_DEVICE void gemm1_chain(const Params &p, const Layout &L, int x, int m, int rb, int n0, char *smem) {
    if (gemv_expert(L, x) || half_tile(task_rows(p, L, x), m * BM)) {
        for (int n = n0; n < n0 + CHAIN1; ++n) {
            if (gemv_expert(L, x)) gemv_task(p, L, 1, x, n, 0, 1, smem);
            else gemm1_task(p, L, x, m, n, smem);  // a half tile (expert_tiles.cuh)
            FMOE_TRACE_SCOPE(FMOE_EV_RELEASE, x, m, n);
            count_gemm1_tile(p, L, x, m, rb, NT1);
        }
        return;
    }
    chain_tiles(
        smem, CHAIN1, [&](int j) { return make_int3(x, m, n0 + j); },
        [&](int3 u, TileSource &src) { gemm1_source(p, L, u.x, u.y, u.z, src); },
        [&](int3 u, const float *acc) { gemm1_store_acc(p, L, u.x, u.y, u.z, acc); },
        [&](int3 u) { count_gemm1_tile(p, L, u.x, u.y, rb, NT1); });
}
#endif

FMOE_DEVICE bool expert_phase(const Params &p, const Layout &L, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_EXPERT_PHASE, -1, 0, 0);
    __shared__ int s_ticket, s_last, s_rb;
    // Tickets count narrow tiles: each 128 × 256 tile of the task space is `split` tiles (decode), in a row.
    const int split = expert_split(L.task0_start[L.xs]);
    const int t0_total = L.task0_start[L.xs] * split;
    const int rbs = L.rb_start[L.xs];
    const int nt1 = NT1 * split;
    // A GEMM1 ticket is CHAIN1 column tiles of wide tiles (expert_tiles.cuh, chain_tiles), one at decode.
    const int c1 = split == 1 ? CHAIN1 : 1;
    const int total = t0_total + rbs * nt1 / c1;
    const int group = FMOE_DECODE_RING && split > 1 ? 1 : RING_GROUP;
    for (;;) {
        if (FMOE_TID == 0) s_ticket = atomicAdd(&p.sync->ticket, 1);
        sync_block();
        const int ticket = s_ticket;
        if (ticket >= total) {
            // Warps drain on their own; the block leaves together, with one answer (block-uniform exits).
            const bool drained = drain_combines(p, gemm1_done_target(rbs, nt1));
            return sync_block_and(drained) != 0;
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
                if (FMOE_TID == 0) {
                    s_last = is_shared(L, x) ? wait_at_least(&p.tile_dispatched[m], p.epoch, p.err, p.budget_ns,
                                                             FMOE_PHASE_TILES, m, p.rank)
                                             : wait_rows(p, L, x, m);
                }
                sync_block();
                if (!s_last) return false;
                if (ticket == 0) stamp(p, 12, true);
            }
            if (gemv_expert(L, x)) gemv_task(p, L, 0, x, n, q, split, smem);  // decode: a few rows
            else if (split > 1) gemm0_decode(p, L, x, m, n, q, split, smem);
            else gemm0_task(p, L, x, m, n, smem);
            const int rb = L.rb_start[x] + m;
            FMOE_TRACE_SCOPE(FMOE_EV_RELEASE, x, m, n);
#if FMOE_PREC == 4
            count_gemm0_tile_fp8(p, L, x, m, rb, nt, n, split);  // quantizes h when it completes a group or block
#else
            count_gemm0_tile(p, rb, nt);
#endif
        } else {
            // GEMM1 tickets walk the ring in groups of `group` row blocks (RING_GROUP; one at decode, above),
            // column tile outer: blocks published together (usually one expert's) share each W2 slab in L2.
            const int j = (ticket - t0_total) / split, q = (ticket - t0_total) % split;
            int pos, n;
            gemm1_ring_slot(j, rbs, group, NT1 / c1, pos, n);
            if (FMOE_TID == 0) {
                // A ring entry waits on GEMM0 work that may itself wait for rows: twice the budget, so the upstream
                // wait (the root cause) is the one that expires and gets reported.
                u64 entry = 0;
                s_last = wait_at_least(&p.ring[pos], p.epoch << 32, p.err, 2 * p.budget_ns, FMOE_PHASE_TASK, pos,
                                       p.rank, &entry);
                s_rb = (int)(entry & 0xffffffffull);
            }
            sync_block();
            if (!s_last) return false;
            const int rb = s_rb;
            const int x = find_segment(L.rb_start, L.xs, rb);
            const int m = rb - L.rb_start[x];
            FMOE_TRACE_WAIT(FMOE_EV_TASK_WAIT);
#if FMOE_ACC_EPILOGUES
            if (c1 > 1) {
                gemm1_chain(p, L, x, m, rb, n * c1, smem);
                continue;
            }
#endif
            if (gemv_expert(L, x)) gemv_task(p, L, 1, x, n, q, split, smem);
            else if (split > 1) gemm1_decode(p, L, x, m, n, q, split, smem);
            else gemm1_task(p, L, x, m, n, smem);
            FMOE_TRACE_SCOPE(FMOE_EV_RELEASE, x, m, n);
            count_gemm1_tile(p, L, x, m, rb, nt1);
        }
    }
}

}  // namespace fmoe
