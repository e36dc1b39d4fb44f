// Expert parallelism (ranks): the count all-gather, the per-rank layout, dispatching routed rows into their
// owners' receive buffers with one flag per (source, expert), and the waits on those flags. See moe.cu.
#pragma once
#include "moe_params.cuh"

namespace fmoe {

// Ranks: reset this rank's per-launch counters (nobody uses them before every rank's counts are in), then send
// this rank's per-expert counts to every rank and flag them with the epoch (system-scope release: peers may be
// other GPUs).
FMOE_DEVICE void publish_counts(const Params &p, int rb_max) {
    for (int i = FMOE_TID; i < rb_max; i += THREADS) { p.done0[i] = 0; p.done1[i] = 0; }
#if FMOE_PREC == 4
    for (int i = FMOE_TID; i < rb_max * KB_I; i += THREADS) p.hq_done[i] = 0;  // h's group counts (phase_experts.cuh)
#endif
    for (int i = FMOE_TID; i < E; i += THREADS) p.rows_sent[i] = 0;
    if (FMOE_TID == 0) {
        p.sync->ticket = 0;
        p.sync->ring_tail = 0;
        p.sync->list_tail = 0;
        p.sync->combine_ticket = 0;
        p.sync->my_total = 0;
        p.sync->dispatch_done = 0;
    }
    for (int i = FMOE_TID; i < RANKS * E; i += THREADS) {
        const int q = i / E, e = i % E;
#if FMOE_NVSHMEM
        if (nv_remote(p.peers[p.rank].sync, q)) continue;  // sent below as one put-with-signal
#endif
        p.peers[q].all_counts[p.rank * E + e] = p.expert_load[e];
    }
    __threadfence_system();
    sync_block();
    if (FMOE_TID < RANKS) {
#if FMOE_NVSHMEM
        const int q = FMOE_TID;
        if (nv_remote(p.peers[p.rank].sync, q)) {
            nv_put_counts(&p.peers[q].all_counts[p.rank * E], p.expert_load, E, &p.peers[q].count_flags[p.rank],
                          p.epoch, q);
            return;
        }
#endif
        fence_sys();
        st_relaxed_sys_u64(&p.peers[FMOE_TID].count_flags[p.rank], p.epoch);
    }
}

// Ranks: after every rank's counts are in, the layout this rank needs. Global slot of a (token, expert) pair =
// rows of lower ranks + this rank's slot; a pair is kept when its global slot is below the capacity, exactly the
// oracle's rule over the concatenated tokens. Each expert's rows sit in its owner's receive buffer in global slot
// order, so rows, tiles and results equal the single-rank run.
FMOE_DEVICE bool rank_layout(const Params &p, Layout &L) {
    __shared__ int ok;
    if (FMOE_TID == 0) ok = 1;
    sync_block();
    if (FMOE_TID < RANKS) {
        // Acquire (system scope: the flag may come from another GPU); the barrier below orders every thread's
        // reads of the counts after it.
        if (!wait_at_least<true>(&p.peers[p.rank].count_flags[FMOE_TID], p.epoch, p.err, p.budget_ns,
                                 FMOE_PHASE_COUNTS, FMOE_TID, p.rank))
            ok = 0;
        fence_sys();
    }
    sync_block();
    for (int e = FMOE_TID; e < E; e += THREADS) {
        int before = 0, total = 0;
        for (int q = 0; q < RANKS; ++q) {
            const int c = p.peers[p.rank].all_counts[q * E + e];
            if (q < p.rank) before += c;
            total += c;
        }
        L.before_me[e] = before;
        L.kept_total[e] = total < p.capacity ? total : p.capacity;
    }
    sync_block();
    const int first = rank_first(p.rank), local = rank_first(p.rank + 1) - first;
    if (FMOE_TID == 0) {
        int all = 0;
        for (int q = 0; q < RANKS; ++q) {
            int row = 0;
            for (int e = rank_first(q); e < rank_first(q + 1); ++e) {
                L.owner_row_start[e] = row;
                row += L.kept_total[e];
            }
            all += row;
        }
#if FMOE_RANKS > 1
        L.global_rows = all;
#endif
        L.xs = local + 1;
    }
    task_space(local, p.tokens, [&](int x) { return L.kept_total[first + x]; }, L.row_start, L.rb_start,
               L.task0_start);
    // One read of the abort flag for the block, so every thread returns the same answer (block-uniform exits).
    if (FMOE_TID == 0 && aborted(p.err)) ok = 0;
    sync_block();
    const bool good = ok != 0;
    sync_block();
    return good;
}

// Ranks: how many of a source's `count` rows for an expert it keeps when lower ranks routed `before` rows to it:
// capacity counts rows in global token order, so the rows of lower ranks come first.
FMOE_DEVICE int kept_after(const Params &p, int before, int count) {
    const int kept = p.capacity - before;
    return kept < 0 ? 0 : (kept > count ? count : kept);
}

// Ranks: rows of source rank q that expert e keeps (from this rank's copy of the all-gathered counts).
FMOE_DEVICE int kept_rows(const Params &p, int q, int e) {
    int before = 0;
    for (int r = 0; r < q; ++r) before += p.peers[p.rank].all_counts[r * E + e];
    return kept_after(p, before, p.peers[p.rank].all_counts[q * E + e]);
}

// Ranks: this rank's flag for expert e, in the owner's memory: (epoch << 32) | rows. The caller has released
// every row of the pair at system scope (or there are none). One store per (source, expert) per launch.
FMOE_DEVICE void publish_rows(const Params &p, int e, int rows) {
    const int q = owner_of(e);
#if FMOE_INJECT_FAULT == 2
    // Test builds: from the second launch on, the last rank never flags expert 0, so the owner still sees the
    // previous epoch's flag (with its row count) and must not take it for this one.
    if (p.inject_fault && p.rank == RANKS - 1 && e == 0 && p.epoch >= 2) return;
#endif
#if FMOE_NVSHMEM
    if (nv_remote(p.peers[p.rank].sync, q)) {
        nv_set_flag(&p.peers[q].row_flags[p.rank * E_LOCAL_MAX + (e - rank_first(q))], (p.epoch << 32) | (u64)rows, q);
        return;
    }
#endif
    st_relaxed_sys_u64(&p.peers[q].row_flags[p.rank * E_LOCAL_MAX + (e - rank_first(q))], (p.epoch << 32) | (u64)rows);
}

// Ranks: copies one row (BYTES, a multiple of 16) with every lane's loads in flight before its stores: a plain copy
// loop would wait out a full memory round trip per 512 bytes (the compiler cannot batch through possibly aliasing
// pointers), which made dispatch latency-bound.
template <int BYTES>
FMOE_DEVICE void copy_row(uint4 *dst, const uint4 *src, int lane) {
    static_assert(BYTES % 16 == 0, "rows are copied in 16-byte vectors");
    constexpr int V = BYTES / 16;  // 16-byte vectors per row
    constexpr int BATCH = 8;                    // vectors per lane in flight
    for (int v0 = 0; v0 < V; v0 += 32 * BATCH) {
        uint4 r[BATCH];
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
            const int v = v0 + b * 32 + lane;
            if (v < V) r[b] = src[v];
        }
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
            const int v = v0 + b * 32 + lane;
            if (v < V) dst[v] = r[b];
        }
    }
}

// Ranks: token t's row into row `row` of the owner's receive buffer `recv`, by one warp: x as it is, or (fp8) its
// E4M3 codes and then their scales as the gate phase quantized them (xq, xq_scale), half the bytes of a BF16 row.
FMOE_DEVICE void send_row(const Params &p, T *recv, int row, int t, int lane) {
    unsigned char *dst = (unsigned char *)(recv + (size_t)row * H);
#if FMOE_PREC == 4
    copy_row<H>((uint4 *)dst, (const uint4 *)(p.xq + (size_t)t * H), lane);
    for (int g = lane; g < KB_H; g += 32) ((float *)(dst + H))[g] = p.xq_scale[(size_t)t * KB_H + g];
#else
    copy_row<H * (int)sizeof(T)>((uint4 *)dst, (const uint4 *)(p.x + (size_t)t * H), lane);
#endif
}

// Ranks: dispatch, step 1 (per token tile): each token's global slots, target and pending count, zeros for a
// token nothing will contribute to; then the tile counts as prepared (dispatch_done) and its flag tells the shared
// expert its targets are set.
FMOE_DEVICE void prepare_tiles(const Params &p, const Layout &L) {
    const int tiles = (p.tokens + BT - 1) / BT;
    for (int tile = cta(); tile < tiles; tile += ctas()) {
        const int lt = FMOE_TID, t = tile * BT + lt;
        if (lt < BT && t < p.tokens) {
            int contributions = HAS_SHARED ? 1 : 0;
#pragma unroll
            for (int j = 0; j < K; ++j) {
                const int e = p.ids[(size_t)t * K + j];
                int slot = -1;
                if (e >= 0) {
                    const int g = L.before_me[e] + p.base[(size_t)tile * E + e] + p.rank_in_tile[(size_t)t * K + j];
                    if (g < p.capacity) { slot = g; ++contributions; }
                }
                p.slot_row[(size_t)t * K + j] = slot;  // ranks: the pair's global slot in its expert
            }
            set_token_target(p, t, contributions);
            if (contributions != 0) atomicAdd(&p.sync->my_total, 1);
        }
        sync_block();
        if (FMOE_TID == 0) {
            // Release the tile's targets (to owners on other GPUs too) before counting it prepared.
            fence_sys();
            st_relaxed_u64(&p.tile_dispatched[tile], p.epoch);
            atomicAdd(&p.sync->dispatch_done, 1);
        }
    }
}

// Ranks: dispatch, step 2 (all blocks of the rank, chunks of DISPATCH_CHUNK (token, j) pairs): every kept pair's
// row is stored straight into the owner's receive buffer with its origin. After a chunk, one thread per expert
// present releases the chunk's rows (the block barrier orders every warp's stores before its system-scope fence)
// and adds the chunk's rows to rows_sent[e]; the addition that completes the expert's kept rows waits until every
// tile's targets are set (owners count contributions against them), fences again and publishes the owner's flag.
// Experts this rank sends nothing get an empty flag at once.
constexpr int DISPATCH_CHUNK = 128;
static_assert((2 * DISPATCH_CHUNK + E) * 4 <= DYNAMIC_SMEM - 1024, "dispatch_rows' staging exceeds the dynamic shared memory");
FMOE_DEVICE bool dispatch_rows(const Params &p, const Layout &L, char *smem) {
    int *dest = (int *)smem;                // [CHUNK] owner row of the pair, or −1
    int *expert = dest + DISPATCH_CHUNK;    // [CHUNK]
    int *rows = expert + DISPATCH_CHUNK;    // [E] rows of the chunk per expert
    __shared__ int ok;
    const int tiles = (p.tokens + BT - 1) / BT;
    const int pairs = p.tokens * K, chunks = (pairs + DISPATCH_CHUNK - 1) / DISPATCH_CHUNK;
    const int warp = FMOE_TID >> 5, lane = FMOE_TID & 31;
    if (FMOE_TID == 0) ok = 1;
    if (cta() == 0)
        for (int e = FMOE_TID; e < E; e += THREADS)
            if (kept_after(p, L.before_me[e], p.expert_load[e]) == 0) publish_rows(p, e, 0);
    for (int e = FMOE_TID; e < E; e += THREADS) rows[e] = 0;
#if FMOE_PREC == 4
    // fp8: the rows sent are x's codes, which every block of this rank quantized in the gate phase and counted on
    // xq_ready after a system-scope fence (phase_gate.cuh); acquire them all before the first copy or put.
    if (FMOE_TID == 0 && !wait_at_least(&p.sync->xq_ready, ctas(), p.err, p.budget_ns, FMOE_PHASE_XQ, ctas(), p.rank))
        ok = 0;
    sync_block();
    if (!ok) return false;  // block-uniform: one shared answer
#endif
    sync_block();
    for (int c = cta(); c < chunks; c += ctas()) {
        const int i = c * DISPATCH_CHUNK + (int)FMOE_TID;
        if (FMOE_TID < DISPATCH_CHUNK) {
            int row = -1, e = -1;
            if (i < pairs && (e = p.ids[i]) >= 0) {
                const int t = i / K;
                const int g = L.before_me[e] + p.base[(size_t)(t / BT) * E + e] + p.rank_in_tile[i];
                if (g < p.capacity) {
                    row = L.owner_row_start[e] + g;
                    atomicAdd(&rows[e], 1);
                }
            }
            dest[FMOE_TID] = row;
            expert[FMOE_TID] = e;
        }
        sync_block();
#if FMOE_NVSHMEM
        bool sent_remote = false;  // this thread issued puts to remote owners in this chunk
#endif
        for (int k = warp; k < DISPATCH_CHUNK; k += THREADS / 32) {
            const int row = dest[k];
            if (row < 0) continue;
            const int pair = c * DISPATCH_CHUNK + k;
            const Peer &o = p.peers[owner_of(expert[k])];
#if FMOE_NVSHMEM
            if (nv_remote(p.peers[p.rank].sync, owner_of(expert[k]))) {
                // A remote owner: the row and its origin as puts, completed below before the chunk is counted.
                const int q = owner_of(expert[k]);
#if FMOE_PREC == 4
                // fp8: the codes, then their scales (send_row's layout).
                unsigned char *dst = (unsigned char *)(o.recv + (size_t)row * H);
                nv_put_row_warp(dst, p.xq + (size_t)(pair / K) * H, (size_t)H, q);
                nv_put_row_warp(dst + H, p.xq_scale + (size_t)(pair / K) * KB_H, (size_t)KB_H * 4, q);
#else
                nv_put_row_warp(o.recv + (size_t)row * H, p.x + (size_t)(pair / K) * H, (size_t)H * sizeof(T), q);
#endif
                if (lane == 0) nvshmem_int_p(&o.row_origin[row], (p.rank << PAIR_BITS) | pair, q);
                sent_remote = true;
                continue;
            }
#endif
            send_row(p, o.recv, row, pair / K, lane);
            if (lane == 0) o.row_origin[row] = (p.rank << PAIR_BITS) | pair;
        }
#if FMOE_NVSHMEM
        if (sent_remote) nv_complete_puts();  // delivered before the chunk's rows are counted (and flagged)
#endif
        sync_block();
        for (int e = FMOE_TID; e < E; e += THREADS) {
            const int n = rows[e];
            if (n == 0) continue;
            rows[e] = 0;
            fence_sys();
            const int kept = kept_after(p, L.before_me[e], p.expert_load[e]);
            if (atomicAdd(&p.rows_sent[e], n) + n == kept) {
                if (wait_at_least(&p.sync->dispatch_done, tiles, p.err, p.budget_ns, FMOE_PHASE_TILES, tiles,
                                  p.rank)) {
                    fence_sys();
                    publish_rows(p, e, kept);
                } else {
                    ok = 0;
                }
            }
        }
        sync_block();
    }
    sync_block();
    return ok != 0;
}

// Ranks: waits until every source whose rows fall in row block m of local expert x has flagged them: the flag
// of this epoch with the source's row count (acquire, system scope).
FMOE_DEVICE bool wait_rows(const Params &p, const Layout &L, int x, int m) {
    const int e = rank_first(p.rank) + x;
    const int lo = m * BM, hi = lo + BM;
    int before = 0;
    for (int q = 0; q < RANKS; ++q) {
        const int c = p.peers[p.rank].all_counts[q * E + e];
        const int kept = kept_after(p, before, c);
        if (kept > 0 && before < hi && before + kept > lo) {
            if (!wait_at_least<true>(&p.peers[p.rank].row_flags[q * E_LOCAL_MAX + x], (p.epoch << 32) | (u64)kept,
                                     p.err, p.budget_ns, FMOE_PHASE_DISPATCH, q * E + e, p.rank))
                return false;
        }
        before += c;
    }
    return true;
}

// Ranks: the rank's last block out checks that every source flagged every local expert in this epoch with the row
// count the all-gather announced (empty pairs included), so a lost, stale or miscounted flag is an error.
FMOE_DEVICE bool check_row_flags(const Params &p) {
    __shared__ int ok;
    if (FMOE_TID == 0) ok = 1;
    sync_block();
    const int first = rank_first(p.rank), local = rank_first(p.rank + 1) - first;
    for (int i = FMOE_TID; i < RANKS * local; i += THREADS) {
        const int q = i / local, e = first + i % local;
        const u64 *flag = &p.peers[p.rank].row_flags[q * E_LOCAL_MAX + i % local];
        const u64 want = (p.epoch << 32) | (u64)kept_rows(p, q, e);
        if (!wait_at_least<true>(flag, p.epoch << 32, p.err, p.budget_ns, FMOE_PHASE_DISPATCH, q * E + e, p.rank)) {
            ok = 0;
            break;
        }
        const u64 seen = ld_relaxed_sys_u64(flag);
        if (seen != want) {
            report_error(p.err, FMOE_ERR_BAD_FLAG, FMOE_PHASE_DISPATCH, q * E + e, p.rank, want, seen);
            ok = 0;
            break;
        }
    }
    sync_block();
    return ok != 0;
}

// Ranks: before this rank writes into any peer for this launch, every peer must have finished the previous one
// (its last block out stores done_epoch): launches queued back to back on several GPUs (or streams) never
// overwrite counts, rows or flags a slower peer is still reading.
FMOE_DEVICE bool wait_peers_done(const Params &p) {
    __shared__ int ok;
    if (FMOE_TID == 0) ok = 1;
    sync_block();
#if FMOE_NVSHMEM
    if (FMOE_TID < RANKS && nv_remote(p.peers[p.rank].sync, FMOE_TID)) {
        if (!nv_wait_remote_at_least(&p.peers[FMOE_TID].sync->done_epoch, FMOE_TID, p.epoch - 1, p.err,
                                     p.budget_ns, FMOE_PHASE_PEER_DONE, FMOE_TID, p.rank))
            ok = 0;
    } else
#endif
    if (FMOE_TID < RANKS && !wait_at_least<true>(&p.peers[FMOE_TID].sync->done_epoch, p.epoch - 1, p.err,
                                                    p.budget_ns, FMOE_PHASE_PEER_DONE, FMOE_TID, p.rank))
        ok = 0;
    sync_block();
    return ok != 0;
}

}  // namespace fmoe
