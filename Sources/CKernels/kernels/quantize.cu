// Weight quantization for precision fp8 on the GPU (Sources/FlashMoE/Fused/FP8DeviceQuantizer.swift): BF16
// matrices to E4M3 codes with one FP32 scale per 128×128 block, byte for byte what the host's FP8Blocks(quantizing:)
// (Sources/FlashMoE/Model/FP8Blocks.swift) writes for the same values. The rule is docs/fp8.md's:
//   scale = RN(amax / 448), or 1 when that is not positive (amax: the block's largest finite |v|);
//   code  = E4M3(RN(v / scale)), to nearest even, saturating at ±448; NaN → the NaN code with v's sign.
// The kernel needs E4M3 conversions (sm_89 and later), as every fp8 layer does.
#include "fp8.cuh"

using namespace fmoe;

namespace {

constexpr int QB = 128;                       // the block edge (FP8Scaling.blockSize)
constexpr int Q_THREADS = 256;                // 8 warps
constexpr int Q_WARPS = Q_THREADS / 32;
constexpr int Q_ROWS = QB / Q_WARPS;          // rows of a block per warp: 16; lane l holds columns 4l … 4l + 3

// The E4M3 codes of four values of one block (value q in byte q) given their quotients by the scale. cvt gives
// NaN as 0x7F whatever its sign, and the IEEE quotient of a NaN need not keep it; the host keeps the value's.
FMOE_DEVICE u32 codes4(const float v[4], const float quotient[4]) {
    u32 packed = (u32)e4m3x2(quotient[1], quotient[0]) | ((u32)e4m3x2(quotient[3], quotient[2]) << 16);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        if (v[q] != v[q]) {
            const u32 nan = 0x7Fu | ((__float_as_uint(v[q]) >> 24) & 0x80u);
            packed = (packed & ~(0xFFu << (8 * q))) | (nan << (8 * q));
        }
    }
    return packed;
}

}  // namespace

// Quantizes `matrices` BF16 matrices [rows, cols] (row-major, matrix m at src + m · matrix_stride elements) into
// `codes` [matrices, rows, cols] and `scales` [matrices, ⌈rows/128⌉, ⌈cols/128⌉], both dense. Each block of 256
// threads takes whole 128×128 blocks, grid-stride; a block's values stay in registers between its amax and its
// codes, so each BF16 value is read once. Loads are 8 bytes a lane where the source allows (4-element aligned rows
// and address), else 2; codes are stored 4 bytes a lane where cols is a multiple of 4, else a byte at a time.
extern "C" __global__ void __launch_bounds__(Q_THREADS) fmoe_quantize_e4m3_blocks(
    const unsigned short *__restrict__ src, long long matrix_stride, int rows, int cols, int matrices,
    unsigned char *__restrict__ codes, float *__restrict__ scales) {
    __shared__ float warp_max[Q_WARPS];
    const int warp = FMOE_TID / 32, lane = FMOE_TID % 32;
    const int br = (rows + QB - 1) / QB, bc = (cols + QB - 1) / QB;
    const long long blocks = (long long)matrices * br * bc;
    const bool wide_loads = cols % 4 == 0 && matrix_stride % 4 == 0 && ((unsigned long long)src & 7) == 0;
    const bool wide_stores = cols % 4 == 0 && ((unsigned long long)codes & 3) == 0;
    for (long long b = blockIdx.x; b < blocks; b += gridDim.x) {
        const int m = (int)(b / ((long long)br * bc));
        const int bi = (int)(b / bc % br), bj = (int)(b % bc);
        const int c0 = bj * QB + lane * 4;
        const int r0 = bi * QB + warp * Q_ROWS;
        const unsigned short *base = src + (long long)m * matrix_stride;
        // Values outside the matrix read as 0: they leave the amax as it is and are not stored.
        float v[Q_ROWS][4];
        float mx = 0.f;
#pragma unroll
        for (int i = 0; i < Q_ROWS; ++i) {
            const int r = r0 + i;
            const unsigned short *row = base + (long long)r * cols;
            if (r < rows && wide_loads && c0 < cols) {
                load_bf16x4(row + c0, v[i]);
            } else {
#pragma unroll
                for (int q = 0; q < 4; ++q) v[i][q] = r < rows && c0 + q < cols ? bf16_bits_to_f32(row[c0 + q]) : 0.f;
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float a = fabsf(v[i][q]);
                if (a <= 3.402823466e38f) mx = fmaxf(mx, a);  // finite values only: NaN and ±∞ fail the test
            }
        }
        // The block's amax: max is exact in any order, so the result is the host's whatever the reduction order.
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        if (lane == 0) warp_max[warp] = mx;
        __syncthreads();
        mx = warp_max[0];
#pragma unroll
        for (int w = 1; w < Q_WARPS; ++w) mx = fmaxf(mx, warp_max[w]);
        __syncthreads();  // every warp has read warp_max before the next block's amax overwrites it
        float s = __fdiv_rn(mx, 448.f);
        if (!(s > 0.f)) s = 1.f;
        if (FMOE_TID == 0) scales[((long long)m * br + bi) * bc + bj] = s;
        // The quotients: by the scale's reciprocal with a one-FMA correction where fp8.cuh's div_by_scale gives the
        // IEEE quotient's code (every BF16 value with such a scale, checked exhaustively), else the IEEE division.
        const bool reciprocal = scale_reciprocal_ok(mx);  // block-uniform
        const float rs = __frcp_rn(s);
#pragma unroll
        for (int i = 0; i < Q_ROWS; ++i) {
            const int r = r0 + i;
            if (r >= rows || c0 >= cols) continue;
            float quotient[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) quotient[q] = reciprocal ? div_by_scale(v[i][q], s, rs) : __fdiv_rn(v[i][q], s);
            const u32 packed = codes4(v[i], quotient);
            unsigned char *out = codes + ((long long)m * rows + r) * cols + c0;
            if (wide_stores) {
                *(u32 *)out = packed;
            } else {
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    if (c0 + q < cols) out[q] = (unsigned char)(packed >> (8 * q));
                }
            }
        }
    }
}
