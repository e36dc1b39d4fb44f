// Precision fp8 (FMOE_PREC == 4) without warpgroup MMA (sm_89; plain sm_90 for FLASHMOE_EMULATE_ARCH=sm_89's check):
// E4M3 × E4M3 mma.sync with the same per-K-block scale promotion as wgmma_fp8.cuh (fp8.cuh holds what they share).
//
// A stage is gemm_tile.cuh's (128 A rows and 128 B rows of 128 E4M3 bytes, one 128-wide K block). The fragments of
// mma.sync m16n8k32 e4m3 hold the same bytes as m16n8k16 bf16's (A: row g, bytes 4t…4t+3 and 16 further, rows g + 8
// the same; B likewise per column), so MmaEngine's ldmatrix addressing feeds it unchanged: each warp computes 64
// rows × 32 columns, 4 k32 steps per K block into a temporary accumulator, which is then promoted: acc += tmp ·
// (a_scale[row] · b_scale[granule]). A warp's 32 columns lie in one 64-row granule of the weights. The element
// order of every sum is wgmma_fp8.cuh's (the block's four k32 steps, then one promotion per block, blocks in
// order); whether these tensor cores round the k32 sums like Hopper's wgmma is for a GPU run to show (docs/fp8.md).
#pragma once
#include "common.cuh"
#include "fp8.cuh"
#include "gemm_tile.cuh"

namespace fmoe {

// MmaEngine's accumulators, stage step (compute_into), zero_tile() and stage_out(); its own MMA, K-block temporary and
// promotion.
struct Fp8MmaEngine : MmaEngine<MMA_BF16> {
    float tmp[4][4][4];  // the current K block's sums

    // MmaEngine's BF16 step would read E4M3 stages as BF16: hidden.
    FMOE_DEVICE void compute(const char *) = delete;

    // d += A·Bᵀ over k32 (E4M3 fragments, FP32 accumulation).
    FMOE_DEVICE static void mma_e4m3(float *d, const u32 *a, const u32 *b) {
        asm volatile(
            "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }

    // tmp = the stage's K block (its 4 k32 steps), from zero.
    FMOE_DEVICE void compute_block(const char *stage) {
        zero_tile(tmp);
        compute_into(stage, tmp, [](float *d, const u32 *a, const u32 *b) { mma_e4m3(d, a, b); });
    }

    // acc += tmp · a_scale(row) · b: `sa` holds the K block's scale of every tile row, b is the B scale of this
    // warp's granule.
    FMOE_DEVICE void promote(const float *sa, float b) {
        const int lane = FMOE_TID & 31, warp = FMOE_TID >> 5;
        const int wm = (warp >> 2) * 64, g = lane >> 2;
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) {
            const float s0 = sa[wm + mi * 16 + g], s1 = sa[wm + mi * 16 + g + 8];
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                float *d = acc[mi][ni];
                d[0] = fmaf(tmp[mi][ni][0], s0 * b, d[0]);
                d[1] = fmaf(tmp[mi][ni][1], s0 * b, d[1]);
                d[2] = fmaf(tmp[mi][ni][2], s1 * b, d[2]);
                d[3] = fmaf(tmp[mi][ni][3], s1 * b, d[3]);
            }
        }
    }
};

// The mma.sync fp8 mainloop (gemm_tile's ring, loads STAGES − 1 K blocks ahead): per K block a barrier, the refill
// of the previous block's stage, the block's MMAs into tmp and the promotion. The A scales go through shared
// memory: thread r < 128 holds row r's scale pointer (sc.a0, null past the tile's rows) and stores the next K
// block's scale while the block's MMAs run; the next barrier publishes it (two buffers by K block parity, so the
// store never meets a read of the same buffer). Leaves the FP32 tile in shared memory like gemm_tile.
template <int STAGES> FMOE_DEVICE void gemm_tile_fp8_mma(char *smem, const TileSource &src, const Fp8Scales &sc) {
    static_assert(FP8_PROMOTE_STEPS == 4, "the mma.sync fp8 engine promotes once per K block");
    constexpr int STAGE_BYTES = stage_bytes<FP8_BN>();
    __shared__ float s_scale[2][BM];
    Fp8MmaEngine eng;
    eng.zero();
    const int ktiles = (src.k_bytes + ROW_BYTES - 1) / ROW_BYTES;
    const bool granule1_warp = ((FMOE_TID >> 5) & 3) >= 2;  // columns 64 … 127: the tile's second granule
    // The previous tile's last reads of s_scale came before its final barrier; the first one below orders this.
    if (FMOE_TID < BM && ktiles > 0) s_scale[0][FMOE_TID] = sc.a0 != nullptr ? sc.a0[0] : 0.f;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_stage<FP8_BN>(smem + s * STAGE_BYTES, src, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        sync_block();  // stage kt and its scales landed for everyone; everyone is done with stage kt − 1
        const int next = kt + STAGES - 1;
        if (next < ktiles) load_stage<FP8_BN>(smem + (next % STAGES) * STAGE_BYTES, src, next);
        cp_async_commit();
        if (FMOE_TID < BM && kt + 1 < ktiles)
            s_scale[(kt + 1) & 1][FMOE_TID] = sc.a0 != nullptr ? sc.a0[kt + 1] : 0.f;
        const float b = granule1_warp ? (sc.granule1 ? sc.b[sc.kb_count + kt] : 0.f) : sc.b[kt];
        eng.compute_block(smem + (kt % STAGES) * STAGE_BYTES);
        eng.promote(s_scale[kt & 1], b);
    }
    cp_async_wait<0>();
    sync_block();
    eng.stage_out((float *)smem);
    sync_block();
}

}  // namespace fmoe
