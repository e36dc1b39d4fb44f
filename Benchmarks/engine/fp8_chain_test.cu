// The fp8 engine's consumer chain alone (tma_fp8_engine.cuh's mainloop, issue 14's speed): what rate the K-block
// loop of the consumer warpgroups reaches on an SM when nothing else runs — no producer, no ring, no loads. One
// block per SM; its warpgroups compute a 64-row slab each against the same 256 (or 128) weight rows of one K block
// that stays in shared memory, `iters` times, and the launch reports TFLOP/s. The schedules:
//   raw128   8 × m64n128k32 a K block into one accumulator, no wait until the end: the tensor pipe's rate at n128
//   raw256   4 × m64n256k32 a K block, no wait until the end: its rate at n256
//   wait     the engine's issue and wait a half (4 × m64n128k32, scale-d = 0 first), no promotion
//   chain    the engine: issue, wait, promote into 128 accumulators, two halves a K block (BN = 256)
//   alt      chain, the warpgroups taking turns: one issues a half only after the other's half completed
//            (ptx_sm90.cuh's order_issue_*, the handoff after the wait rather than after the issue)
//   alti     chain, turns handed over after the issue (round 41's FMOE_FP8_ORDERED_ISSUE, every half)
//   chain128 BN = 128: one half a K block (64 accumulators), with 2 or 3 consumer warpgroups
//   ring     chain behind the ring's handshake: a producer warpgroup's thread passes 4 stages round (waits for a
//            stage's release, arrives on its full barrier; no copies), the consumers wait for the stage and release
//            it after its last MMAs, every lane arriving (tma_fp8_engine.cuh's LANE_RELEASE)
//   ringw    ring with one arrival a warp
// (Two temporaries, the next K block's MMAs issued before this one's promotion, are not here: ptxas serialises
// that form's wgmma (C7515) and spills, as round 21 found in the harness.)
// Results are summed into one float a thread so that nothing is dead code; values are not checked (the operands
// are random E4M3 codes without NaN). Build and run: scripts/gpu-engine-test --chain (compiled in CI by
// scripts/nvcc-check).
//
//   fp8_chain_test [ITERS]
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "harness.cuh"
#include "ptx_sm90.cuh"
#include "wgmma_fp8.cuh"

using namespace fmoe;

// d (+)= A·Bᵀ over k32 with 256 B rows (128 accumulators), E4M3 operands from shared memory.
FMOE_DEVICE void wgmma_m64n256k32_e4m3(float *d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 " FMOE_REGS128 ", %128, %129, p, 1, 1;\n}\n"
        : FMOE_ACC128
        : "l"(da), "l"(db), "r"(scale_d));
}

enum Mode { RAW128, RAW256, WAIT, CHAIN, ALT, ALTI, CHAIN128, RING, RINGW };
constexpr int A_BYTES = 128 * 128, B_BYTES = 256 * 128;  // 128 rows of A (two warpgroups' slabs), 256 of B

FMOE_DEVICE void issue4(float *t, u32 a, u32 b) {
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) wgmma_m64n128k32_e4m3(t, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32), ks);
    wgmma_commit();
}
FMOE_DEVICE void promote64(float *acc, const float *t, float s) {
#pragma unroll
    for (int j = 0; j < 64; ++j) acc[j] = fmaf(t[j], s, acc[j]);
}

template <int MODE, int WGS> __global__ void __launch_bounds__(WGS * 128, 1) chain(float *out, int iters) {
    extern __shared__ __align__(1024) char smem[];
    const int tid = threadIdx.x, wg = tid >> 7;
    // Random E4M3 codes without NaN (exponent field below 15), the same in every block.
    for (int i = tid; i < (A_BYTES + B_BYTES) / 4; i += blockDim.x) {
        u32 x = (u32)i * 2654435761u;
        x ^= x >> 13;
        ((u32 *)smem)[i] = x & 0xB7B7B7B7u;
    }
    fence_proxy_async();
    __syncthreads();
    const u32 a = smem_addr(smem) + (wg & 1) * 64 * 128, b = smem_addr(smem) + A_BYTES;
    const float s = 1.0f + 1e-3f * (tid & 7);
    float sum = 0.f;
    if constexpr (MODE == RAW128 || MODE == RAW256) {
        float acc[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = 0.f;
        for (int it = 0; it < iters; ++it) {
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) {
                if (MODE == RAW256) {
                    wgmma_m64n256k32_e4m3(acc, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32), 1);
                } else {
                    wgmma_m64n128k32_e4m3(acc, wgmma_desc(a + ks * 32), wgmma_desc(b + ks * 32), 1);
                    wgmma_m64n128k32_e4m3(acc + 64, wgmma_desc(a + ks * 32), wgmma_desc(b + 16384 + ks * 32), 1);
                }
            }
            wgmma_commit();
            wgmma_wait<1>();
        }
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 128; ++i) sum += acc[i];
    } else if constexpr (MODE == WAIT || MODE == CHAIN || MODE == ALT || MODE == ALTI) {
        float acc[128], tmp[64];
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = 0.f;
        if (MODE == ALT || MODE == ALTI) order_issue_open();
        for (int it = 0; it < iters; ++it) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (MODE == ALT || MODE == ALTI) order_issue_wait();
                issue4(tmp, a, b + h * 16384);
                if (MODE == ALTI) order_issue_done();
                wgmma_wait<0>();
                if (MODE == ALT) order_issue_done();
                if (MODE == WAIT) acc[h] += tmp[0] + tmp[63];
                else promote64(acc + 64 * h, tmp, s);
            }
        }
        if (MODE == ALT || MODE == ALTI) order_issue_close();
#pragma unroll
        for (int i = 0; i < 128; ++i) sum += acc[i];
    } else if constexpr (MODE == RING || MODE == RINGW) {
        __shared__ u64 bars[8];  // full 0 – 3, empty 0 – 3
        if (tid == 0) {
            for (int st = 0; st < 4; ++st) {
                mbar_init(&bars[st], 1);
                mbar_init(&bars[4 + st], MODE == RING ? 256 : 8);
            }
            mbar_init_fence();
        }
        __syncthreads();
        if (wg == 2) {
            regs_dealloc<40>();
            for (int it = 0; tid == 256 && it < iters; ++it) {
                mbar_wait(&bars[4 + it % 4], ((it / 4) & 1) ^ 1);
                mbar_arrive(&bars[it % 4]);
            }
        } else {
            regs_alloc<232>();
            float acc[128], tmp[64];
#pragma unroll
            for (int i = 0; i < 128; ++i) acc[i] = 0.f;
            for (int it = 0; it < iters; ++it) {
                mbar_wait(&bars[it % 4], (it / 4) & 1);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    issue4(tmp, a, b + h * 16384);
                    wgmma_wait<0>();
                    if (h == 1) mbar_arrive_if(&bars[4 + it % 4], MODE == RING || (tid & 31) == 0);
                    promote64(acc + 64 * h, tmp, s);
                }
            }
#pragma unroll
            for (int i = 0; i < 128; ++i) sum += acc[i];
        }
    } else {  // CHAIN128
        float acc[64], tmp[64];
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[i] = 0.f;
        for (int it = 0; it < iters; ++it) {
            issue4(tmp, a, b);
            wgmma_wait<0>();
            promote64(acc, tmp, s);
        }
#pragma unroll
        for (int i = 0; i < 64; ++i) sum += acc[i];
    }
    out[blockIdx.x * blockDim.x + tid] = sum;
}

template <int MODE, int WGS> static void run(const char *name, int sms, int iters, float *out) {
    const int smem = A_BYTES + B_BYTES;
    CK(cudaFuncSetAttribute(chain<MODE, WGS>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const float ms = time_ms([&] { chain<MODE, WGS><<<sms, WGS * 128, smem>>>(out, iters); }, 15);
    CK(cudaGetLastError());
    // 64 rows a warpgroup × N weight rows × 128 K a K block.
    const int n = MODE == CHAIN128 ? 128 : 256, consumers = MODE == RING || MODE == RINGW ? 2 : WGS;
    const double flop = 2.0 * sms * consumers * 64.0 * n * 128.0 * iters;
    const double clk_kb = ms * 1e-3 * 1.98e9 / iters;  // SM cycles a K block at 1.98 GHz (the clock under test)
    printf("%-9s wgs=%d  %8.3f ms  %7.1f TFLOP/s  %6.0f cycles a K block (at 1.98 GHz)\n", name, WGS, ms,
           flop / (ms * 1e-3) / 1e12, clk_kb);
}

int main(int argc, char **argv) {
    const int iters = argc > 1 ? atoi(argv[1]) : 4096;
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    float *out;
    CK(cudaMalloc(&out, (size_t)sms * 512 * sizeof(float)));
    printf("fp8 consumer chain, %d blocks, %d K blocks each\n", sms, iters);
    run<RAW128, 2>("raw128", sms, iters, out);
    run<RAW256, 2>("raw256", sms, iters, out);
    run<WAIT, 2>("wait", sms, iters, out);
    run<CHAIN, 2>("chain", sms, iters, out);
    run<CHAIN, 1>("chain", sms, iters, out);
    run<ALT, 2>("alt", sms, iters, out);
    run<ALTI, 2>("alti", sms, iters, out);
    run<RING, 3>("ring", sms, iters, out);
    run<RINGW, 3>("ringw", sms, iters, out);
    run<CHAIN128, 2>("chain128", sms, iters, out);
    run<CHAIN128, 3>("chain128", sms, iters, out);
    CK(cudaFree(out));
    return 0;
}
