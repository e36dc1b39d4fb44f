// The warp-specialised fp8 engine of sm_90a: the fused kernel's fp8 expert tiles in FMOE_TMA builds
// (phase_experts_tma_fp8.cuh), and the harness Benchmarks/engine/tma_fp8_test.cu, which checks it bit
// for bit against the cp.async fp8 tile (wgmma_fp8.cuh's gemm_tile_fp8) and times both (docs/engine-notes.md, "fp8").
//
// Why: the cp.async fp8 tile computes at about the bf16 tiles' rate on tensor cores twice as fast (docs/performance.md,
// "FP8 prefill"): its 256 threads load the stages, meet at a block barrier every K block and wait for their MMA
// before promoting it. Here, as in tma_engine.cuh, a producer warpgroup fills an mbarrier ring (weights and
// contiguous A rows by TMA, GEMM0's token rows gathered with cp.async arriving on the stage's barrier) and the two
// consumer warpgroups only compute, each at its own pace.
//
// The arithmetic is wgmma_fp8.cuh's, instruction for instruction: per 128-wide K block and 128 weight rows, four
// m64n128k32 e4m3 MMAs into a temporary (the first with scale-d = 0), then acc += tmp · (a_scale · b_scale), so the
// results are bit-identical. BN = 256 runs the two 128-row halves of B one after the other through the one temporary
// (128 + 64 accumulator registers): half the A traffic of two 128-row tiles (the fused kernel's default since round
// 33, FMOE_TMA_FP8_BN in tma_fp8_tasks.cuh). In the harness (H200, round 21, Benchmarks/RESULTS.md) BN = 256 ran at
// 1.2 – 1.6× the cp.async tile, BN = 128 slower, and a second temporary no faster than one (removed in round 22).
//
// Operands: B rows come from a stack of matrices (the experts' weight images: E4M3 codes [rows, K] at a fixed byte
// stride, their scales after the codes) through a 3-D tensor map, boxes of 128 bytes × BN rows × 1 matrix; rows past
// a matrix's own read as zeros. A rows: by TMA from a 2-D map (box 128 bytes × 128 rows) or gathered (TmaTile).
#pragma once
#include "tma_engine.cuh"
#include "wgmma_fp8.cuh"

namespace fmoe {

// Where one fp8 tile's scales come from: the thread's two accumulator rows' A scales ([K block]; null: scale 0)
// and the tile's weight granules' scales (granule g of the tile, K block kb at b[g · kb_count + kb]; granules at or
// past `granules` read as 0).
struct TmaFp8Scales {
    const float *a0, *a1;
    const float *b;
    int kb_count;
    int granules;
};

// Where a producer thread finds its scales of a tile when the ring carries them (SMEM_SCALES), indexed by K block:
// its tile row's A scales (null: the row has none, scale 0) and, for thread g < 2 · BN / 128, weight granule g's
// (null past the matrix's granules). Two pointers only: the producer's 72 registers also hold the gather's rows.
struct TmaFp8ScaleSource {
    const float *a;
    const float *b;
};

// What a copy that reads nothing (a cp.async of source size 0) names as its source: a valid global address.
__device__ float fp8_no_scale;

// FMOE_FP8_IDLE_WG 1: a consumer warpgroup with no rows in a tile skips its MMAs (consume). An expert's last row
// block holds its rows mod 128, and where that is at most 64 the second warpgroup's MMAs, A scales and promotions
// were all on zero rows (or, in GEMM1, on rows the epilogue masks). 0: every warpgroup computes. Default: with
// 256-row tiles; with 128-row tiles it measured −3 % to +3 % (Benchmarks/RESULTS.md, "Round 30").
#ifndef FMOE_FP8_IDLE_WG
#define FMOE_FP8_IDLE_WG (FMOE_TMA_FP8_BN == 256)
#endif
// FMOE_FP8_SPLIT_HALVES 1 (the default; with FMOE_FP8_IDLE_WG, 256 weight rows and h from the accumulators): a tile
// of at most 64 rows (an expert's last row block: 41 % of deepseek-v3 S = 4096's GEMM0 tiles) runs B's two 128-row
// halves on the two warpgroups at once, each over the tile's 64 rows (consume_split); 0: one warpgroup runs both
// halves in turn while the other idles. The same MMAs and promotions reach each output element in the same order: the
// same bits (H100: equal to the cp.async kernel's at deepseek-v3 S = 300 and 4096, paper-e64 S = 300). GEMM0's tiles
// only (epilogue: gemm0_quantize_split_fp8). deepseek-v3 S = 4096: 2.1 – 2.7 % faster by the medians, minima unchanged
// (H100, Benchmarks/RESULTS.md "Round 40": the engine's steps run one after another, so a shorter chain saves little).
#ifndef FMOE_FP8_SPLIT_HALVES
#define FMOE_FP8_SPLIT_HALVES 1
#endif
// FMOE_FP8_ORDERED_ISSUE 1 (only with FMOE_FP8_IDLE_WG): warpgroup 0 issues each K block's first MMAs before 1
// (ptx_sm90.cuh's order_issue_*); same bits, 1.5 – 2.5 % slower (H200, Benchmarks/RESULTS.md "Round 41"). 2: 1 issues
// them once 0's have completed, so 0 promotes under 1's MMAs (no spills; not yet run, "Round 42"). Default 0.
#if !defined(FMOE_FP8_ORDERED_ISSUE) || !FMOE_FP8_IDLE_WG
#undef FMOE_FP8_ORDERED_ISSUE
#define FMOE_FP8_ORDERED_ISSUE 0
#endif
// (In the preprocessor: the harness, Benchmarks/engine/tma_fp8_test.cu, defines neither FMOE_TMA_FP8_BN nor these.
// Split tiles quantize h from their accumulators: none with FMOE_H_FROM_ACC 0, tma_fp8_tasks.cuh.)
#if FMOE_FP8_SPLIT_HALVES && FMOE_FP8_IDLE_WG && !(defined(FMOE_H_FROM_ACC) && FMOE_H_FROM_ACC == 0)
constexpr bool FP8_SPLIT_HALVES = true;
#else
constexpr bool FP8_SPLIT_HALVES = false;
#endif

// SMEM_SCALES: the producer also copies each K block's scales into the ring (SCALES floats a stage: the tile's 128
// rows' A scales, then its granules'; the A scales in groups with FMOE_FP8_SCALE_GROUP below), arriving on the stage's
// full barrier, so the consumers read them from shared memory instead of holding the scales' pointers and bounds
// across the mainloop (with BN = 256 their 128 + 64 accumulators leave about 24 of 216 registers: deepseek-v3 spilled
// 276 B without it, NVRTC 13.0). The same scales reach the same promotions: the same bits.
// FMOE_FP8_LANE_RELEASE 1 (the default; with SMEM_SCALES only): every consumer lane arrives on a stage's empty
// barrier after its own reads of the stage's scales (256 arrivals a stage). 0: one lane a warp after a __syncwarp,
// the same order by the memory model (the warp barrier orders the lanes' reads before lane 0's release-arrive), but
// compute-sanitizer's racecheck does not follow the warp barrier and reports the producer's next copies into the
// scales as WAR hazards against the other lanes' reads. With 1: racecheck clean, the same bits, and no slower (H100,
// Benchmarks/RESULTS.md "Round 33").
#ifndef FMOE_FP8_LANE_RELEASE
#define FMOE_FP8_LANE_RELEASE 1
#endif
// FMOE_FP8_SCALE_GROUP (SMEM_SCALES only): the K blocks whose A scales a producer thread copies at once (a row's are
// consecutive floats: 8 are one sector, two 16-byte copies) into one of two group slots beside the stages, each with
// a full and an empty barrier, instead of a 4-byte copy a row a K block into the stage. The same bits. 1 (the
// default): a K block at a time; grouped by 8, deepseek-v3 S = 4096 ran 4.0 – 5.5 % slower and mixtral-8x7b S = 4096
// no faster (H100, Benchmarks/RESULTS.md "Round 39"). Groups only where both GEMMs' K-block counts are multiples of
// the group (tma_fp8_tasks.cuh): with partial groups the tests' small shapes spilled 8 B.
#ifndef FMOE_FP8_SCALE_GROUP
#define FMOE_FP8_SCALE_GROUP 1
#endif
template <int STAGES, int BN = 256, bool SMEM_SCALES = false, int SCALE_GROUP = 1> struct TmaFp8Engine {
    static_assert(BN == 128 || BN == 256, "128 or 256 weight rows a tile");
    static_assert(STAGES >= 3, "the ring needs at least 3 stages");
    static constexpr int HALVES = BN / 128;
    static constexpr int ACC = 64 * HALVES;
    static constexpr int A_BYTES = BM * ROW_BYTES;
    static constexpr int B_BYTES = BN * ROW_BYTES;
    static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 2 * STAGES * 8;
    static constexpr int SCALES = BM + 2 * HALVES;  // floats of a stage's scales (SMEM_SCALES)
    static constexpr bool LANE_RELEASE = SMEM_SCALES && FMOE_FP8_LANE_RELEASE != 0;
    static constexpr bool ORDERED = FMOE_FP8_ORDERED_ISSUE != 0, AFTER_WAIT = FMOE_FP8_ORDERED_ISSUE == 2;
    // Arrivals that release a stage: one lane of each consumer warp (TMA_EMPTY_ARRIVALS), or every consumer lane.
    static constexpr int EMPTY_ARRIVALS = LANE_RELEASE ? 32 * TMA_EMPTY_ARRIVALS : TMA_EMPTY_ARRIVALS;
    // A-scale groups (FMOE_FP8_SCALE_GROUP): SG K blocks a group, GROUP_FLOATS floats a group's slot ([row][SG]),
    // two slots; a group's full barrier counts the 128 producer threads' copies, its empty barrier every consumer lane.
    static constexpr int SG = SMEM_SCALES ? SCALE_GROUP : 1;
    static constexpr bool GROUPED = SG > 1 && (STAGES & (STAGES - 1)) == 0;  // (see `it`)
    static constexpr int GROUP_FLOATS = BM * SG;
    static constexpr int GROUP_FULL_ARRIVALS = 128, GROUP_EMPTY_ARRIVALS = 32 * TMA_EMPTY_ARRIVALS;
    static_assert(!GROUPED || (SG % 4 == 0 && SG <= 32), "a scale group is whole 16-byte copies");
    // A tile's K blocks fill whole groups (the caller's choice of SCALE_GROUP, tma_fp8_tasks.cuh), so a row's group
    // starts at a multiple of SG floats of a row whose scales are SG-float aligned: two 16-byte copies, no remainder.

    char *ring;
    u64 *full;
    u64 *empty;
    float *scales;  // SMEM_SCALES: STAGES × SCALES floats
    // K blocks this thread's role has passed through the ring (the same count in both roles); GROUPED: bits 30 and 31
    // count the scale groups passed, mod 4 (bit 30 the group's slot, bit 31 its barriers' phase). The ring reads
    // only it mod 2 · STAGES, which a power-of-two STAGES keeps clear of those bits (a launch passes far fewer than
    // 2^30 K blocks); a separate count held across the mainloop made ptxas spill the consumers' queue index
    // (deepseek-v3, 8 B, NVRTC 13.0), as its tracing build does with the per-K-block scale copies (rounds 36 – 37).
    u32 it;
    static constexpr u32 GROUP_ONE = 1u << 30;
    FMOE_DEVICE u32 gslot() const { return (it >> 30) & 1; }
    FMOE_DEVICE u32 gphase() const { return it >> 31; }

    // Every thread of both roles: the ring at `smem` (1024-byte aligned), the 2 · STAGES barriers at `bars`, the
    // stages' scales at `stage_scales` (SMEM_SCALES); this role has passed no K block yet.
    FMOE_DEVICE void attach(char *smem, u64 *bars, float *stage_scales = nullptr) {
        ring = smem;
        full = bars;
        empty = bars + STAGES;
        scales = stage_scales;
        it = 0;
    }
    // GROUPED: the two group slots ([row][SG] floats each) and their barriers (full 0, 1, then empty 0, 1), static
    // shared memory of their own (instantiated only where a grouped engine runs), so that neither role holds their
    // addresses in registers (held as members, they made the deepseek-v3 kernel spill 8 B, NVRTC 13.0).
    static FMOE_DEVICE float *groups() {
        __shared__ __align__(16) float slots[2 * GROUP_FLOATS];
        return slots;
    }
    static FMOE_DEVICE u64 *gbars() {
        __shared__ u64 bars[4];
        return bars;
    }
    // One thread, before either role uses the groups (mbar_init_fence and a barrier must follow).
    static FMOE_DEVICE void init_groups() {
        for (int g = 0; g < 2; ++g) {
            mbar_init(&gbars()[g], GROUP_FULL_ARRIVALS);
            mbar_init(&gbars()[2 + g], GROUP_EMPTY_ARRIVALS);
        }
    }
    // All threads: ring at `smem`, barriers after it, initialised (the harness). Ends with a block barrier.
    FMOE_DEVICE void init(char *smem) {
        attach(smem, (u64 *)(smem + STAGES * STAGE_BYTES));
        if (FMOE_TID == 0) {
            for (int s = 0; s < STAGES; ++s) {
                mbar_init(&full[s], TMA_FULL_ARRIVALS);
                mbar_init(&empty[s], EMPTY_ARRIVALS);
            }
            mbar_init_fence();
        }
        __syncthreads();
    }

    // Producer warpgroup: every K block of one tile. B: one TMA box of BN rows × 128 bytes of matrix b_image (map_b,
    // 3-D); A by TMA (map_a, box 128 × 128 bytes) or gathered (TmaTile's a_base / a_index / a_stride / a_rows), its
    // copies arriving on the stage's full barrier as they land (cp.async.mbarrier.arrive); SMEM_SCALES: the K block's
    // scales from `ss` (this thread's row's), arriving the same way.
    FMOE_DEVICE void produce(const TmaTile &t, const TmaFp8ScaleSource &ss = TmaFp8ScaleSource{}) {
        const int pt = FMOE_TID - TMA_CONSUMER_THREADS;
        const int ktiles = (t.k_bytes + ROW_BYTES - 1) / ROW_BYTES;
        const bool gather = t.map_a == nullptr;
        const int chunk = pt & 7;
        int rows[BM / 16];
        if (gather) {
#pragma unroll
            for (int i = 0; i < BM / 16; ++i) {
                const int r = (pt >> 3) + 16 * i;
                rows[i] = r < t.a_rows ? (t.a_index ? t.a_index[r] : r) : -1;
            }
        }
        const u32 tx = B_BYTES + (gather ? 0 : A_BYTES);
        for (int kt = 0; kt < ktiles; ++kt) {
            if (GROUPED && kt % SG == 0) produce_group(ss, kt, pt);
            const u32 s = it % STAGES;
            mbar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);
            char *st = ring + s * STAGE_BYTES;
            if (pt == 0) {
                mbar_arrive_expect_tx(&full[s], tx);
                tma_load_3d(smem_addr(st + A_BYTES), t.map_b, &full[s], kt * ROW_BYTES, t.b_row0, t.b_image);
                if (!gather) tma_load_2d(smem_addr(st), t.map_a, &full[s], kt * ROW_BYTES, t.a_row0);
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
            }
            if (SMEM_SCALES) {
                // Row pt's A scale and granule pt's B scale of K block kt, zero-filled where there is none (that
                // copy reads nothing; fp8_no_scale stands in as its address). GEMM1's h scales were published with
                // their row block, which thread 0 acquired before the warpgroup's barrier in TicketQueue::produce:
                // these copies follow it as the consumers' loads of them did.
                const u32 sm = smem_addr(scales + s * SCALES);
                if (!GROUPED) cp_async4(sm + 4 * pt, ss.a != nullptr ? ss.a + kt : &fp8_no_scale, ss.a != nullptr);
                if (pt < 2 * HALVES)
                    cp_async4(sm + 4 * (BM + pt), ss.b != nullptr ? ss.b + kt : &fp8_no_scale, ss.b != nullptr);
            }
            if (gather || SMEM_SCALES) {
                cp_async_mbar_arrive(&full[s]);
            } else {
                mbar_arrive(&full[s]);
            }
            ++it;
        }
    }

    // Producer thread pt (GROUPED): row pt's A scales of K blocks kt … kt + SG − 1 into the next group slot, [row][SG]
    // (zeros for a row without scales: the 4-byte copies of fp8_no_scale, reading nothing), arriving on its full
    // barrier as they land. The slot is free once every consumer lane has arrived on its empty barrier after its last
    // read of the group two before.
    FMOE_DEVICE void produce_group(const TmaFp8ScaleSource &ss, int kt, int pt) {
        const u32 g = gslot();
        mbar_wait(&gbars()[2 + g], gphase() ^ 1);
        const u32 dst = smem_addr(groups() + g * GROUP_FLOATS + pt * SG);
        if (ss.a != nullptr) {
#pragma unroll
            for (int j = 0; j < SG / 4; ++j) cp_async16(dst + 16 * j, ss.a + kt + 4 * j, true);
        } else {
#pragma unroll
            for (int j = 0; j < SG; ++j) cp_async4(dst + 4 * j, &fp8_no_scale, false);
        }
        cp_async_mbar_arrive(&gbars()[g]);
        it += GROUP_ONE;
    }
    // Consumer lanes (GROUPED): at K block kt, wait for the group that holds it (at its first K block); after the
    // group's last K block, release it.
    FMOE_DEVICE void group_wait(int kt) {
        if (GROUPED && kt % SG == 0) mbar_wait(&gbars()[gslot()], gphase());
    }
    FMOE_DEVICE void group_release(int kt) {
        if (GROUPED && kt % SG == SG - 1) {
            mbar_arrive(&gbars()[2 + gslot()]);
            it += GROUP_ONE;
        }
    }

    // This thread's A scales and half h's two granule scales of K block kb.
    static FMOE_DEVICE void scales_of(const TmaFp8Scales &sc, int kb, float &s0, float &s1, float (&b)[2 * HALVES]) {
        s0 = sc.a0 != nullptr ? sc.a0[kb] : 0.f;
        s1 = sc.a1 != nullptr ? sc.a1[kb] : 0.f;
#pragma unroll
        for (int g = 0; g < 2 * HALVES; ++g) b[g] = g < sc.granules ? sc.b[(size_t)g * sc.kb_count + kb] : 0.f;
    }

    // The four k32 MMAs of the stage's K block against B rows 128·h … into `tmp` (scale-d = 0 first), one group.
    FMOE_DEVICE static void issue(float *tmp, u32 a, u32 b) {
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) wgmma_m64n128k32_e4m3(tmp, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32), ks);
        wgmma_commit();
    }

    // acc[0 … 64) += tmp · a_scale(row) · b_scale(granule): Fp8WgmmaEngine::promote's arithmetic (wgmma_fp8.cuh).
    FMOE_DEVICE static void promote(float *acc, const float *tmp, float s0, float s1, float b0, float b1) {
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const float b = j < 8 ? b0 : b1;
            acc[4 * j] = fmaf(tmp[4 * j], s0 * b, acc[4 * j]);
            acc[4 * j + 1] = fmaf(tmp[4 * j + 1], s0 * b, acc[4 * j + 1]);
            acc[4 * j + 2] = fmaf(tmp[4 * j + 2], s1 * b, acc[4 * j + 2]);
            acc[4 * j + 3] = fmaf(tmp[4 * j + 3], s1 * b, acc[4 * j + 3]);
        }
    }

    // Whether a GEMM0 tile (A gathered) of `rows` rows runs split (FMOE_FP8_SPLIT_HALVES). Not GEMM1's: a second form
    // of its stores made ptxas spill the consumers' queue index (deepseek-v3, qwen3-30b-a3b: 8 B, NVRTC 13.0).
    static constexpr bool SPLIT = FP8_SPLIT_HALVES && HALVES == 2 && SMEM_SCALES;
    static FMOE_DEVICE bool split(int rows, bool gathered) { return SPLIT && gathered && rows <= 64; }

    // SMEM_SCALES: K block kt's A scales of tile rows r0 and r0 + 8, from its group's slot (GROUPED) or from the
    // stage's scales `sm`.
    FMOE_DEVICE void row_scales(const float *sm, int kt, int r0, float &s0, float &s1) const {
        if (GROUPED) {
            const float *ga = groups() + gslot() * GROUP_FLOATS + kt % SG;
            s0 = ga[r0 * SG];
            s1 = ga[(r0 + 8) * SG];
        } else {
            s0 = sm[r0];
            s1 = sm[r0 + 8];
        }
    }
    FMOE_DEVICE u32 a_of(u32 i) const {
        return smem_addr(ring + (i % STAGES) * STAGE_BYTES) + (FMOE_TID >> 7) * 64 * ROW_BYTES;
    }
    FMOE_DEVICE u32 b_of(u32 i) const { return smem_addr(ring + (i % STAGES) * STAGE_BYTES) + A_BYTES; }
    FMOE_DEVICE void wait_full(u32 i, bool gathered) {
        mbar_wait(&full[i % STAGES], (i / STAGES) & 1);
        if (gathered) fence_proxy_async();  // cp.async wrote the A rows through the generic proxy
    }
    // One lane a consumer warp (every lane with LANE_RELEASE): the stage's reads are done (its MMAs completed).
    FMOE_DEVICE void release(u32 i) { mbar_arrive_if(&empty[i % STAGES], LANE_RELEASE || (FMOE_TID & 31) == 0); }

    // Consumer warpgroups: the tile into acc (ACC registers; half h's in acc[64h …), each in wgmma_fp8.cuh's
    // m64n128 layout: register 4j + c holds row wgmma_acc_row() + 8·(c >> 1), column 128h + 8j + wgmma_acc_col()
    // + (c & 1)). With BN = 256 that is WgmmaEngine's m64n256 layout (register 4J + c, column 8J + …, J = 16h + j),
    // which the register epilogues read (register_epilogues.cuh). The scales from `sc`, or with SMEM_SCALES from the
    // ring (sc unused).
    FMOE_DEVICE void consume(const TmaTile &t, const TmaFp8Scales &sc, float *acc) {
        const int ktiles = (t.k_bytes + ROW_BYTES - 1) / ROW_BYTES;
        const bool gathered = t.map_a == nullptr;
#pragma unroll
        for (int i = 0; i < ACC; ++i) acc[i] = 0.f;
#if FMOE_FP8_IDLE_WG
        // A warpgroup whose 64 rows all lie past the tile's (the last, partial row block of an expert) computes
        // nothing: its accumulators stay 0 and reach only rows the epilogues mask, so the bits are the same. It
        // still passes every stage, full then released, so each empty barrier keeps its arrival count and no phase
        // is arrived on before the producer has refilled it. The warpgroup index from a shuffle: warp-uniform to
        // ptxas, which otherwise sees the MMAs below on a divergent path and serialises them (C7518).
        const int wg = __shfl_sync(0xffffffffu, (int)(FMOE_TID >> 7), 0);
        if (split(t.a_rows, gathered)) {
            consume_split(ktiles, gathered, wg, acc);
            return;
        }
        if (wg * 64 >= t.a_rows) {
            for (int kt = 0; kt < ktiles; ++kt) {
                if (ORDERED) order_issue_pass();  // an idle warpgroup 1 keeps the order's count
                group_wait(kt);
                mbar_wait(&full[it % STAGES], (it / STAGES) & 1);
                release(it);
                group_release(kt);
                ++it;
            }
            return;
        }
#endif
        float tmp[64];
        for (int kt = 0; kt < ktiles; ++kt) {
            float s0, s1, b[2 * HALVES];
            if (!SMEM_SCALES) scales_of(sc, kt, s0, s1, b);  // issued before the wait: their latency hides behind it
            group_wait(kt);
            wait_full(it, gathered);
#pragma unroll
            for (int h = 0; h < HALVES; ++h) {
                if (ORDERED && h == 0) order_issue_wait();
                issue(tmp, a_of(it), b_of(it) + h * 128 * ROW_BYTES);
                if (ORDERED && !AFTER_WAIT && h == 0) order_issue_done();
                if (SMEM_SCALES) {
                    // Read while the MMAs run: the rows' scales with the first half, each half's granules with its
                    // own (two registers fewer across the first promotion, which the 256-row tiles need).
                    const float *sm = scales + (it % STAGES) * SCALES;
                    if (h == 0) row_scales(sm, kt, wgmma_acc_row(fresh_tid()), s0, s1);
                    b[2 * h] = sm[BM + 2 * h];
                    b[2 * h + 1] = sm[BM + 2 * h + 1];
                }
                wgmma_wait<0>();
                if (AFTER_WAIT && h == 0) order_issue_done();
                if (h == HALVES - 1) {
                    // SMEM_SCALES: the producer refills the stage's scales once it is released: each lane arrives
                    // after its own reads (LANE_RELEASE), or one lane a warp after the barrier that orders them.
                    if (SMEM_SCALES && !LANE_RELEASE) __syncwarp();
                    release(it);
                }
                promote(acc + 64 * h, tmp, s0, s1, b[2 * h], b[2 * h + 1]);
            }
            group_release(kt);  // after this K block's reads of the group (s0, s1 read at h = 0)
            ++it;
        }
    }

    // A split tile (FMOE_FP8_SPLIT_HALVES): warpgroup wg computes B's half wg against the stage's first 64 A rows into
    // acc[0 … 64), the m64n128 layout of half wg (rows wgmma_acc_row of the thread index mod 128). The K blocks, MMAs,
    // scales and promotions of each output element are consume's: the same bits. Every consumer lane still passes
    // and releases each stage and group, so the barriers' counts are consume's.
    FMOE_DEVICE void consume_split(int ktiles, bool gathered, int wg, float *acc) {
        float tmp[64];
        for (int kt = 0; kt < ktiles; ++kt) {
            float s0, s1, b0, b1;
            group_wait(kt);
            wait_full(it, gathered);
            const u32 st = smem_addr(ring + (it % STAGES) * STAGE_BYTES);
            issue(tmp, st, st + A_BYTES + wg * 128 * ROW_BYTES);
            const float *sm = scales + (it % STAGES) * SCALES;  // read while the MMAs run
            row_scales(sm, kt, wgmma_acc_row(fresh_tid() & 127), s0, s1);
            b0 = sm[BM + 2 * wg];
            b1 = sm[BM + 2 * wg + 1];
            wgmma_wait<0>();
            if (!LANE_RELEASE) __syncwarp();
            release(it);
            promote(acc, tmp, s0, s1, b0, b1);
            group_release(kt);
            ++it;
        }
    }
};

}  // namespace fmoe
