// Hopper (sm_90a) tensor-core engine: warpgroup MMA (wgmma) straight from the swizzled shared-memory stages.
//
// The stage layout of gemm_tile.cuh (128-byte rows, 16-byte chunks XOR-swizzled by row mod 8) is exactly the
// hardware's 128-byte swizzle for K-major operands, so the cp.async ring feeds wgmma with no change: a descriptor
// points at 8-row × 128-byte swizzle atoms (stride 1024 bytes between atoms), and stepping K by one instruction
// (32 bytes: k16 of bf16/fp16, k8 of tf32) adds 32 bytes to the start address. Warpgroup w computes rows 64·w..+63
// of the 128×256 tile with m64n256 instructions (twice the FLOPs per byte of a 128×128 tile, which Hopper's L2
// bandwidth needs; the fp8 kernels' shared expert takes 128×128 tiles, m64n128, and in the 256-row TMA kernel a
// ticket's pair as one 128×256 tile); both warpgroups read the same 128 B rows.
#pragma once
#include "common.cuh"
#include "gemm_tile.cuh"  // the stage layout, MmaKind and round_stage_tf32

namespace fmoe {

// Shared-memory matrix descriptor: start address, stride between 8-row atoms (1024 B), 128-byte swizzle.
// The leading-byte offset is unused for swizzled K-major operands. Stage bases are 1024-byte aligned, so the
// base-offset field stays 0.
FMOE_DEVICE u64 wgmma_desc(u32 smem_byte_addr) {
    return (u64)((smem_byte_addr >> 4) & 0x3FFF) | ((u64)(1024 >> 4) << 32) | (1ull << 62);
}

FMOE_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
FMOE_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> FMOE_DEVICE void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Shared memory written through the generic proxy (cp.async, st.shared) and read next by wgmma (async proxy).
FMOE_DEVICE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

#define FMOE_ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                     "+f"(d[i + 6]), "+f"(d[i + 7])
#define FMOE_ACC32(i) FMOE_ACC8(i), FMOE_ACC8(i + 8), FMOE_ACC8(i + 16), FMOE_ACC8(i + 24)
#define FMOE_ACC128 FMOE_ACC32(0), FMOE_ACC32(32), FMOE_ACC32(64), FMOE_ACC32(96)
#define FMOE_R8(a) "%" #a "0,%" #a "1,%" #a "2,%" #a "3,%" #a "4,%" #a "5,%" #a "6,%" #a "7,%" #a "8,%" #a "9,"
// The 128 accumulator operands %0 … %127, then the descriptors %128 and %129.
#define FMOE_REGS128                                                                                        \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9," FMOE_R8(1) FMOE_R8(2) FMOE_R8(3) FMOE_R8(4) FMOE_R8(5) FMOE_R8(6)      \
        FMOE_R8(7) FMOE_R8(8) FMOE_R8(9) FMOE_R8(10) FMOE_R8(11)                                            \
        "%120,%121,%122,%123,%124,%125,%126,%127}"

template <int KIND> FMOE_DEVICE void wgmma_m64n256(float *d, u64 da, u64 db);
template <> FMOE_DEVICE void wgmma_m64n256<MMA_BF16>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " FMOE_REGS128 ", %128, %129, 1, 1, 1, 0, 0;\n"
                 : FMOE_ACC128 : "l"(da), "l"(db));
}
template <> FMOE_DEVICE void wgmma_m64n256<MMA_F16>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " FMOE_REGS128 ", %128, %129, 1, 1, 1, 0, 0;\n"
                 : FMOE_ACC128 : "l"(da), "l"(db));
}
template <> FMOE_DEVICE void wgmma_m64n256<MMA_TF32>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k8.f32.tf32.tf32 " FMOE_REGS128 ", %128, %129, 1, 1, 1;\n"
                 : FMOE_ACC128 : "l"(da), "l"(db));
}

// The 16 accumulator operands %0 … %15 of an m64n32 instruction, then the descriptors %16 and %17.
#define FMOE_ACC16 FMOE_ACC8(0), FMOE_ACC8(8)
#define FMOE_REGS16 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}"

template <int KIND> FMOE_DEVICE void wgmma_m64n32(float *d, u64 da, u64 db);
template <> FMOE_DEVICE void wgmma_m64n32<MMA_BF16>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " FMOE_REGS16 ", %16, %17, 1, 1, 1, 0, 0;\n"
                 : FMOE_ACC16 : "l"(da), "l"(db));
}
template <> FMOE_DEVICE void wgmma_m64n32<MMA_F16>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 " FMOE_REGS16 ", %16, %17, 1, 1, 1, 0, 0;\n"
                 : FMOE_ACC16 : "l"(da), "l"(db));
}
template <> FMOE_DEVICE void wgmma_m64n32<MMA_TF32>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n32k8.f32.tf32.tf32 " FMOE_REGS16 ", %16, %17, 1, 1, 1;\n"
                 : FMOE_ACC16 : "l"(da), "l"(db));
}

// The 32 accumulator operands %0 … %31 of an m64n64 instruction, then the descriptors %32 and %33.
#define FMOE_REGS32                                                                                          \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27," \
    "%28,%29,%30,%31}"

template <int KIND> FMOE_DEVICE void wgmma_m64n64(float *d, u64 da, u64 db);
template <> FMOE_DEVICE void wgmma_m64n64<MMA_BF16>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " FMOE_REGS32 ", %32, %33, 1, 1, 1, 0, 0;\n"
                 : FMOE_ACC32(0) : "l"(da), "l"(db));
}
template <> FMOE_DEVICE void wgmma_m64n64<MMA_F16>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " FMOE_REGS32 ", %32, %33, 1, 1, 1, 0, 0;\n"
                 : FMOE_ACC32(0) : "l"(da), "l"(db));
}
template <> FMOE_DEVICE void wgmma_m64n64<MMA_TF32>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 " FMOE_REGS32 ", %32, %33, 1, 1, 1;\n"
                 : FMOE_ACC32(0) : "l"(da), "l"(db));
}

template <int KIND> FMOE_DEVICE void wgmma_m64n128(float *d, u64 da, u64 db);  // defined with the decode engine

// BN_ = 128 (the fp8 kernels' shared expert: BF16 tiles as wide as the fp8 ones, moe_params.cuh): m64n128 each
// warpgroup, half the accumulators.
template <int KIND_, int BN_ = 256> struct WgmmaEngine {
    static_assert(BN_ == 128 || BN_ == 256, "wide tiles are 128 x 256 (or 128 x 128)");
    static constexpr bool WGMMA = true;
    static constexpr int KIND = KIND_;
    static constexpr int BM = fmoe::BM;
    static constexpr int BN = BN_;
    static constexpr int C_STRIDE = c_stride<BN>();
    float acc[BN / 2];

    FMOE_DEVICE void zero() {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
    }

    // Issues the 4 instructions of one stage (one 128-byte k-slice) as one wgmma group.
    FMOE_DEVICE void issue(const char *stage) {
        const int wg = FMOE_TID >> 7;
        const u32 a = smem_addr(stage) + wg * 64 * ROW_BYTES;
        const u32 b = smem_addr(stage) + BM * ROW_BYTES;
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            if constexpr (BN == 256) wgmma_m64n256<KIND>(acc, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32));
            else wgmma_m64n128<KIND>(acc, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32));
        }
        wgmma_commit();
    }

    // m64nN accumulator layout: warp w of the warpgroup owns rows 16w..16w+15; register 4j+c holds column
    // 8j + 2(lane%4) + (c&1) of row (lane/4) + 8(c>>1) (wgmma_acc_row, wgmma_acc_col below).
    FMOE_DEVICE void stage_out(float *c) const {
        const int wg = FMOE_TID >> 7, w = (FMOE_TID >> 5) & 3, lane = FMOE_TID & 31;
        const int row = wg * 64 + w * 16 + (lane >> 2), col = 2 * (lane & 3);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            *(float2 *)&c[row * C_STRIDE + 8 * j + col] = make_float2(acc[4 * j], acc[4 * j + 1]);
            *(float2 *)&c[(row + 8) * C_STRIDE + 8 * j + col] = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
        }
    }
};

// WgmmaEngine's accumulators (and the TMA engine's, tma_engine.cuh): register 4j + c of this thread holds row
// wgmma_acc_row() + 8·(c >> 1), column 8j + wgmma_acc_col() + (c & 1) of the 128 × BN tile.
FMOE_DEVICE int wgmma_acc_row() {
    return (FMOE_TID >> 7) * 64 + ((FMOE_TID >> 5) & 3) * 16 + ((FMOE_TID & 31) >> 2);
}
// The same row of thread `tid`, for callers that read %tid.x themselves (fresh_tid, common.cuh).
FMOE_DEVICE int wgmma_acc_row(int tid) { return (tid >> 7) * 64 + ((tid >> 5) & 3) * 16 + ((tid & 31) >> 2); }
FMOE_DEVICE int wgmma_acc_col() { return 2 * (FMOE_TID & 3); }

// Quad transpose for 16-byte stores from those registers: lane t of each quad holds w[i] = the packed pair of
// columns 8(j0 + i) + 2t, +1 (i < 4) of its row; returns the 4 words of column block j0 + t (16 contiguous bytes of
// the row), so a warp's store covers 64 contiguous bytes per row instead of 16. Three shuffles; indices are selects,
// so nothing goes to local memory. `t`: the lane in its quad (a caller may pass its own %tid.x read).
FMOE_DEVICE uint4 quad_transpose(const u32 *w, int t = (int)(FMOE_TID & 3)) {
    u32 o[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int idx = t ^ r;  // the block my reader in this round (lane t ^ r) collects
        const u32 send = idx == 0 ? w[0] : idx == 1 ? w[1] : idx == 2 ? w[2] : w[3];
        const u32 got = r == 0 ? send : __shfl_xor_sync(0xffffffffu, send, r);
#pragma unroll
        for (int q = 0; q < 4; ++q) o[q] = q == idx ? got : o[q];  // columns 2(t ^ r), +1 of my block
    }
    return make_uint4(o[0], o[1], o[2], o[3]);
}

// The 64 accumulator operands %0 … %63 of an m64n128 instruction, then the descriptors %64 and %65.
#define FMOE_ACC64 FMOE_ACC32(0), FMOE_ACC32(32)
#define FMOE_REGS64 \
    "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9," FMOE_R8(1) FMOE_R8(2) FMOE_R8(3) FMOE_R8(4) FMOE_R8(5) "%60,%61,%62,%63}"

template <int KIND> FMOE_DEVICE void wgmma_m64n128(float *d, u64 da, u64 db);
template <> FMOE_DEVICE void wgmma_m64n128<MMA_BF16>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " FMOE_REGS64 ", %64, %65, 1, 1, 1, 0, 0;\n"
                 : FMOE_ACC64 : "l"(da), "l"(db));
}
template <> FMOE_DEVICE void wgmma_m64n128<MMA_F16>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " FMOE_REGS64 ", %64, %65, 1, 1, 1, 0, 0;\n"
                 : FMOE_ACC64 : "l"(da), "l"(db));
}
template <> FMOE_DEVICE void wgmma_m64n128<MMA_TF32>(float *d, u64 da, u64 db) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 " FMOE_REGS64 ", %64, %65, 1, 1, 1;\n"
                 : FMOE_ACC64 : "l"(da), "l"(db));
}

// Decode tiles (decode_tiles.cuh): 64 rows × BN weight rows (64 or 128), each warpgroup m64n(BN/2) on its own
// BN/2 weight rows of the stage and both on the same 64 A rows. At decode an expert has a few rows: a 128 × 256
// tile spends its tensor time on zero rows and a launch has fewer such tiles than SMs. Each output element is the
// wide engine's: the same k16 (tf32: k8) instructions in the same K order, FP32 accumulation from zero. BN = 256:
// the half tiles of expert_tiles.cuh (a wide tile's weight rows over a row block of at most 64 rows).
template <int KIND_, int BN_ = 64> struct WgmmaDecodeEngine {
    static_assert(BN_ == 64 || BN_ == 128 || BN_ == 256, "decode tiles are 64 or 128 weight rows, half tiles 256");
    static constexpr int KIND = KIND_;
    static constexpr int BM = 64;
    static constexpr int BN = BN_;
    static constexpr int WN = BN / 2;  // a warpgroup's columns
    static constexpr int C_STRIDE = BN + 4;
    float acc[WN / 2];

    FMOE_DEVICE void zero() {
#pragma unroll
        for (int i = 0; i < WN / 2; ++i) acc[i] = 0.f;
    }

    FMOE_DEVICE void issue(const char *stage) {
        const int wg = FMOE_TID >> 7;
        const u32 a = smem_addr(stage);
        const u32 b = smem_addr(stage) + (BM + wg * WN) * ROW_BYTES;  // WN / 8 swizzle atoms per warpgroup
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            if constexpr (WN == 128) wgmma_m64n128<KIND>(acc, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32));
            else if (WN == 32) wgmma_m64n32<KIND>(acc, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32));
            else wgmma_m64n64<KIND>(acc, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32));
        }
        wgmma_commit();
    }

    // The m64nN layout (see WgmmaEngine::stage_out); warpgroup w's columns are columns WN·w … WN·w + WN − 1.
    FMOE_DEVICE void stage_out(float *c) const {
        const int wg = FMOE_TID >> 7, w = (FMOE_TID >> 5) & 3, lane = FMOE_TID & 31;
        const int row = w * 16 + (lane >> 2), col = wg * WN + 2 * (lane & 3);
#pragma unroll
        for (int j = 0; j < WN / 8; ++j) {
            *(float2 *)&c[row * C_STRIDE + 8 * j + col] = make_float2(acc[4 * j], acc[4 * j + 1]);
            *(float2 *)&c[(row + 8) * C_STRIDE + 8 * j + col] = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
        }
    }
};

// Whether a tile of this engine reads its weights evict-first (decode tiles only: weights read once a launch; the
// wide tiles' weight slabs are read again by the expert's other row blocks, and so are the half tiles', which run
// at prefill).
template <class Engine> constexpr bool evicts_weights() {
    return FMOE_DECODE_EVICT_FIRST != 0 && Engine::BM == 64 && Engine::BN <= 128;
}

// The wgmma mainloop: loads run STAGES − 1 k-slices ahead, and one wgmma group stays in flight. Per k-slice: wait
// for its stage, issue its group, wait until only that group is in flight (the previous one is done), then a
// barrier (both warpgroups are past the previous group) and refill the previous group's stage. The second barrier
// buys one more slice of loads in flight than refilling before the issue (measured 2–5 % faster on paper-e64,
// paper-e32 and qwen3, 2026-11-29). Not bound by the L2 feed: Benchmarks/l2_feed_bench.cu copies these slices at
// 67 – 153 GB/s an SM, a tile's mainloop moves about 56 (docs/performance.md, "FP8 prefill").
// Engine: WgmmaEngine (128 × 256 or 128 × 128: the A rows of a TileSource a[0..3], B rows b[0..7] or b[0..3]) or
// WgmmaDecodeEngine (64 × 64 or 64 × 128, a[0..1], b[0..1] or b[0..3]); the result is staged as
// [Engine::BM][Engine::C_STRIDE] floats at smem.
// wgmma_mainloop leaves the accumulators in `eng` (every group retired, every stage free: ends with a barrier);
// gemm_tile_wgmma stages them, gemm_tile_wgmma_acc hands them to an epilogue that stores from registers.
// PARTS (chain_tiles, expert_tiles.cuh, splits a tile in two): 3, the whole tile; 1, only the first STAGES − 1
// k-slices' loads (the accumulators untouched, so the previous tile's epilogue may still read them); 2, the rest,
// after a PARTS 1 call with the same src, from zeroed accumulators.
template <class Engine, int STAGES, int PARTS = 3>
FMOE_DEVICE void wgmma_mainloop(char *smem, const TileSource &src, Engine &eng) {
    static_assert(STAGES >= 3, "the wgmma pipeline needs at least 3 stages");
    constexpr int P = STAGES - 1;
    constexpr int TBM = Engine::BM, TBN = Engine::BN, STAGE_BYTES = (TBM + TBN) * ROW_BYTES;
    constexpr bool EVICT = evicts_weights<Engine>();
    if constexpr (PARTS == 3) eng.zero();
    const int ktiles = (src.k_bytes + ROW_BYTES - 1) / ROW_BYTES;
    // The decode tiles' deep ring (12 stages) fills in a loop: unrolled, its per-stage addresses took the kernel to
    // 255 registers and spills (sm_90a, qwen3-30b-a3b bf16); rolled, 244. The rolled loop's copies go without the
    // L2 hint: with it, ptxas (NVRTC 13.0.88) emitted hinted copies whose uniform stage offset overwrote the policy's
    // uniform register, an illegal instruction at run time (tf32, H = 88, 8 stages: fuzz seed 20261205 case 118,
    // Benchmarks/RESULTS.md round 24). The prologue is P of a tile's k-slices; decode timings unchanged.
    constexpr bool ROLLED = P > 4;
    if constexpr ((PARTS & 1) != 0) {
#pragma unroll (ROLLED ? 1 : P)
        for (int s = 0; s < P; ++s) {
            if (s < ktiles) load_stage<TBN, TBM, EVICT && !ROLLED>(smem + s * STAGE_BYTES, src, s);
            cp_async_commit();
        }
    }
    if constexpr ((PARTS & 2) == 0) return;
    if constexpr (PARTS == 2) eng.zero();
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<P - 1>();
        if (Engine::KIND == MMA_TF32) round_stage_tf32<TBM>(smem + (kt % STAGES) * STAGE_BYTES);  // gemm_tile.cuh
        fence_proxy_async();
        sync_block();
        eng.issue(smem + (kt % STAGES) * STAGE_BYTES);
        wgmma_wait<1>();
        sync_block();
        const int next = kt + P;
        if (next < ktiles) load_stage<TBN, TBM, EVICT>(smem + (next % STAGES) * STAGE_BYTES, src, next);
        cp_async_commit();
    }
    wgmma_wait<0>();
    cp_async_wait<0>();
    sync_block();
}
template <class Engine, int STAGES> FMOE_DEVICE void gemm_tile_wgmma(char *smem, const TileSource &src) {
    Engine eng;
    wgmma_mainloop<Engine, STAGES>(smem, src, eng);
    eng.stage_out((float *)smem);
    sync_block();
}
// The wide engine's tile with its accumulators (WgmmaEngine's layout: wgmma_acc_row, wgmma_acc_col) passed to
// `epilogue(const float *acc)`, no staging through shared memory.
template <class Engine, int STAGES, class Epilogue>
FMOE_DEVICE void gemm_tile_wgmma_acc(char *smem, const TileSource &src, Epilogue epilogue) {
    Engine eng;
    wgmma_mainloop<Engine, STAGES>(smem, src, eng);
    epilogue((const float *)eng.acc);
}

}  // namespace fmoe
