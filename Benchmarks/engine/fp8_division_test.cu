// Exhaustive check, on the GPU, that the epilogues' branch-free quotients give the bits of the IEEE divisions they
// replace (activation.cuh's activation_fast, fp8.cuh's div_by_scale):
//   1. SiLU: for every FP32 argument v (all 2^32 bit patterns) where activation_fast_ok(v) holds, activation_fast(v)
//      has activation(v)'s bits (v / (1 + e^-v), an IEEE division).
//   2. Codes: for every scale s = RN(mx / 448) (s = 1 where mx is 0) with mx a positive finite BF16 value or 0 for
//      which scale_reciprocal_ok(mx) holds, and every BF16 value v its group can hold (|v| ≤ mx, or ±∞ or NaN),
//      E4M3(div_by_scale(v, s, RN(1 / s))) is E4M3(RN(v / s)), the code byte itself. (A finite |v| > mx, which no
//      group holds, can overflow v · RN(1 / s): the first run of this check, without that bound, found it.)
// Prints the counts checked and the first mismatches; exit status 1 on any mismatch. Build and run:
//   nvcc -gencode arch=compute_90a,code=sm_90a -std=c++17 -O3 -I Sources/CKernels/kernels \
//       Benchmarks/engine/fp8_division_test.cu -o /tmp/fp8_division_test && /tmp/fp8_division_test
// (scripts/gpu-engine-test runs it; scripts/nvcc-check compiles it without a GPU).
#include <cuda_runtime.h>

#include <cstdio>

#define FMOE_ACT 3
#include "activation.cuh"
#include "fp8.cuh"

struct Counts {
    unsigned long long checked, mismatched;
    u32 first[8][3];  // argument(s) and both results of the first mismatches
};

__global__ void silu_check(Counts *c, u32 chunk) {
    unsigned long long checked = 0;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < (1u << 28); i += gridDim.x * blockDim.x) {
        const u32 bits = chunk << 28 | i;
        const float v = __uint_as_float(bits);
        if (!fmoe::activation_fast_ok(v)) continue;
        ++checked;
        const u32 want = __float_as_uint(fmoe::activation(v)), got = __float_as_uint(fmoe::activation_fast(v));
        if (want != got) {
            const unsigned long long n = atomicAdd(&c->mismatched, 1ull);
            if (n < 8) {
                c->first[n][0] = bits;
                c->first[n][1] = want;
                c->first[n][2] = got;
            }
        }
    }
    atomicAdd(&c->checked, checked);
}

// One block a scale (mx = blockIdx.x as BF16 bits), its threads over every BF16 v.
__global__ void code_check(Counts *c) {
    const float mx = __uint_as_float(blockIdx.x << 16);
    if (!(mx <= 3.402823466e38f) || !fmoe::scale_reciprocal_ok(mx)) return;  // finite, non-negative mx only
    float s = __fdiv_rn(mx, 448.f);
    if (!(s > 0.f)) s = 1.f;
    const float rs = __frcp_rn(s);
    unsigned long long checked = 0;
    for (u32 b = threadIdx.x; b < 65536; b += blockDim.x) {
        const float v = __uint_as_float(b << 16);
        if (fabsf(v) > mx && fabsf(v) <= 3.402823466e38f) continue;  // not in a group whose largest finite |v| is mx
        const u32 want = fmoe::e4m3x2(__fdiv_rn(v, s), 0.f) >> 8;
        const u32 got = fmoe::e4m3x2(fmoe::div_by_scale(v, s, rs), 0.f) >> 8;
        ++checked;
        if (want != got) {
            const unsigned long long n = atomicAdd(&c->mismatched, 1ull);
            if (n < 8) {
                c->first[n][0] = blockIdx.x << 16 | b;
                c->first[n][1] = want;
                c->first[n][2] = got;
            }
        }
    }
    atomicAdd(&c->checked, checked);
}

static int report(const char *what, const Counts &c) {
    printf("%s: %llu checked, %llu mismatched\n", what, c.checked, c.mismatched);
    for (unsigned long long i = 0; i < c.mismatched && i < 8; ++i)
        printf("  argument 0x%08x: IEEE 0x%08x, fast 0x%08x\n", c.first[i][0], c.first[i][1], c.first[i][2]);
    return c.mismatched != 0 || c.checked == 0;
}

int main() {
    Counts *c;
    if (cudaMallocManaged(&c, sizeof(Counts)) != cudaSuccess) {
        printf("cudaMallocManaged failed\n");
        return 2;
    }
    int failed = 0;
    *c = Counts{};
    for (u32 chunk = 0; chunk < 16; ++chunk) silu_check<<<1024, 256>>>(c, chunk);
    if (cudaDeviceSynchronize() != cudaSuccess) {
        printf("silu_check failed: %s\n", cudaGetErrorString(cudaGetLastError()));
        return 2;
    }
    failed |= report("SiLU, every FP32 argument in activation_fast_ok", *c);
    *c = Counts{};
    code_check<<<0x7f80, 256>>>(c);  // mx bits 0 … 0x7f7f: zero, every positive finite BF16
    if (cudaDeviceSynchronize() != cudaSuccess) {
        printf("code_check failed: %s\n", cudaGetErrorString(cudaGetLastError()));
        return 2;
    }
    failed |= report("E4M3 codes, every (scale_reciprocal_ok scale, BF16 value)", *c);
    printf(failed ? "FAILED\n" : "ok\n");
    return failed;
}
