// The fused kernel's specialisation (the host's -D options), its compile-time shapes and shared-memory carving,
// and the structs the host fills (Params, Peer) or reads back (Sync): everything the phases share. See moe.cu.
#pragma once
#include "common.cuh"
#include "sync.cuh"
#include "gemm_tile.cuh"
#include "wgmma.cuh"
#include "router.cuh"
#include "launch_limits.cuh"
#include "trace.cuh"
#include "activation.cuh"
#if defined(FMOE_PREC) && FMOE_PREC == 4
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
#error "precision fp8 needs E4M3 tensor cores (sm_89 or newer); the host refuses other architectures before compiling"
#endif
#include "wgmma_fp8.cuh"
#include "mma_fp8.cuh"
#endif

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
#ifndef FMOE_RET_STORAGE  // ranks: expert outputs travel back to the source as T (bf16/fp16), not FP32
#define FMOE_RET_STORAGE 0
#endif

namespace fmoe {

constexpr int H = FMOE_H, I = FMOE_I, E = FMOE_E, K = FMOE_K;
constexpr int IS = FMOE_SHARED_I;
constexpr bool HAS_SHARED = IS > 0;
constexpr bool GATED = FMOE_GATED != 0;
constexpr int EG = E + (HAS_SHARED && FMOE_SHARED_GATED ? 1 : 0);  // router rows (+ shared gate)
constexpr int STAGES = FMOE_STAGES;
constexpr int BT = 128;  // tokens per routing tile (= BM)

#if FMOE_PREC == 2 || FMOE_PREC == 4  // fp8 (4): x, h, the router and the shared expert are BF16 (docs/fp8.md)
typedef bf16_t T;
constexpr int MMA = MMA_BF16;
#elif FMOE_PREC == 3
typedef f16_t T;
constexpr int MMA = MMA_F16;
#else
typedef float T;
[[maybe_unused]] constexpr int MMA = MMA_TF32;  // tf32 mode only; fp32 mode runs the exact FFMA engine
#endif
// The element of the routed expert rows the combine reads (one GPU: ybuf; ranks: the source's return buffer): FP32,
// or (FMOE_RET_STORAGE, 16-bit layers) the storage type, which halves those bytes (written by GEMM1's epilogue, read
// by the combine; ranks: sent back) at the cost of one rounding of each expert row before the weighted sum. The same
// rounding on one GPU and with ranks, so one rank's y equals the ranks' y with the option on either side.
#ifndef FMOE_RET_STORAGE
#define FMOE_RET_STORAGE 0
#endif
#if FMOE_RET_STORAGE && FMOE_PREC >= 2
#define FMOE_RET_T 1
typedef T RetT;
#else
#define FMOE_RET_T 0
typedef float RetT;
#endif

// The engines: exact FFMA in fp32 mode, otherwise tensor cores (wgmma on sm_90a, mma.sync elsewhere). The gate's
// routing math stays FP32: 16-bit modes multiply exactly on tensor cores (products of bf16/fp16 are exact in FP32);
// fp32 and tf32 modes use exact FFMA so no TF32 rounding can flip a routing decision.
#if FMOE_PREC == 4
// Routed experts: E4M3 wgmma (sm_90a) or mma.sync (sm_89, plain sm_90 and later) with block-scale promotion; the
// shared expert (BF16) runs tiles of the same width (128 × 128), so both fill the same task space: BF16 wgmma on
// sm_90a (FMOE_FP8_SHARED_WGMMA, default there; 0: mma.sync, the kernels before round 35), else mma.sync. Why: its
// mma.sync tiles ran at 2.5 TFLOP/s a block, 14.9 % of deepseek-v3 S = 4096's expert phase (trace, round 34;
// Benchmarks/RESULTS.md).
#if FMOE_WGMMA
typedef Fp8WgmmaEngine ExpertEngine;
#else
typedef Fp8MmaEngine ExpertEngine;
#endif
#ifndef FMOE_FP8_SHARED_WGMMA
#define FMOE_FP8_SHARED_WGMMA FMOE_WGMMA
#endif
#if FMOE_FP8_SHARED_WGMMA && FMOE_WGMMA
typedef WgmmaEngine<MMA_BF16, FP8_BN> SharedEngine;
#else
typedef MmaEngine<MMA_BF16> SharedEngine;
#endif
#elif FMOE_PREC == 0
typedef FfmaEngine ExpertEngine;
#elif FMOE_WGMMA
typedef WgmmaEngine<MMA> ExpertEngine;
#else
typedef MmaEngine<MMA> ExpertEngine;
#endif
#if FMOE_PREC != 4
typedef ExpertEngine SharedEngine;
#endif
#if FMOE_PREC <= 1
typedef FfmaEngine GateEngine;
#elif FMOE_PREC == 4
typedef MmaEngine<MMA_BF16> GateEngine;  // the BF16 router: mma.sync keeps the kernel under 255 registers
#else
typedef ExpertEngine GateEngine;
#endif
constexpr int EBN = ExpertEngine::BN;  // expert tile width
constexpr int GBN = GateEngine::BN;    // gate tile width

template <class Engine> FMOE_DEVICE void run_tile(char *smem, const TileSource &src) {
    if constexpr (Engine::WGMMA) gemm_tile_wgmma<Engine, STAGES>(smem, src);
    else gemm_tile<Engine, STAGES>(smem, src);
}

// GEMM0 output columns: I for the plain FFN; for the gated FFN, W1 and W3 are packed by the host into blocks of
// EBN rows (EBN/2 gate rows, then the matching EBN/2 up rows), I padded up to a multiple of EBN/2.
constexpr int n0_cols(int inter) { return GATED ? ((inter + EBN / 2 - 1) / (EBN / 2)) * EBN : inter; }
constexpr int N0 = n0_cols(I), N0S = n0_cols(IS > 0 ? IS : 1);
constexpr int NT0 = (N0 + EBN - 1) / EBN, NT0S = (N0S + EBN - 1) / EBN;
constexpr int NT1 = (H + EBN - 1) / EBN;
#if FMOE_PREC == 4
// fp8 expert weights, per expert: E4M3 codes [rows, K] (rows N0 for W1, H for W2), then the FP32 scales
// [⌈rows/64⌉][⌈K/128⌉] of each 64-row granule and K block, each part padded to 16 bytes
// (FusedDeviceWeights+FP8.swift writes this layout).
constexpr size_t round16(size_t v) { return (v + 15) / 16 * 16; }
constexpr int KB_H = (H + 127) / 128, KB_I = (I + 127) / 128;
constexpr int G0 = (N0 + 63) / 64, G1 = (H + 63) / 64;
constexpr size_t W1_CODES = round16((size_t)N0 * H), W1_EXPERT_BYTES = round16(W1_CODES + (size_t)G0 * KB_H * 4);
constexpr size_t W2_CODES = round16((size_t)H * I), W2_EXPERT_BYTES = round16(W2_CODES + (size_t)G1 * KB_I * 4);
static_assert(EBN == 128, "the fp8 weight layout has two 64-row granules per tile");
// Ranks: an owner's receive row of x holds the source's E4M3 codes (H bytes), then their KB_H FP32 scales, in the
// bytes of a BF16 row (phase_dispatch.cuh sends them; received_codes and received_scales below read them).
static_assert(H % 16 == 0 && H + 4 * KB_H <= H * (int)sizeof(T), "an fp8 receive row holds H codes and KB_H scales");
#endif
constexpr int NTE = (EG + GBN - 1) / GBN;
constexpr int RING_GROUP = 8;        // GEMM1 row blocks scheduled together (see expert_phase)
constexpr int GATE_KSPLIT_MAX = 16;  // the gate's K is split at most this many ways (FusedWorkspace.gateSplitMax)
constexpr int cmax(int a, int b) { return a > b ? a : b; }
// Dynamic shared memory: the larger ring or staged tile of the two engines, plus 1 KiB to align stages to 1024.
// The expert ring's B rows a stage: the tile width, or the fp8 TMA engine's weight rows a tile (FMOE_TMA_FP8_BN, set
// by the host: 256 by default since round 33, 128 for the narrow form; tma_fp8_engine.cuh); fp8's A and B rows are
// E4M3, 128 bytes each (a 128-wide K block). The ring is sized to the tiles that run, not to the widest form:
// 256-row stages under 128-row tiles made 6 of those stages (4 measure as fast) and took 64 KiB from L1; the decode
// GEMV tasks ran 31 – 64 % slower in that build, within 5 % of the cp.async build's in this one
// (Benchmarks/RESULTS.md, rounds 23 – 25).
#ifndef FMOE_TMA_FP8_BN
#define FMOE_TMA_FP8_BN 128
#endif
constexpr int RING_BN = FMOE_PREC == 4 && FMOE_TMA ? FMOE_TMA_FP8_BN : EBN;
constexpr int EXPERT_RING_BYTES = STAGES * stage_bytes<RING_BN>();
constexpr int DYNAMIC_SMEM = cmax(cmax(EXPERT_RING_BYTES, STAGES * stage_bytes<GBN>()),
                                  cmax(c_bytes<EBN>(), c_bytes<GBN>())) + 1024;
// Rows of logits routing's staging area holds (routing_tasks.cuh): the largest of 128, 64 and 32 that fits beside
// the masks and ids; a route task stages ROUTE_TASK_TOKENS of them. It must divide the tile: a chunk of 96 (fp32's
// smaller ring at E = 256) once ran its second chunk past token 127, into the next tile's tokens and past the masks
// and ids (issue 12, defect 7).
constexpr int ROUTE_CHUNK_FIT = (DYNAMIC_SMEM - 1024 - E * 16 - BT * K * 4) / ((EG + 1) * 4);
constexpr int ROUTE_CHUNK = ROUTE_CHUNK_FIT >= 128 ? 128 : (ROUTE_CHUNK_FIT >= 64 ? 64 : 32);
static_assert(ROUTE_CHUNK_FIT >= 32, "routing needs room for at least 32 rows of logits");
static_assert(BT % ROUTE_CHUNK == 0 && ROUTE_CHUNK <= THREADS, "routing's chunks must tile the 128 tokens exactly");
static_assert(E * 16 + BT * K * 4 + ROUTE_CHUNK * (EG + 1) * 4 <= DYNAMIC_SMEM - 1024,
              "routing's masks, ids and staged logits exceed the dynamic shared memory");
FMOE_CHECK_DYNAMIC_SMEM(DYNAMIC_SMEM);
constexpr int XS = E + 1;  // task-space experts, at most: the routed ones + the shared one (empty when absent)
constexpr int RANKS = FMOE_RANKS;
// Expert placement over ranks: contiguous blocks, the first E mod R ranks one expert larger.
constexpr int rank_first(int q) { return q * (E / RANKS) + (q < E % RANKS ? q : E % RANKS); }
constexpr int E_LOCAL_MAX = (E + RANKS - 1) / RANKS;
// A received row's origin packs the source rank above the source's (token, j) pair index in a non-negative int:
// the rank takes the bits RANKS − 1 needs, the pair the rest (at least 25 bits for 64 ranks). The host refuses a
// rank with tokens · K ≥ 2^PAIR_BITS (DistributedMoE.pairLimit).
constexpr int bits_for(int v) { return v <= 0 ? 0 : 1 + bits_for(v >> 1); }
constexpr int PAIR_BITS = 31 - bits_for(RANKS - 1);
constexpr int PAIR_MASK = (int)((1u << PAIR_BITS) - 1u);
static_assert(PAIR_BITS >= 25, "ranks must leave at least 25 bits for a source's pair index");
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
    int combine_ticket;  // combine list slices claimed (combine_slices per position)
    int gemm1_done;  // GEMM1 row blocks (FMOE_COUNT_BLOCKS1 0: tiles) whose completion (and pushes) are finished
    int my_total;    // ranks: this rank's tokens that will be pushed to its combine list
    int dispatch_done;  // ranks: this rank's token tiles dispatched
    int exit_count;  // blocks (of this rank) that finished the launch; the last one out resets it
    u64 done_epoch;  // ranks: = epoch once every block of this rank finished the launch (read by peers; the
                     // rank's device epoch: its next launch runs epoch done_epoch + 1)
    u64 epoch;       // one GPU: the last finished launch's epoch (the device epoch; 0 after a wrap)
    int xq_ready;    // ranks, fp8: this rank's blocks that quantized their share of x (dispatch sends the codes)
};
static_assert(sizeof(Sync) <= 256, "the host reserves 256 bytes of control memory per Sync");

// What every rank exposes to the others (peer-mapped device pointers; on one GPU, plain pointers).
struct Peer {
    T *recv;              // [rows, H] the owner's receive buffer: the rows routed to its experts
    int *row_origin;      // [rows] (source rank << PAIR_BITS) | (token · K + j) of each received row
    u64 *row_flags;       // [RANKS, E_LOCAL_MAX] (epoch << 32 | rows) from each source for each local expert
    int *all_counts;      // [RANKS, E] every rank's per-expert token counts (the all-gather)
    u64 *count_flags;     // [RANKS] epoch once a rank's counts are in all_counts
    RetT *ret;            // [S·K, H] the source's return buffer: expert outputs of its (token, j) pairs
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
    void *y;               // [S, H] output: FP32, or T when y_storage
    int *ids;              // [S, K] expert per rank (−1 unrouted)
    float *weights;        // [S, K]
    int *slot_row;         // [S, K] global row of the pair, −1 when dropped or unrouted
    float *logits;         // [S, EG]
    float *logits_part;    // [k split · S, EG] partial gate logits, within part_rows rows
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
    RetT *ybuf;            // [R, H] routed expert outputs (FP32, or the storage type: RetT)
    float *ys;             // [S, H] shared expert output
    Sync *sync;
    ErrorRecord *err;
    const Peer *peers;     // ranks: [RANKS] every rank's exchange buffers (this rank's among them)
    u64 *tile_dispatched;  // ranks: [tiles] epoch once a token tile's rows and targets are out
    int *rows_sent;        // ranks: [E] this rank's rows stored into their owners so far (per launch)
    ErrorRecord *err_mirror;  // one GPU: host-mapped copy of a nonzero error record (the last block out), or null
    unsigned char *xq;     // fp8: [S, H] E4M3 codes of x (phase_fp8.cuh); null otherwise
    float *xq_scale;       // fp8: [S, ⌈H/128⌉] their scales
    unsigned char *hq;     // fp8: [R, I] E4M3 codes of h
    float *hq_scale;       // fp8: [R, ⌈I/128⌉] their scales
    int *hq_done;          // fp8: [row blocks, ⌈I/128⌉] finished GEMM0 column tiles per 128-channel group of h
    int tokens;            // S (this rank's tokens)
    int capacity;          // per-expert capacity over all ranks' tokens (INT_MAX when dropless)
    int rank;              // this rank
    int gate_ksplit;       // the gate's K split, 0: gate_gemv.cuh (chosen by the host so every rank splits alike)
    int row_blocks;        // capacity of done0 / done1 / ring
    int max_tokens;        // capacity of the token arrays (combine_list: cleared at the epoch wrap)
    int part_rows;         // logits_part holds part_rows rows of EG floats (all K slices)
    int y_storage;         // 1: y is T (the storage type), 0: FP32
    int inject_fault;      // FMOE_INJECT_FAULT builds: fault this launch only when set
    int pad;
    u64 epoch;             // launch number, from 1: read from the device at entry (sync->epoch, ranks: done_epoch)
    u64 budget_ns;         // every wait's time budget
    u64 epoch_wrap;        // one GPU: the launch with this epoch clears the epoch-tagged state and restarts at 0;
                           // ranks: a launch past it refuses to run (the host wraps; see fmoe_forward_ranks)
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
    if (FMOE_TID == 0 && (any_block || cta() == 0)) p.sync->stamps[i] = globaltimer_ns();
#endif
}

// Stores 4 consecutive FP32 values as T (one 8- or 16-byte store). TF32 mode stores FP32 as is: h is GEMM1's A
// operand, which the GEMM rounds to TF32 in shared memory as its stage lands (gemm_tile.cuh, round_stage_tf32).
FMOE_DEVICE void store4(T *dst, float a, float b, float c, float d) {
#if FMOE_PREC >= 2
    uint2 v;
    v.x = (u32)Storage<T>::store(a).bits | ((u32)Storage<T>::store(b).bits << 16);
    v.y = (u32)Storage<T>::store(c).bits | ((u32)Storage<T>::store(d).bits << 16);
    *(uint2 *)dst = v;
#else
    *(float4 *)dst = make_float4(a, b, c, d);
#endif
}

// 4 consecutive RetT values as one load returns them (float4, or uint2 of four 16-bit values), and their FP32
// values. Two steps so a reader can issue all its loads before it converts any: converting each load where it is
// issued made the compiler wait for it before issuing the next (round 19, H200: a combine took 38 instead of
// 20 µs a token).
#if FMOE_RET_T
typedef uint2 Ret4;
#else
typedef float4 Ret4;
#endif
FMOE_DEVICE Ret4 load_ret4(const RetT *src) { return *(const Ret4 *)src; }
FMOE_DEVICE float4 ret4_f32(Ret4 v) {
#if FMOE_RET_T
    RetT e[4];
    e[0].bits = (unsigned short)(v.x & 0xFFFF); e[1].bits = (unsigned short)(v.x >> 16);
    e[2].bits = (unsigned short)(v.y & 0xFFFF); e[3].bits = (unsigned short)(v.y >> 16);
    return make_float4(Storage<RetT>::load(e[0]), Storage<RetT>::load(e[1]), Storage<RetT>::load(e[2]),
                       Storage<RetT>::load(e[3]));
#else
    return v;
#endif
}

// Stores 4 consecutive FP32 values into the return buffer as RetT.
FMOE_DEVICE void store_ret4(RetT *dst, float4 v) {
#if FMOE_RET_T
    store4(dst, v.x, v.y, v.z, v.w);
#else
    *(float4 *)dst = v;
#endif
}

// Stores 4 consecutive values of y at element i: FP32, or the storage type when the caller asked for it.
FMOE_DEVICE void store_y4(const Params &p, size_t i, float4 v) {
    if (sizeof(T) < 4 && p.y_storage) store4((T *)p.y + i, v.x, v.y, v.z, v.w);
    else *(float4 *)((float *)p.y + i) = v;
}

#if FMOE_PREC == 4
// Ranks: received row `row` (a row of this owner's task space) of x as GEMM0 reads it, the E4M3 codes and then their
// KB_H scales that dispatch_rows wrote. (One GPU reads the token's row of xq and xq_scale instead.)
FMOE_DEVICE const unsigned char *received_codes(const Params &p, int row) {
    return (const unsigned char *)(p.peers[p.rank].recv + (size_t)row * H);
}
FMOE_DEVICE const float *received_scales(const Params &p, int row) {
    return (const float *)(received_codes(p, row) + H);
}
#endif

// Token t waits for `contributions` expert rows (its kept pairs and the shared expert): its count target, its
// arrivals reset, and y written as zeros now when nothing will contribute (placement and the ranks' dispatch).
FMOE_DEVICE void set_token_target(const Params &p, int t, int contributions) {
    p.target[t] = contributions;
    p.pending[t] = 0;
    if (contributions == 0) {
        for (int h = 0; h < H; h += 4) store_y4(p, (size_t)t * H + h, make_float4(0.f, 0.f, 0.f, 0.f));
    }
}

}  // namespace fmoe

#include "task_space.cuh"     // the Layout and its scans
#include "transport_nvshmem.cuh"  // FMOE_NVSHMEM builds: the NVSHMEM transport of the ranks protocol
