// FlashMoE's fused forward: a whole MoE layer in one persistent, cooperative launch.
//
// Roles: every CTA is a worker; work comes from device-side counters, never from the host.
//
// Phases of one launch (epoch = the host's call number, never reset):
//   1. Gate. Tasks (token tile of 128, expert tile of 128) from a ticket counter: logits = x·Wgᵀ in FP32. The CTA
//      that finishes a token tile's last expert tile routes the tile (a warp per token, router.cuh), writes ids,
//      weights, each pair's rank among the tile's tokens routed to the same expert, and the tile's per-expert
//      counts. The CTA that finishes the last tile scans the counts (per expert over tiles) and publishes the scan
//      with the epoch.
//   2. Place. After the scan, a pair's slot in its expert is base[tile][e] + rank: the number of lower-index tokens
//      routed there, so slots and capacity drops never depend on timing. Kept pairs get a global row; each token
//      learns how many contributions it waits for. Grid barrier.
//   3. Experts. One ticket counter hands out GEMM0 tasks (x, m, n) in (expert, row block, column tile) order,
//      then GEMM1 tasks. A GEMM0 tile computes act(x·W1ᵀ + b1) (or act(g)·u) for 128 gathered rows. The CTA whose
//      tile completes a row block's GEMM0 publishes the row block into a ring; GEMM1 tickets map to ring slots in
//      publication order, so every ticket ahead of a waiting one belongs to work that needs no wait: no deadlock.
//   4. Combine. The CTA whose GEMM1 tile completes a row block counts one contribution for each token in it; the
//      contribution that completes a token makes that CTA sum the token's k expert rows in rank order (plus the
//      shared expert) and write y once. No float atomics: the same bits every run.
// The shared expert is the last expert of the task space: every token is a row of it, and its gate, when present,
// is an extra row of the router weight.
//
// Ranks (FMOE_RANKS = R > 1, expert parallelism; fmoe_forward_ranks): a launch runs one or more ranks (all R on
// one GPU, or one GPU's share of them, its blocks split into groups, one per rank), each with its own tokens,
// buffers and counters; rank r owns a contiguous block of experts. Phase 1 is per rank. Then every rank
// all-gathers the per-expert counts (capacity follows the global token order, and each expert's rows sit in its
// owner's receive buffer in global order, so rows, tiles and bits equal one rank's) and stores each routed row
// straight into the owner's receive buffer. When its last row for an expert is stored, the source fences at
// system scope and publishes one 8-byte flag (epoch << 32 | rows) in the owner's memory; a pair with no rows gets
// the same flag with 0 rows. Flags are never cleared: the epoch of the next launch supersedes them. An owner's
// GEMM0 for a row block starts once the sources in that block have flagged. GEMM1 epilogues write straight into
// the source's return buffer and count the token's contribution there (system-scope atomics); the source combines
// its own tokens. No grid barrier: every dependency is a flag or a counter with a bounded wait.
#include "common.cuh"
#include "sync.cuh"
#include "gemm_tile.cuh"
#include "wgmma.cuh"
#include "router.cuh"
#include "launch_limits.cuh"
#include "trace.cuh"

// ---- Specialisation (defined by the host as -D options) ---------------------------------------------------------
#ifndef FMOE_H
#error "FMOE_H (hidden size) must be defined"
#endif
// FMOE_I, FMOE_E, FMOE_K, FMOE_PREC (0 fp32, 1 tf32, 2 bf16, 3 fp16), FMOE_ACT (0 relu, 1 gelu, 2 gelu-tanh,
// 3 silu), FMOE_GATED, FMOE_BIAS, FMOE_SCORING (0 softmax, 1 sigmoid), FMOE_GROUPS, FMOE_GROUPS_KEPT, FMOE_RENORM,
// FMOE_SCALE, FMOE_SHARED_I (0 = no shared expert), FMOE_SHARED_GATED, FMOE_STAGES, FMOE_WGMMA (sm_90a: Hopper
// warpgroup MMA instead of mma.sync), FMOE_INJECT_FAULT (test builds), FMOE_STOP_AFTER (timing builds: 1 skips
// placement and the experts, 2 skips the experts; they keep every counter consistent but produce no output).
#ifndef FMOE_WGMMA  // default: wgmma where the target has it (sm_90a), mma.sync elsewhere
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FMOE_WGMMA 1
#else
#define FMOE_WGMMA 0
#endif
#endif
#ifndef FMOE_RANKS  // ranks sharing this launch (expert parallelism); 1 = the single-GPU operator
#define FMOE_RANKS 1
#endif
#ifndef FMOE_TIMING
#define FMOE_TIMING 0
#endif
#ifndef FMOE_STOP_AFTER
#define FMOE_STOP_AFTER 0
#endif
#ifndef FMOE_INJECT_FAULT
#define FMOE_INJECT_FAULT 0
#endif

namespace fmoe {

constexpr int H = FMOE_H, I = FMOE_I, E = FMOE_E, K = FMOE_K;
constexpr int IS = FMOE_SHARED_I;
constexpr bool HAS_SHARED = IS > 0;
constexpr bool GATED = FMOE_GATED != 0;
constexpr int EG = E + (HAS_SHARED && FMOE_SHARED_GATED ? 1 : 0);  // router rows (+ shared gate)
constexpr int STAGES = FMOE_STAGES;
constexpr int BT = 128;  // tokens per routing tile (= BM)

#if FMOE_PREC == 2
typedef bf16_t T;
constexpr int MMA = MMA_BF16;
#elif FMOE_PREC == 3
typedef f16_t T;
constexpr int MMA = MMA_F16;
#else
typedef float T;
[[maybe_unused]] constexpr int MMA = MMA_TF32;  // tf32 mode only; fp32 mode runs the exact FFMA engine
#endif

// The engines: exact FFMA in fp32 mode, otherwise tensor cores (wgmma on sm_90a, mma.sync elsewhere). The gate's
// routing math stays FP32: 16-bit modes multiply exactly on tensor cores (products of bf16/fp16 are exact in FP32);
// fp32 and tf32 modes use exact FFMA so no TF32 rounding can flip a routing decision.
#if FMOE_PREC == 0
typedef FfmaEngine ExpertEngine;
#elif FMOE_WGMMA
typedef WgmmaEngine<MMA> ExpertEngine;
#else
typedef MmaEngine<MMA> ExpertEngine;
#endif
#if FMOE_PREC <= 1
typedef FfmaEngine GateEngine;
#else
typedef ExpertEngine GateEngine;
#endif
constexpr int EBN = ExpertEngine::BN;  // expert tile width
constexpr int GBN = GateEngine::BN;    // gate tile width

template <class Engine> FMOE_DEVICE void run_tile(char *smem, const TileSource &src) {
    if constexpr (Engine::WGMMA) gemm_tile_wgmma<Engine::KIND, STAGES>(smem, src);
    else gemm_tile<Engine, STAGES>(smem, src);
}

// GEMM0 output columns: I for the plain FFN; for the gated FFN, W1 and W3 are packed by the host into blocks of
// EBN rows (EBN/2 gate rows, then the matching EBN/2 up rows), I padded up to a multiple of EBN/2.
constexpr int n0_cols(int inter) { return GATED ? ((inter + EBN / 2 - 1) / (EBN / 2)) * EBN : inter; }
constexpr int N0 = n0_cols(I), N0S = n0_cols(IS > 0 ? IS : 1);
constexpr int NT0 = (N0 + EBN - 1) / EBN, NT0S = (N0S + EBN - 1) / EBN;
constexpr int NT1 = (H + EBN - 1) / EBN;
constexpr int NTE = (EG + GBN - 1) / GBN;
constexpr int RING_GROUP = 8;        // GEMM1 row blocks scheduled together (see expert_phase)
constexpr int GATE_KSPLIT_MAX = 4;  // the gate's K is split at most this many ways
constexpr int cmax(int a, int b) { return a > b ? a : b; }
// Dynamic shared memory: the larger ring or staged tile of the two engines, plus 1 KiB to align stages to 1024.
constexpr int DYNAMIC_SMEM = cmax(cmax(STAGES * stage_bytes<EBN>(), STAGES * stage_bytes<GBN>()),
                                  cmax(c_bytes<EBN>(), c_bytes<GBN>())) + 1024;
// Tokens whose logits route_tile stages in shared memory at once: what fits beside the masks and ids (a multiple
// of 32, at most a tile).
constexpr int ROUTE_CHUNK_FIT = ((DYNAMIC_SMEM - 1024 - E * 16 - BT * K * 4) / ((EG + 1) * 4)) / 32 * 32;
constexpr int ROUTE_CHUNK = ROUTE_CHUNK_FIT > BT ? BT : ROUTE_CHUNK_FIT;
static_assert(ROUTE_CHUNK >= 32, "route_tile needs room for at least 32 rows of logits");
FMOE_CHECK_DYNAMIC_SMEM(DYNAMIC_SMEM);
constexpr int XS = E + 1;  // task-space experts, at most: the routed ones + the shared one (empty when absent)
constexpr int RANKS = FMOE_RANKS;
// Expert placement over ranks: contiguous blocks, the first E mod R ranks one expert larger.
constexpr int rank_first(int q) { return q * (E / RANKS) + (q < E % RANKS ? q : E % RANKS); }
constexpr int E_LOCAL_MAX = (E + RANKS - 1) / RANKS;
FMOE_DEVICE int owner_of(int e) {
    int q = 0;
    while (q + 1 < RANKS && rank_first(q + 1) <= e) ++q;
    return q;
}

struct Sync {
    u64 barrier;     // grid barrier counter (monotone)
    u64 stamps[16];  // FMOE_TIMING builds: %globaltimer at phase boundaries (see stamp())
    u64 scan_done;   // = epoch once the routing scan of this launch is published
    int gate_ticket; // phase 1 task counter
    int tiles_done;  // routed token tiles
    int ticket;      // phase 3 task counter
    int ring_tail;   // published GEMM1 row blocks
    int list_tail;   // tokens pushed to the combine list
    int combine_ticket;  // combine list positions claimed
    int tiles1_done; // GEMM1 tiles whose completion (and pushes) are finished
    int my_total;    // ranks: this rank's tokens that will be pushed to its combine list
    int dispatch_done;  // ranks: this rank's token tiles dispatched
    int exit_count;  // ranks: blocks of this rank that finished the launch
    u64 done_epoch;  // ranks: = epoch once every block of this rank finished the launch (read by peers)
};

// What every rank exposes to the others (peer-mapped device pointers; on one GPU, plain pointers).
struct Peer {
    T *recv;              // [rows, H] the owner's receive buffer: the rows routed to its experts
    int *row_origin;      // [rows] (source rank << 24) | (token · K + j) of each received row
    u64 *row_flags;       // [RANKS, E_LOCAL_MAX] (epoch << 32 | rows) from each source for each local expert
    int *all_counts;      // [RANKS, E] every rank's per-expert token counts (the all-gather)
    u64 *count_flags;     // [RANKS] epoch once a rank's counts are in all_counts
    float *ret;           // [S·K, H] the source's return buffer: expert outputs of its (token, j) pairs
    int *pending;         // [S] contributions arrived, per token of the source
    int *target;          // [S] contributions expected
    u64 *list;            // [S] the source's combine list
    Sync *sync;           // the source's counters
};

struct Params {
    const T *x;            // [S, H]
    const T *wg;           // [EG, H] router rows (+ shared-expert gate row)
    const float *sel_bias; // [E] or null
    const T *w1;           // [E, N0, H] (gated: packed gate/up blocks)
    const T *w2;           // [E, H, I]
    const float *b1;       // [E, I] or null
    const float *b2;       // [E, H] or null
    const T *ws1;          // [N0S, H] shared expert
    const T *ws2;          // [H, IS]
    float *y;              // [S, H] output
    int *ids;              // [S, K] expert per rank (−1 unrouted)
    float *weights;        // [S, K]
    int *slot_row;         // [S, K] global row of the pair, −1 when dropped or unrouted
    float *logits;         // [S, EG]
    float *logits_part;    // [GATE_KSPLIT_MAX, S', EG] partial gate logits (S' = min(S, 128 · grid))
    int *rank_in_tile;     // [S, K]
    float *shared_gate;    // [S]
    int *tile_done;        // [tiles] gate tiles finished per token tile
    int *counts;           // [tiles, E]
    int *base;             // [tiles, E] exclusive prefix over tiles
    int *expert_load;      // [E] pairs routed before capacity
    int *row_start;        // [XS + 1] first global row of each expert; row_start[E] = routed rows R
    int *rb_start;         // [XS + 1] first row block of each task-space expert
    int *task0_start;      // [XS + 1] first GEMM0 ticket of each task-space expert
    int *row_token;        // [S·K] token of each routed row
    int *target;           // [S] contributions each token waits for
    int *pending;          // [S] contributions arrived
    int *done0;            // [row blocks] finished GEMM0 column tiles
    int *done1;            // [row blocks] finished GEMM1 column tiles
    u64 *ring;             // [row blocks] (epoch << 32 | row block) in publication order
    u64 *combine_list;     // [S] (epoch << 32 | token) of tokens whose contributions are all in, in push order
    T *hbuf;               // [R, I] routed intermediate
    T *hs;                 // [S, IS] shared intermediate
    float *ybuf;           // [R, H] routed expert outputs
    float *ys;             // [S, H] shared expert output
    Sync *sync;
    ErrorRecord *err;
    const Peer *peers;     // ranks: [RANKS] every rank's exchange buffers (this rank's among them)
    u64 *tile_dispatched;  // ranks: [tiles] epoch once a token tile's rows and targets are out
    int *rows_sent;        // ranks: [E] this rank's rows stored into their owners so far (per launch)
    int tokens;            // S (this rank's tokens)
    int capacity;          // per-expert capacity over all ranks' tokens (INT_MAX when dropless)
    int rank;              // this rank
    int gate_ksplit;       // the gate's K split (chosen by the host so every rank split alike)
    int row_blocks;        // capacity of done0 / done1 / ring
    int pad;
    u64 epoch;             // launch number, from 1
    u64 budget_ns;         // every wait's time budget
};

// This block's index and the block count within its rank (the whole grid when RANKS == 1).
__shared__ int s_cta, s_ctas;
FMOE_DEVICE int cta() { return s_cta; }
FMOE_DEVICE int ctas() { return s_ctas; }

// Timing builds record %globaltimer at phase boundaries (block 0, thread 0 unless noted), to place time inside the
// one launch without profiler counters: 0 start, 1 gate loop left, 2 scan seen, 3 placed, 4 barrier passed, 5 end,
// 6/7 scan start/end (the scanning block; ranks: 7 once the counts are sent), 8/9 routing of tile 0 start/end (its
// block). Ranks also: 10 every rank's counts in, 11 block 0's dispatch done, 12 the first GEMM0 task starts (after
// its rows arrived; its block), 13 the rank's last block out.
FMOE_DEVICE void stamp(const Params &p, int i, bool any_block = false) {
#if FMOE_TIMING
    if (threadIdx.x == 0 && (any_block || cta() == 0)) p.sync->stamps[i] = globaltimer_ns();
#endif
}

FMOE_DEVICE float activation(float v) {
#if FMOE_ACT == 0
    return v > 0.f ? v : (v != v ? v : 0.f);
#elif FMOE_ACT == 1
    return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
#elif FMOE_ACT == 2
    return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
#else
    return v / (1.f + expf(-v));
#endif
}

// Stores 4 consecutive FP32 values as T (one 8- or 16-byte store).
FMOE_DEVICE void store4(T *dst, float a, float b, float c, float d) {
#if FMOE_PREC == 1
    // TF32 mode: GEMM1 reads this as a tensor-core operand; store it rounded to nearest TF32 (wgmma would
    // otherwise truncate).
    a = __uint_as_float(to_tf32(__float_as_uint(a))); b = __uint_as_float(to_tf32(__float_as_uint(b)));
    c = __uint_as_float(to_tf32(__float_as_uint(c))); d = __uint_as_float(to_tf32(__float_as_uint(d)));
#endif
#if FMOE_PREC >= 2
    uint2 v;
    v.x = (u32)Storage<T>::store(a).bits | ((u32)Storage<T>::store(b).bits << 16);
    v.y = (u32)Storage<T>::store(c).bits | ((u32)Storage<T>::store(d).bits << 16);
    *(uint2 *)dst = v;
#else
    *(float4 *)dst = make_float4(a, b, c, d);
#endif
}

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
};

FMOE_DEVICE bool is_shared(const Layout &L, int x) { return x == L.xs - 1; }
FMOE_DEVICE int rows_of(const Layout &L, int x) { return is_shared(L, x) ? 0 : L.row_start[x + 1] - L.row_start[x]; }

// Largest x with table[x] <= v (table ascending, table[0] = 0).
FMOE_DEVICE int find_segment(const int *table, int n, int v) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (table[mid] <= v) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// ---- Phase 1: gate, routing, scan --------------------------------------------------------------------------------

// Routes the 128 tokens of a tile (one thread per token, ThreadRouter) and records, per pair, its rank among the
// tile's earlier tokens routed to the same expert, and per expert the tile's count. The logits are staged in shared
// memory first (rows padded to EG + 1 floats: consecutive threads read different banks) in chunks of tokens that
// fit: read from global memory, each thread's row would miss the small L1 that the GEMM ring leaves. With a split
// gate, staging also sums the K-slice partials, in slice order.
FMOE_DEVICE void route_tile(const Params &p, int tile, int ks_count, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_ROUTE, -1, tile, 0);
    typedef ThreadRouter<E, K, FMOE_SCORING, FMOE_GROUPS, FMOE_GROUPS_KEPT, FMOE_RENORM != 0> R;
    u32 *masks = (u32 *)smem;                     // [E][4]: bit t of expert e = token t of the tile chose e
    int *tile_ids = (int *)(masks + E * 4);       // [BT][K]
    float *rows = (float *)(tile_ids + BT * K);   // [ROUTE_CHUNK][EG + 1]
    for (int i = threadIdx.x; i < E * 4; i += THREADS) masks[i] = 0;
    const int t0 = tile * BT;
    for (int c0 = 0; c0 < BT; c0 += ROUTE_CHUNK) {
        __syncthreads();  // the previous chunk's rows are consumed (and the masks are cleared)
        for (int i = threadIdx.x; i < ROUTE_CHUNK * EG; i += THREADS) {
            const int lt = c0 + i / EG, n = i % EG, t = t0 + lt;
            if (t >= p.tokens) continue;
            float v;
            if (ks_count == 1) {
                v = p.logits[(size_t)t * EG + n];
            } else {
                v = 0.f;
                for (int q = 0; q < ks_count; ++q) v += p.logits_part[((size_t)q * p.tokens + t) * EG + n];
            }
            rows[(i / EG) * (EG + 1) + n] = v;
        }
        __syncthreads();
        const int lt = c0 + threadIdx.x, t = t0 + lt;
        if (threadIdx.x < ROUTE_CHUNK && t < p.tokens) {
            const float *l = rows + threadIdx.x * (EG + 1);
            int ids[K];
            float w[K];
            R::route(l, p.sel_bias, ids, w);
#pragma unroll
            for (int j = 0; j < K; ++j) {
                p.ids[(size_t)t * K + j] = ids[j];
                p.weights[(size_t)t * K + j] = w[j];
                tile_ids[lt * K + j] = ids[j];
                if (ids[j] >= 0) atomicOr(&masks[ids[j] * 4 + (lt >> 5)], 1u << (lt & 31));
            }
            if (HAS_SHARED) p.shared_gate[t] = EG > E ? 1.f / (1.f + expf(-l[E])) : 1.f;
        }
    }
    __syncthreads();
    // Rank of each pair among the tile's earlier tokens routed to the same expert: a popcount of the mask.
    for (int i = threadIdx.x; i < BT * K; i += THREADS) {
        const int lt2 = i / K, t2 = t0 + lt2;
        if (t2 >= p.tokens) continue;
        const int e = tile_ids[i];
        int rank = 0;
        if (e >= 0) {
            const u32 *m = masks + e * 4;
            for (int wd = 0; wd < (lt2 >> 5); ++wd) rank += __popc(m[wd]);
            rank += __popc(m[lt2 >> 5] & ((1u << (lt2 & 31)) - 1u));
        }
        p.rank_in_tile[(size_t)t2 * K + (i % K)] = rank;
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
    if (threadIdx.x == 0) {
        int row = 0, rb = 0, t0 = 0;
        for (int x = 0; x < XS; ++x) {
            const int rows = x < E ? kept[x] : (HAS_SHARED ? p.tokens : 0);
            const int mt = (rows + BM - 1) / BM;
            p.row_start[x] = row;
            p.rb_start[x] = rb;
            p.task0_start[x] = t0;
            if (x < E) row += rows;
            rb += mt;
            t0 += mt * (x < E ? NT0 : NT0S);
        }
        p.row_start[XS] = row;
        p.rb_start[XS] = rb;
        p.task0_start[XS] = t0;
    }
}

// Ranks: reset this rank's per-launch counters (nobody uses them before every rank's counts are in), then send
// this rank's per-expert counts to every rank and flag them with the epoch (system-scope release: peers may be
// other GPUs).
FMOE_DEVICE void publish_counts(const Params &p, int rb_max) {
    for (int i = threadIdx.x; i < rb_max; i += THREADS) { p.done0[i] = 0; p.done1[i] = 0; }
    for (int i = threadIdx.x; i < E; i += THREADS) p.rows_sent[i] = 0;
    if (threadIdx.x == 0) {
        p.sync->ticket = 0;
        p.sync->ring_tail = 0;
        p.sync->list_tail = 0;
        p.sync->combine_ticket = 0;
        p.sync->my_total = 0;
        p.sync->dispatch_done = 0;
    }
    for (int i = threadIdx.x; i < RANKS * E; i += THREADS) {
        const int q = i / E, e = i % E;
        p.peers[q].all_counts[p.rank * E + e] = p.expert_load[e];
    }
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x < RANKS) {
        fence_sys();
        st_relaxed_sys_u64(&p.peers[threadIdx.x].count_flags[p.rank], p.epoch);
    }
}

// Ranks: after every rank's counts are in, the layout this rank needs. Global slot of a (token, expert) pair =
// rows of lower ranks + this rank's slot; a pair is kept when its global slot is below the capacity, exactly the
// oracle's rule over the concatenated tokens. Each expert's rows sit in its owner's receive buffer in global slot
// order, so rows, tiles and results equal the single-rank run.
FMOE_DEVICE bool rank_layout(const Params &p, Layout &L) {
    __shared__ int ok;
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    if (threadIdx.x < RANKS) {
        // Acquire (system scope: the flag may come from another GPU); the barrier below orders every thread's
        // reads of the counts after it.
        if (!wait_at_least<true>(&p.peers[p.rank].count_flags[threadIdx.x], p.epoch, p.err, p.budget_ns,
                                 FMOE_PHASE_COUNTS, threadIdx.x, p.rank))
            ok = 0;
        fence_sys();
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += THREADS) {
        int before = 0, total = 0;
        for (int q = 0; q < RANKS; ++q) {
            const int c = p.peers[p.rank].all_counts[q * E + e];
            if (q < p.rank) before += c;
            total += c;
        }
        L.before_me[e] = before;
        L.kept_total[e] = total < p.capacity ? total : p.capacity;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int q = 0; q < RANKS; ++q) {
            int row = 0;
            for (int e = rank_first(q); e < rank_first(q + 1); ++e) {
                L.owner_row_start[e] = row;
                row += L.kept_total[e];
            }
        }
        const int first = rank_first(p.rank), local = rank_first(p.rank + 1) - first;
        L.xs = local + 1;
        int row = 0, rb = 0, t0 = 0;
        for (int x = 0; x <= local; ++x) {
            const int rows = x < local ? L.kept_total[first + x] : (HAS_SHARED ? p.tokens : 0);
            const int mt = (rows + BM - 1) / BM;
            L.row_start[x] = row;
            L.rb_start[x] = rb;
            L.task0_start[x] = t0;
            if (x < local) row += rows;
            rb += mt;
            t0 += mt * (x < local ? NT0 : NT0S);
        }
        L.row_start[L.xs] = row;
        L.rb_start[L.xs] = rb;
        L.task0_start[L.xs] = t0;
    }
    __syncthreads();
    const bool good = ok != 0 && !aborted(p.err);
    __syncthreads();
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
    if (p.rank == RANKS - 1 && e == 0 && p.epoch >= 2) return;
#endif
    st_relaxed_sys_u64(&p.peers[q].row_flags[p.rank * E_LOCAL_MAX + (e - rank_first(q))], (p.epoch << 32) | (u64)rows);
}

// Ranks: copies one row (H elements) with every lane's loads in flight before its stores: a plain copy loop
// would wait out a full memory round trip per 512 bytes (the compiler cannot batch through possibly aliasing
// pointers), which made dispatch latency-bound.
FMOE_DEVICE void copy_row(uint4 *dst, const uint4 *src, int lane) {
    constexpr int V = H * (int)sizeof(T) / 16;  // 16-byte vectors per row
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

// Ranks: dispatch, step 1 (per token tile): each token's global slots, target and pending count, zeros for a
// token nothing will contribute to; then the tile counts as prepared (dispatch_done) and its flag tells the shared
// expert its targets are set.
FMOE_DEVICE void prepare_tiles(const Params &p, const Layout &L) {
    const int tiles = (p.tokens + BT - 1) / BT;
    for (int tile = cta(); tile < tiles; tile += ctas()) {
        const int lt = threadIdx.x, t = tile * BT + lt;
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
            p.target[t] = contributions;
            p.pending[t] = 0;
            if (contributions == 0) {
                for (int h = 0; h < H; h += 4) *(float4 *)&p.y[(size_t)t * H + h] = make_float4(0.f, 0.f, 0.f, 0.f);
            } else {
                atomicAdd(&p.sync->my_total, 1);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
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
FMOE_DEVICE bool dispatch_rows(const Params &p, const Layout &L, char *smem) {
    int *dest = (int *)smem;                // [CHUNK] owner row of the pair, or −1
    int *expert = dest + DISPATCH_CHUNK;    // [CHUNK]
    int *rows = expert + DISPATCH_CHUNK;    // [E] rows of the chunk per expert
    __shared__ int ok;
    const int tiles = (p.tokens + BT - 1) / BT;
    const int pairs = p.tokens * K, chunks = (pairs + DISPATCH_CHUNK - 1) / DISPATCH_CHUNK;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) ok = 1;
    if (cta() == 0)
        for (int e = threadIdx.x; e < E; e += THREADS)
            if (kept_after(p, L.before_me[e], p.expert_load[e]) == 0) publish_rows(p, e, 0);
    for (int e = threadIdx.x; e < E; e += THREADS) rows[e] = 0;
    __syncthreads();
    for (int c = cta(); c < chunks; c += ctas()) {
        const int i = c * DISPATCH_CHUNK + (int)threadIdx.x;
        if (threadIdx.x < DISPATCH_CHUNK) {
            int row = -1, e = -1;
            if (i < pairs && (e = p.ids[i]) >= 0) {
                const int t = i / K;
                const int g = L.before_me[e] + p.base[(size_t)(t / BT) * E + e] + p.rank_in_tile[i];
                if (g < p.capacity) {
                    row = L.owner_row_start[e] + g;
                    atomicAdd(&rows[e], 1);
                }
            }
            dest[threadIdx.x] = row;
            expert[threadIdx.x] = e;
        }
        __syncthreads();
        for (int k = warp; k < DISPATCH_CHUNK; k += THREADS / 32) {
            const int row = dest[k];
            if (row < 0) continue;
            const int pair = c * DISPATCH_CHUNK + k;
            const Peer &o = p.peers[owner_of(expert[k])];
            copy_row((uint4 *)(o.recv + (size_t)row * H), (const uint4 *)(p.x + (size_t)(pair / K) * H), lane);
            if (lane == 0) o.row_origin[row] = (p.rank << 24) | pair;
        }
        __syncthreads();
        for (int e = threadIdx.x; e < E; e += THREADS) {
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
        __syncthreads();
    }
    __syncthreads();
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
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    const int first = rank_first(p.rank), local = rank_first(p.rank + 1) - first;
    for (int i = threadIdx.x; i < RANKS * local; i += THREADS) {
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
    __syncthreads();
    return ok != 0;
}

// Ranks: before this rank writes into any peer for this launch, every peer must have finished the previous one
// (its last block out stores done_epoch): launches queued back to back on several GPUs (or streams) never
// overwrite counts, rows or flags a slower peer is still reading.
FMOE_DEVICE bool wait_peers_done(const Params &p) {
    __shared__ int ok;
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    if (threadIdx.x < RANKS && !wait_at_least<true>(&p.peers[threadIdx.x].sync->done_epoch, p.epoch - 1, p.err,
                                                    p.budget_ns, FMOE_PHASE_PEER_DONE, threadIdx.x, p.rank))
        ok = 0;
    __syncthreads();
    return ok != 0;
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
    const int ks = p.gate_ksplit < 1 ? 1 : (p.gate_ksplit > GATE_KSPLIT_MAX ? GATE_KSPLIT_MAX : p.gate_ksplit);
    return ks < KSLICES ? ks : KSLICES;
}

FMOE_DEVICE bool gate_phase(const Params &p, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_GATE_PHASE, -1, 0, 0);
    __shared__ int s_task, s_last;
    const int tiles = (p.tokens + BT - 1) / BT;
    const int ks_count = gate_k_split(p);
    constexpr int KSLICES = (H * (int)sizeof(T) + ROW_BYTES - 1) / ROW_BYTES;
    const int slices_per = (KSLICES + ks_count - 1) / ks_count;
    const int tasks = tiles * NTE * ks_count;
    // Ranks: a rank without tokens still takes part in the count exchange (all zeros).
    if (RANKS > 1 && tiles == 0 && cta() == 0) finish_scan(p, 0);
    for (;;) {
        if (threadIdx.x == 0) s_task = atomicAdd(&p.sync->gate_ticket, 1);
        __syncthreads();
        const int task = s_task;
        if (task >= tasks) break;
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
        // One slice writes the logits; several write partials [slice][token][EG] for the last task to sum.
        float *dst = ks_count == 1 ? p.logits : p.logits_part + (size_t)ks * p.tokens * EG;
        for (int i = threadIdx.x; i < BM * GBN; i += THREADS) {
            const int r = i / GBN, col = i % GBN;
            const int t = tile * BT + r, n = nt * GBN + col;
            if (t < p.tokens && n < EG) dst[(size_t)t * EG + n] = c[r * c_stride<GBN>() + col];
        }
        // Last-arriver: every thread fences its logits, then one increment decides who routes the tile.
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            s_last = atomicAdd(&p.tile_done[tile], 1) == NTE * ks_count - 1;
            if (s_last) fence_gpu();
        }
        __syncthreads();
        if (!s_last) continue;
        if (tile == 0) stamp(p, 8, true);
        route_tile(p, tile, ks_count, smem);
        if (tile == 0) stamp(p, 9, true);
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            s_last = atomicAdd(&p.sync->tiles_done, 1) == tiles - 1;
            if (s_last) fence_gpu();
        }
        __syncthreads();
        if (s_last) finish_scan(p, tiles);
    }
    stamp(p, 1);
    // Everyone needs the scan before placing tokens.
    __shared__ int ok;
    if (threadIdx.x == 0) ok = wait_at_least(&p.sync->scan_done, p.epoch, p.err, p.budget_ns, FMOE_PHASE_SCAN, 0, 0);
    __syncthreads();
    return ok != 0;
}

// ---- Phase 2: place ----------------------------------------------------------------------------------------------

FMOE_DEVICE void place_phase(const Params &p, const Layout &L) {
    FMOE_TRACE_SCOPE(FMOE_EV_PLACE, -1, 0, 0);
    for (int t = cta() * THREADS + threadIdx.x; t < p.tokens; t += ctas() * THREADS) {
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
            for (int h = 0; h < H; h += 4) *(float4 *)&p.y[(size_t)t * H + h] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
    const int rbs = L.rb_start[XS];
    for (int i = cta() * THREADS + threadIdx.x; i < rbs; i += ctas() * THREADS) {
        p.done0[i] = 0;
        p.done1[i] = 0;
    }
    if (cta() == 0 && threadIdx.x == 0) {
        p.sync->ticket = 0;
        p.sync->ring_tail = 0;
        p.sync->list_tail = 0;
        p.sync->combine_ticket = 0;
        p.sync->tiles1_done = 0;
    }
}

// ---- Phase 3: expert GEMMs and combine ---------------------------------------------------------------------------

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
    run_tile<ExpertEngine>(smem, src);
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
    run_tile<ExpertEngine>(smem, src);
    const float *c = (const float *)smem;
    constexpr int C_STRIDE = c_stride<EBN>();
    float *out = shared ? p.ys : p.ybuf + (size_t)L.row_start[x] * H;
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
            *(float4 *)&p.peers[o >> 24].ret[(size_t)(o & 0xFFFFFF) * H + col] = v;
        } else {
            *(float4 *)&out[(size_t)(row0 + r) * H + col] = v;
        }
    }
    __syncthreads();
}

// y[t] = Σ_j w[t,j] · ybuf[slot_row[t,j]] in rank order, plus the (gated) shared expert. One warp per token.
FMOE_DEVICE void combine_token(const Params &p, int t) {
    FMOE_TRACE_WARP_SCOPE(FMOE_EV_COMBINE, t);
    const int lane = threadIdx.x & 31;
    int rows[K];
    float w[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
        rows[j] = p.slot_row[(size_t)t * K + j];
        w[j] = p.weights[(size_t)t * K + j];
    }
    const float gs = HAS_SHARED ? p.shared_gate[t] : 0.f;
    for (int h = lane * 4; h < H; h += 128) {
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int j = 0; j < K; ++j) {
            if (rows[j] < 0) continue;
            // One GPU: the expert output row; ranks: the pair's row of the return buffer.
            const float4 v = RANKS > 1 ? *(const float4 *)&p.peers[p.rank].ret[((size_t)t * K + j) * H + h]
                                       : *(const float4 *)&p.ybuf[(size_t)rows[j] * H + h];
            acc.x = fmaf(w[j], v.x, acc.x); acc.y = fmaf(w[j], v.y, acc.y);
            acc.z = fmaf(w[j], v.z, acc.z); acc.w = fmaf(w[j], v.w, acc.w);
        }
        if (HAS_SHARED) {
            const float4 v = *(const float4 *)&p.ys[(size_t)t * H + h];
            acc.x = fmaf(gs, v.x, acc.x); acc.y = fmaf(gs, v.y, acc.y);
            acc.z = fmaf(gs, v.z, acc.z); acc.w = fmaf(gs, v.w, acc.w);
        }
        *(float4 *)&p.y[(size_t)t * H + h] = acc;
    }
}

// A row block's GEMM1 is complete: count one contribution for each of its tokens; a token whose last
// contribution this is goes on the combine list (any idle warp of the grid combines it, see drain_combines).
FMOE_DEVICE void complete_row_block(const Params &p, const Layout &L, int x, int m) {
    const bool shared = is_shared(L, x);
    const int rows = shared ? p.tokens : rows_of(L, x);
    for (int r = m * BM + (int)threadIdx.x; r < rows && r < (m + 1) * BM; r += THREADS) {
        int t, q = 0;
        if (RANKS > 1) {
            // Ranks: the source's counters; a row's origin names its rank and (token, j) pair.
            const int o = shared ? (p.rank << 24) | (r * K) : p.peers[p.rank].row_origin[L.row_start[x] + r];
            q = o >> 24;
            t = (o & 0xFFFFFF) / K;
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
        fence_at<SYS>();
        if ((SYS ? atom_add_sys_i32(&pending[t], 1) : atomicAdd(&pending[t], 1)) + 1 == target[t]) {
            fence_at<SYS>();  // acquire the other contributions, then publish
            const int pos = SYS ? atom_add_sys_i32(&sync->list_tail, 1) : atomicAdd(&sync->list_tail, 1);
            st_flag<SYS>(&list[pos], (p.epoch << 32) | (u64)t);
        }
    }
}

// Combines listed tokens until every GEMM1 tile is done and the list is exhausted. Each warp claims list positions
// one at a time; a position not yet written is waited for (bounded) unless all GEMM1 tiles have finished and the
// position lies past the final end of the list.
FMOE_DEVICE bool drain_combines(const Params &p, int total_tiles1) {
    const int lane = threadIdx.x & 31;
    for (;;) {
        int pos = 0;
        if (lane == 0) pos = atomicAdd(&p.sync->combine_ticket, 1);
        pos = __shfl_sync(0xffffffffu, pos, 0);
        if (pos >= p.tokens) return true;  // at most S tokens are ever listed
        int token = -1;  // −2: nothing left
        if (lane == 0) {
            const u64 start = globaltimer_ns();
            u32 spins = 0;
            for (;;) {
                const u64 v = ld_flag<(RANKS > 1)>(&p.combine_list[pos]);  // ranks: pushed by peers
                if (v >= (p.epoch << 32)) { fence_sys(); token = (int)(v & 0xffffffffull); break; }
                if (RANKS > 1) {
                    // Ranks: the count of this rank's tokens to combine is final once all its tiles are dispatched.
                    if (ld_relaxed_i32(&p.sync->dispatch_done) == (p.tokens + BT - 1) / BT) {
                        fence_sys();
                        if (pos >= ld_relaxed_i32(&p.sync->my_total)) { token = -2; break; }
                    }
                } else if (ld_relaxed_i32(&p.sync->tiles1_done) == total_tiles1) {
                    fence_gpu();
                    if (pos >= ld_relaxed_i32(&p.sync->list_tail)) { token = -2; break; }
                    continue;  // the entry is being written
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
        combine_token(p, token);
    }
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
        if (ticket >= total) return drain_combines(p, rbs * NT1);
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
                    if (rb != 0)  // test builds: never publish row block 0, so some GEMM1 wait must expire
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
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) {
                s_last = atomicAdd(&p.done1[rb], 1) == NT1 - 1;
                if (s_last) fence_gpu();
            }
            __syncthreads();
            if (s_last) complete_row_block(p, L, x, m);
            __syncthreads();
            // Release this tile's pushes (if any) before counting it done: drain_combines reads the list's final
            // end only after every tile is counted.
            if (threadIdx.x == 0) { fence_gpu(); atomicAdd(&p.sync->tiles1_done, 1); }
        }
    }
}

}  // namespace fmoe

using namespace fmoe;

// One launch, all phases. One GPU: gate → scan → place → grid barrier → experts + combine. Ranks: gate → scan →
// count all-gather → dispatch → experts (starting per row block as its rows land) → the source combines.
FMOE_DEVICE void forward(const Params &p, char *smem) {
    __shared__ Layout L;
    stamp(p, 0);
    FMOE_TRACE_START();
    if (!gate_phase(p, smem)) return;
    if (RANKS == 1) {
        L.xs = XS;
        for (int i = threadIdx.x; i <= XS; i += THREADS) {
            L.row_start[i] = p.row_start[i];
            L.rb_start[i] = p.rb_start[i];
            L.task0_start[i] = p.task0_start[i];
        }
        __syncthreads();
        stamp(p, 2);
        if (FMOE_STOP_AFTER != 1) place_phase(p, L);  // timing variant 1 skips placement
        stamp(p, 3);
        if (!grid_barrier(&p.sync->barrier, p.epoch, 1, 1, p.err, p.budget_ns, 0)) return;
        FMOE_TRACE_WAIT(FMOE_EV_BARRIER);
        // Phase-1 counters are free again: reset them for the next launch (nobody reads them before that).
        if (cta() == 0 && threadIdx.x == 0) {
            p.sync->gate_ticket = 0;
            p.sync->tiles_done = 0;
        }
        const int tiles = (p.tokens + BT - 1) / BT;
        for (int i = cta() * THREADS + threadIdx.x; i < tiles; i += ctas() * THREADS) p.tile_done[i] = 0;
        stamp(p, 4);
        if (FMOE_STOP_AFTER == 0) expert_phase(p, L, smem);  // timing variants stop before the experts
        stamp(p, 5);
    } else {
        if (!rank_layout(p, L)) return;
        stamp(p, 10);
        prepare_tiles(p, L);
        if (!dispatch_rows(p, L, smem)) return;
        stamp(p, 11);
        if (FMOE_STOP_AFTER == 0 && !expert_phase(p, L, smem)) return;
        // The rank's last block out checks every flag it received, resets the gate counters for the next launch
        // (every block of the rank has left the gate phase by then) and tells the peers this rank is done.
        __shared__ int s_last_out;
        __syncthreads();
        if (threadIdx.x == 0) {
            fence_gpu();
            s_last_out = atomicAdd(&p.sync->exit_count, 1) == ctas() - 1;
            if (s_last_out) fence_gpu();
        }
        __syncthreads();
        if (s_last_out && check_row_flags(p) && threadIdx.x == 0) {
            stamp(p, 13, true);
            p.sync->gate_ticket = 0;
            p.sync->tiles_done = 0;
            p.sync->exit_count = 0;
            for (int i = 0; i < (p.tokens + BT - 1) / BT; ++i) p.tile_done[i] = 0;
            fence_sys();
            st_relaxed_sys_u64(&p.sync->done_epoch, p.epoch);
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1) fmoe_forward(const __grid_constant__ Params p) {
    extern __shared__ __align__(1024) char smem_raw[];
    // wgmma's 128-byte swizzle atoms need 1024-byte aligned stages; the host adds 1 KiB of slack.
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    if (threadIdx.x == 0) { s_cta = blockIdx.x; s_ctas = gridDim.x; }
    __syncthreads();
    forward(p, smem);
}

// The ranks this launch runs (all R on one GPU, or this GPU's share): blocks [i·blocks_per_rank,
// (i+1)·blocks_per_rank) run the i-th rank of the table with its parameters. The epoch is an argument, so the
// table is written once per input shape and launches can be queued back to back. Co-residency: a cooperative
// launch per GPU (or, for several launches sharing one GPU, grids that fit on it together).
extern "C" __global__ void __launch_bounds__(THREADS, 1) fmoe_forward_ranks(const Params *__restrict__ table,
                                                                           int blocks_per_rank, u64 epoch) {
    extern __shared__ __align__(1024) char smem_raw[];
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    __shared__ Params sp;
    if (threadIdx.x == 0) {
        sp = table[blockIdx.x / blocks_per_rank];
        sp.epoch = epoch;
        s_cta = blockIdx.x % blocks_per_rank;
        s_ctas = blocks_per_rank;
    }
    __syncthreads();
    forward(sp, smem);
}

// Read by the host through cuModuleGetGlobal: the dynamic shared memory to launch with, and the row-block size of
// the gated W1/W3 packing (EBN / 2), so host and kernel can never disagree.
extern "C" __device__ const int fmoe_dynamic_smem = DYNAMIC_SMEM;
extern "C" __device__ const int fmoe_gated_pack_rows = EBN / 2;
extern "C" __device__ const int fmoe_params_bytes = (int)sizeof(Params);
extern "C" __device__ const int fmoe_gate_tiles = NTE;  // expert tiles of the gate GEMM (for the host's K split)
extern "C" __device__ const int fmoe_peer_bytes = (int)sizeof(Peer);
