// Hopper (sm_90a) warp-specialised GEMM engine: TMA loads into an mbarrier full/empty ring, one producer warpgroup,
// two consumer warpgroups issuing wgmma, accumulators left in registers for the caller's epilogue.
//
// Block of TMA_THREADS = 384: warpgroups 0 and 1 consume (rows 64·w … 64·w + 63 of the 128×256 tile, m64n256
// instructions, as WgmmaEngine in wgmma.cuh), warpgroup 2 produces. `setmaxnreg` moves registers from the producer
// (TMA_PRODUCER_REGS) to the consumers (TMA_CONSUMER_REGS: 128 FP32 accumulators plus addressing).
//
// Stage layout = gemm_tile.cuh's: A rows (128 × 128 bytes) then B rows (256 × 128 bytes), 16-byte chunks
// XOR-swizzled by row mod 8. That is the tensor map's CU_TENSOR_MAP_SWIZZLE_128B pattern for a box of 64 16-bit
// elements × rows landing on a 1024-byte aligned address, so the wgmma descriptors of wgmma.cuh apply unchanged.
//
// Operands: B (weight rows) always by TMA (one box of 256 rows per k-slice); A either by TMA (contiguous rows:
// GEMM1's intermediate, a receive buffer) or gathered by the producer warpgroup with cp.async (GEMM0's rows are
// tokens of x picked by row_token). Out-of-range rows and K past the end read as zeros either way (TMA zero-fills
// outside the tensor; cp.async copies 0 bytes); rows of a neighbouring expert inside the tensor are read but only
// reach output rows/columns the caller masks.
//
// Ring protocol, per k-slice i (stage i mod STAGES, parity (i / STAGES) mod 2), counted over the block's whole
// life so tiles chain without draining the ring:
//   producer: wait empty[s] (parity ^ 1: a fresh barrier's "previous phase" counts as complete), then thread 0
//             arrives on full[s] with the TMA byte count and issues the copies; all 128 producer threads also arrive
//             on full[s] (count 1 + 128): at once for a TMA A operand, or — for a gathered A — after their own
//             cp.async group has landed and been fenced to the async proxy (lagging GATHER_LAG slices behind, so
//             GATHER_LAG + 1 slices of gathers stay in flight); FMOE_TMA_ASYNC_ARRIVE 1: when their copies land
//             (cp.async.mbarrier.arrive), without waiting.
//   consumers: wait full[s] (FMOE_TMA_ASYNC_ARRIVE 1, a gathered stage: then fence to the async proxy, since
//             cp.async wrote it through the generic one), issue the slice's 4 wgmma as one group, wait until only
//             that group is in flight, then one lane per warp arrives on empty[s − 1] (count 8): the previous
//             slice's reads are done.
// Clusters of 2 (CLUSTER = 2, the kernel launched with cluster dims 2), two ways (SHARE):
//   SHARE_B: the two CTAs run tiles with the same B rows (one expert's column tile, two row blocks) in lockstep;
//            each loads half of B (box 64 × 128, map_b built so) and multicasts it to both;
//   SHARE_A: the two CTAs run tiles with the same A rows (one row block, two column tiles); each loads half of A
//            by TMA (box 64 × 64, map_a built so; no gather) and multicasts it, and loads its own B.
// Either way a stage is refilled only when the consumers of both CTAs released it: each consumer warp arrives on
// both CTAs' empty barriers (count 16).
// Only bf16/fp16: TF32 operands must be rounded in shared memory before wgmma reads them (gemm_tile.cuh), which a
// TMA-filled stage gives no thread the chance to do; tf32 keeps the cp.async engine.
#pragma once
#include "common.cuh"
#include "gemm_tile.cuh"
#include "wgmma.cuh"
#include "ptx_sm90.cuh"

namespace fmoe {

// FMOE_TMA_ASYNC_ARRIVE 1: a gathered A's producer threads arrive on full[s] through cp.async.mbarrier.arrive (the
// barrier counts the arrival when the thread's copies land) instead of waiting for their cp.async group GATHER_LAG
// slices later and fencing it themselves (0); the consumers fence to the async proxy after the wait instead. The
// producer then never waits on its own copies: it runs as far ahead as the ring's empty barriers let it, gathers and
// TMA alike. With 72 producer registers: same bits (5 prefill layers), qwen3-30b-a3b S = 4096 0.923 → 0.897 ms, its
// GEMM0 tiles 30.3 → 28.8 µs (H200, Benchmarks/RESULTS.md, round 20); the default since round 21, after verify, the
// fuzzer and memcheck, racecheck and synccheck ran it clean (RESULTS, round 21).
#ifndef FMOE_TMA_ASYNC_ARRIVE
#define FMOE_TMA_ASYNC_ARRIVE 1
#endif

constexpr int TMA_THREADS = 384;
constexpr int TMA_BN = 256;
constexpr int TMA_A_BYTES = BM * ROW_BYTES;      // 16 KiB
constexpr int TMA_B_BYTES = TMA_BN * ROW_BYTES;  // 32 KiB
constexpr int TMA_STAGE_BYTES = TMA_A_BYTES + TMA_B_BYTES;
constexpr int TMA_PRODUCER_REGS = 56;
constexpr int TMA_CONSUMER_REGS = 224;
constexpr int TMA_CONSUMER_THREADS = 256;
constexpr int TMA_FULL_ARRIVALS = 1 + 128;  // thread 0's expect_tx + every producer thread
constexpr int TMA_EMPTY_ARRIVALS = 8;       // one lane of each consumer warp (of each CTA of the cluster)

// Shared memory of the engine: STAGES stages (1024-byte aligned base), then the full and empty barriers.
template <int STAGES> constexpr int tma_smem_bytes() { return STAGES * TMA_STAGE_BYTES + 2 * STAGES * 8; }

// Where one 128×256 tile's operands come from.
struct TmaTile {
    const void *map_b;  // B tensor map: [rows, K] of 16-bit elements, box 64 × 256, 128-byte swizzle
    int b_row0;         // B's first row (tensor-map coordinate)
    int b_image;        // fp8 (tma_fp8_engine.cuh): B's matrix in its 3-D map (the expert); unused here
    const void *map_a;  // A tensor map (box 64 × 128), or null: gather A rows with cp.async
    int a_row0;         // A's first row (tensor-map coordinate)
    // Gather (map_a null): tile row r < a_rows reads a_base + a_index[r] · a_stride bytes (r · a_stride when
    // a_index is null); rows at or past a_rows read nothing (zero-filled).
    const char *a_base;
    const int *a_index;
    size_t a_stride;
    int a_rows;
    int k_bytes;  // K × element size (a multiple of 16)
};

enum TmaShare { SHARE_B = 0, SHARE_A = 1 };

// CLUSTER_RELEASE: the consumers' arrives on the peer's empty barriers release at cluster scope (run 3 of
// docs/engine-notes.md measured that form) instead of the default CTA scope. (One release a warpgroup instead of
// one a warp measured no different in the cluster pairs, run 5, and was removed.)
template <int KIND, int STAGES, int CLUSTER = 1, int SHARE = SHARE_B, bool CLUSTER_RELEASE = false>
struct TmaEngine {
    static_assert(CLUSTER == 1 || CLUSTER == 2, "clusters of 1 or 2 CTAs");
    static_assert(KIND == MMA_BF16 || KIND == MMA_F16, "the TMA engine runs 16-bit operands only (see header)");
    static_assert(STAGES >= 3, "the TMA ring needs at least 3 stages");
    static constexpr int BN = TMA_BN;
    static constexpr int GATHER_LAG = STAGES - 2;
    static constexpr int EMPTY_ARRIVALS = TMA_EMPTY_ARRIVALS;  // per CTA

    char *ring;  // 1024-byte aligned
    u64 *full;
    u64 *empty;
    u32 it;  // k-slices this thread's role has passed through the ring (identical in every role)
    u32 crank;  // this CTA's rank in its cluster

    // Every thread of both roles: the ring at `smem` (1024-byte aligned), the 2 · STAGES barriers at `bars`; this
    // role has passed no k-slice yet.
    FMOE_DEVICE void attach(char *smem, u64 *bars) {
        ring = smem;
        full = bars;
        empty = bars + STAGES;
        it = 0;
        crank = CLUSTER > 1 ? cluster_cta_rank() : 0;
    }
    // One thread, before either role uses the ring (a block barrier must follow): the barriers' initial phases.
    FMOE_DEVICE void init_barriers() const {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(&full[s], TMA_FULL_ARRIVALS);
            mbar_init(&empty[s], EMPTY_ARRIVALS * CLUSTER);
        }
        mbar_init_fence();
    }
    // All TMA_THREADS threads: places the ring at `smem` (1024-byte aligned), the barriers right after it, and
    // initialises them. Ends with a block barrier.
    FMOE_DEVICE void init(char *smem) {
        attach(smem, (u64 *)(smem + STAGES * TMA_STAGE_BYTES));
        if (FMOE_TID == 0) init_barriers();
        if (CLUSTER > 1) cluster_sync();  // the peer's barriers exist before any multicast or remote arrive
        else __syncthreads();
    }
    // All threads, before the block exits: in a cluster, the peer may still multicast into this CTA or arrive on
    // its barriers until it is done.
    FMOE_DEVICE void finish() {
        if (CLUSTER > 1) cluster_sync();
    }

    // Warpgroup-uniform as far as the compiler can tell (a shuffle from lane 0), so the consumers' wgmma are not
    // treated as divergent.
    static FMOE_DEVICE bool is_producer() {
        return __shfl_sync(0xffffffffu, (int)(FMOE_TID >> 7), 0) == TMA_CONSUMER_THREADS / 128;
    }
    FMOE_DEVICE u32 stage() const { return it % STAGES; }
    FMOE_DEVICE u32 parity() const { return (it / STAGES) & 1; }

    // Producer warpgroup: fills the ring with every k-slice of one tile.
    FMOE_DEVICE void produce(const TmaTile &t) {
        const int pt = FMOE_TID - TMA_CONSUMER_THREADS;  // 0 … 127
        const int ktiles = (t.k_bytes + ROW_BYTES - 1) / ROW_BYTES;
        const bool gather = t.map_a == nullptr;
        // Gather: thread pt copies chunk pt & 7 of rows (pt >> 3) + 16·i, i < 8 (8 lanes read one 128-byte row).
        // Rows are kept as 32-bit indices (−1: past a_rows), not pointers: the producer runs on few registers
        // (TMA_PRODUCER_REGS; the fused kernel's FMOE_TMA_PRODUCER_REGS).
        const int chunk = pt & 7;
        int rows[BM / 16];
        if (gather) {
#pragma unroll
            for (int i = 0; i < BM / 16; ++i) {
                const int r = (pt >> 3) + 16 * i;
                rows[i] = r < t.a_rows ? (t.a_index ? t.a_index[r] : r) : -1;
            }
        }
        const u32 tx = TMA_B_BYTES + (gather ? 0 : TMA_A_BYTES);
        for (int kt = 0; kt < ktiles; ++kt) {
            const u32 s = stage();
            mbar_wait(&empty[s], parity() ^ 1);
            char *st = ring + s * TMA_STAGE_BYTES;
            if (pt == 0) {
                mbar_arrive_expect_tx(&full[s], tx);
                if (CLUSTER == 1 || SHARE == SHARE_A) {
                    tma_load_2d(smem_addr(st + TMA_A_BYTES), t.map_b, &full[s], kt * 64, t.b_row0);
                } else {
                    const int half = TMA_BN / 2;
                    tma_load_2d_multicast(smem_addr(st + TMA_A_BYTES + crank * half * ROW_BYTES), t.map_b, &full[s],
                                          kt * 64, t.b_row0 + (int)crank * half, (unsigned short)3);
                }
                if (CLUSTER == 2 && SHARE == SHARE_A) {
                    const int half = BM / 2;
                    tma_load_2d_multicast(smem_addr(st + crank * half * ROW_BYTES), t.map_a, &full[s], kt * 64,
                                          t.a_row0 + (int)crank * half, (unsigned short)3);
                } else if (!gather) {
                    tma_load_2d(smem_addr(st), t.map_a, &full[s], kt * 64, t.a_row0);
                }
            }
            if (gather) {
                const int off = kt * ROW_BYTES + chunk * 16;
                const bool k_in = off < t.k_bytes;
                const u32 base = smem_addr(st);
#pragma unroll
                for (int i = 0; i < BM / 16; ++i) {
                    const int r = (pt >> 3) + 16 * i;
                    const bool v = rows[i] >= 0 && k_in;
                    cp_async16(base + swizzle(r, chunk), v ? t.a_base + (size_t)rows[i] * t.a_stride + off : t.a_base,
                               v);
                }
                if (FMOE_TMA_ASYNC_ARRIVE) {
                    cp_async_mbar_arrive(&full[s]);
                } else {
                    cp_async_commit();
                    if (kt >= GATHER_LAG) {
                        cp_async_wait<GATHER_LAG>();
                        fence_proxy_async();  // this thread's landed gathers, to the async proxy wgmma reads through
                        mbar_arrive(&full[(it - GATHER_LAG) % STAGES]);
                    }
                }
            } else {
                mbar_arrive(&full[s]);
            }
            ++it;
        }
        if (gather && !FMOE_TMA_ASYNC_ARRIVE) {
            cp_async_wait<0>();
            fence_proxy_async();
            const int pending = ktiles < GATHER_LAG ? ktiles : GATHER_LAG;
            for (int q = pending; q > 0; --q) mbar_arrive(&full[(it - q) % STAGES]);
        }
    }

    // Consumer warpgroups: the tile's mainloop into `acc` (zeroed here), in WgmmaEngine's m64n256 layout: register
    // 4j + c holds row wgmma_acc_row() + 8·(c >> 1), column 8j + wgmma_acc_col() + (c & 1) (wgmma.cuh).
    FMOE_DEVICE void consume(const TmaTile &t, float *acc) {
        const int ktiles = (t.k_bytes + ROW_BYTES - 1) / ROW_BYTES;
        const int wg = FMOE_TID >> 7;
        const bool lane0 = (FMOE_TID & 31) == 0;
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = 0.f;
        const bool gathered = FMOE_TMA_ASYNC_ARRIVE && t.map_a == nullptr;
        for (int kt = 0; kt < ktiles; ++kt) {
            const u32 s = stage();
            mbar_wait(&full[s], parity());
            // The gathered rows landed through the generic proxy (cp.async), observed through the barrier: ordered
            // before this thread's wgmma reads them through the async proxy.
            if (gathered) fence_proxy_async();
            const u32 a = smem_addr(ring + s * TMA_STAGE_BYTES) + wg * 64 * ROW_BYTES;
            const u32 b = smem_addr(ring + s * TMA_STAGE_BYTES) + TMA_A_BYTES;
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) wgmma_m64n256<KIND>(acc, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32));
            wgmma_commit();
            wgmma_wait<1>();
            release(&empty[(it - 1) % STAGES], kt > 0 && lane0);
            ++it;
        }
        wgmma_wait<0>();
        release(&empty[(it - 1) % STAGES], ktiles > 0 && lane0);
    }

    // A consumer warp's release of a stage: to this CTA's empty barrier and, in a cluster, to the peer's.
    FMOE_DEVICE void release(u64 *bar, bool pred) const {
        if (CLUSTER == 1) {
            mbar_arrive_if(bar, pred);
        } else {
            mbar_arrive_cluster_if<CLUSTER_RELEASE>(bar, 0, pred);
            mbar_arrive_cluster_if<CLUSTER_RELEASE>(bar, 1, pred);
        }
    }
};

}  // namespace fmoe
