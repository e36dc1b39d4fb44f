// Standalone check and timing of the warp-specialised fp8 engine (tma_fp8_engine.cuh) against the fused kernel's
// fp8 tile (gemm_tile_fp8, wgmma_fp8.cuh) on the expert GEMMs of one MoE layer:
//   Y[r] = A[r] · W[e]ᵀ, A and W E4M3 codes with FP32 scales (A per row and 128-wide K block, W per 64-row granule
//   and K block), FP32 out; A gathered by token (GEMM0: x codes, rows picked by row_token) or contiguous per
//   expert (GEMM1: h codes).
// Every variant runs the same tiles in the fused kernel's order (expert, row block, column tile) over a persistent
// grid of one block per SM. Checks: the output poisoned (NaN) before each run; every element written; every
// variant bit-identical to the fused kernel's tile (same MMAs, same promotion); that tile within 1e-2 of a host
// FP64 reference on sampled rows, relative to the sum of the terms' magnitudes: the FP8 MMA aligns each k32 sum to
// 13 fraction bits of its largest term and truncates (docs/fp8.md), up to 32 · 2⁻¹³ ≈ 4e-3 of it per sum, which
// the H200 showed (3.8e-3 at K = 768, 4.8e-4 at K = 7168); a wrong row, column or scale is off by O(1).
// Build and run: scripts/gpu-engine-test (its fp8 part).
//
//   tma_fp8_test S E K N k GATHER     e.g. 4096 256 7168 4096 8 1 (deepseek-v3's GEMM0: K = H, N = 2·I)
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "harness.cuh"
#include "tma_fp8_engine.cuh"

using namespace fmoe;


constexpr int OLD_STAGES = 4;  // the fused kernel's ring (4 stages of 32 KiB in fp8)
constexpr int NEW_STAGES = 6;  // 6 × 32 KiB (BN 128) or 4 × 48 KiB (BN 256) below 227 KiB
struct Task { int e, m, n; };  // n: 128-row column tile (the old engine) or 256-row (BN 256)

struct Problem {
    int S, E, K, N, R, KB, G;       // KB = ⌈K/128⌉ scale blocks, G = N/64 granules an expert
    bool gather;
    const unsigned char *a;         // gather: x codes [S, K]; else h codes [R, K]
    const float *a_scale;           // gather: [S, KB]; else [R, KB]
    const unsigned char *w;         // [E·N, K]
    const float *w_scale;           // [E, G, KB]
    const int *row_token, *row_start;
    const Task *tasks;
    int ntasks;
    float *y;                       // [R, N]
};

// The A row (index into a / a_scale) of expert e's row r.
__device__ __forceinline__ int a_row(const Problem &p, int e, int r) {
    return p.gather ? p.row_token[p.row_start[e] + r] : p.row_start[e] + r;
}

// ---- the fused kernel's fp8 tile (phase_fp8.cuh's expert_tile_fp8 with gemm_tile_fp8) --------------------------------
__global__ void __launch_bounds__(256, 1) k_old(const Problem p) {
    extern __shared__ __align__(1024) char smem_raw[];
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    for (int ti = blockIdx.x; ti < p.ntasks; ti += gridDim.x) {
        const Task tk = p.tasks[ti];
        const int rows = p.row_start[tk.e + 1] - p.row_start[tk.e], row0 = tk.m * BM;
        TileSource src;
#pragma unroll
        for (int i = 0; i < BM / 32; ++i) {
            const int r = loader_row(i);
            src.a_valid[i] = row0 + r < rows;
            src.a[i] = (const char *)(p.a + (size_t)(src.a_valid[i] ? a_row(p, tk.e, row0 + r) : 0) * p.K);
        }
        point_rows<FP8_BN>(src.b, src.b_valid, p.w + (size_t)tk.e * p.N * p.K, tk.n * FP8_BN, p.N, (size_t)p.K);
        src.k_bytes = p.K;
        Fp8Scales sc;
        const int r0 = wgmma_acc_row();
        sc.a0 = row0 + r0 < rows ? p.a_scale + (size_t)a_row(p, tk.e, row0 + r0) * p.KB : nullptr;
        sc.a1 = row0 + r0 + 8 < rows ? p.a_scale + (size_t)a_row(p, tk.e, row0 + r0 + 8) * p.KB : nullptr;
        sc.b = p.w_scale + ((size_t)tk.e * p.G + 2 * tk.n) * p.KB;
        sc.kb_count = p.KB;
        sc.granule1 = 2 * tk.n + 1 < p.G;
        gemm_tile_fp8<OLD_STAGES>(smem, src, sc);
        const float *c = (const float *)smem;
        constexpr int CS = c_stride<FP8_BN>();
        for (int u = threadIdx.x; u < BM * FP8_BN / 4; u += 256) {
            const int r = u / (FP8_BN / 4), c4 = (u % (FP8_BN / 4)) * 4;
            const int col = tk.n * FP8_BN + c4;
            if (row0 + r >= rows || col >= p.N) continue;
            *(float4 *)&p.y[((size_t)p.row_start[tk.e] + row0 + r) * p.N + col] = *(const float4 *)&c[r * CS + c4];
        }
        __syncthreads();
    }
}

// ---- the warp-specialised engine ---------------------------------------------------------------------------------
template <int BN>
__device__ __forceinline__ TmaTile make_tile(const Problem &p, const Task &tk, const CUtensorMap *map_a,
                                             const CUtensorMap *map_w) {
    const int rows = p.row_start[tk.e + 1] - p.row_start[tk.e], row0 = tk.m * BM;
    TmaTile t;
    t.map_b = map_w;
    t.b_row0 = tk.n * BN;
    t.b_image = tk.e;
    t.k_bytes = p.K;
    if (p.gather) {
        t.map_a = nullptr;
        t.a_base = (const char *)p.a;
        t.a_index = p.row_token + p.row_start[tk.e] + row0;
        t.a_stride = (size_t)p.K;
        t.a_rows = rows - row0;
    } else {
        t.map_a = map_a;
        t.a_row0 = p.row_start[tk.e] + row0;
    }
    return t;
}

template <int BN>
__device__ __forceinline__ TmaFp8Scales make_scales(const Problem &p, const Task &tk) {
    const int rows = p.row_start[tk.e + 1] - p.row_start[tk.e], row0 = tk.m * BM;
    const int r0 = wgmma_acc_row();
    TmaFp8Scales sc;
    sc.a0 = row0 + r0 < rows ? p.a_scale + (size_t)a_row(p, tk.e, row0 + r0) * p.KB : nullptr;
    sc.a1 = row0 + r0 + 8 < rows ? p.a_scale + (size_t)a_row(p, tk.e, row0 + r0 + 8) * p.KB : nullptr;
    sc.b = p.w_scale + ((size_t)tk.e * p.G + (BN / 64) * tk.n) * p.KB;
    sc.kb_count = p.KB;
    sc.granules = min(BN / 64, p.G - (BN / 64) * tk.n);
    return sc;
}

// FP32 stores from the accumulators (masks on the stores only: no branch around reads of the accumulators).
template <int BN> __device__ __forceinline__ void store_tile(const Problem &p, const Task &tk, const float *acc) {
    const int rows = p.row_start[tk.e + 1] - p.row_start[tk.e], row0 = tk.m * BM;
    const int r0 = wgmma_acc_row(), c0 = wgmma_acc_col();
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = r0 + 8 * hr;
        const bool ok = row0 + r < rows;
        const size_t grow = (size_t)p.row_start[tk.e] + (ok ? row0 + r : 0);
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            const int col = tk.n * BN + 8 * j + c0;
            if (ok && col < p.N) *(float2 *)&p.y[grow * p.N + col] = make_float2(acc[4 * j + 2 * hr], acc[4 * j + 2 * hr + 1]);
        }
    }
}

template <int BN, int STAGES>
__global__ void __launch_bounds__(TMA_THREADS, 1)
    k_new(const Problem p, const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w) {
    extern __shared__ __align__(1024) char smem_raw[];
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    using Eng = TmaFp8Engine<STAGES, BN>;
    Eng eng;
    eng.init(smem);
    if (TmaEngine<MMA_BF16, 4>::is_producer()) {
        regs_dealloc<TMA_PRODUCER_REGS>();
        if (threadIdx.x == TMA_CONSUMER_THREADS) {
            tma_prefetch_map(&map_a);
            tma_prefetch_map(&map_w);
        }
        for (int ti = blockIdx.x; ti < p.ntasks; ti += gridDim.x) eng.produce(make_tile<BN>(p, p.tasks[ti], &map_a, &map_w));
    } else {
        regs_alloc<TMA_CONSUMER_REGS>();
        for (int ti = blockIdx.x; ti < p.ntasks; ti += gridDim.x) {
            const Task tk = p.tasks[ti];
            float acc[Eng::ACC];
            eng.consume(make_tile<BN>(p, tk, &map_a, &map_w), make_scales<BN>(p, tk), acc);
            store_tile<BN>(p, tk, acc);
        }
    }
}

// ---- data ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ u32 hash32(u64 i, u32 seed) {
    u64 x = i * 0x9E3779B97F4A7C15ull + seed;
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ull; x ^= x >> 29;
    return (u32)x;
}
// E4M3 codes of magnitude up to 2^3 (exponent field ≤ 10: no NaN, no saturation in sums), random sign.
__global__ void k_fill_codes(unsigned char *c, size_t n, u32 seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const u32 h = hash32(i, seed);
        c[i] = (unsigned char)(((h >> 8) & 0x80u) | ((h % 11u) << 3) | (h >> 16 & 7u));
    }
}
__global__ void k_fill_scales(float *s, size_t n, u32 seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s[i] = ldexpf(1.f + (hash32(i, seed) & 0xffff) / 65536.f, (int)(hash32(i, seed + 1) % 5) - 12);
}
static double e4m3(unsigned char c) {
    const int s = c >> 7, e = (c >> 3) & 15, m = c & 7;
    const double v = e == 0 ? ldexp(m / 8.0, -6) : ldexp(1.0 + m / 8.0, e - 7);
    return s ? -v : v;
}



static std::vector<Task> tasks_for(const std::vector<int> &row_start, int E, int N, int bn) {
    std::vector<Task> t;
    for (int e = 0; e < E; ++e)
        for (int m = 0; m * BM < row_start[e + 1] - row_start[e]; ++m)
            for (int n = 0; n * bn < N; ++n) t.push_back({e, m, n});
    return t;
}

// A [rows, k] tensor of E4M3 codes in the engine's stage layout (harness.cuh).
static CUtensorMap map_e4m3(const void *base, int k, long long rows, int box_rows) {
    return make_map(base, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, k, rows, box_rows);
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: tma_fp8_test S E K N k GATHER\n");
        return 2;
    }
    Problem p{};
    p.S = atoi(argv[1]), p.E = atoi(argv[2]), p.K = atoi(argv[3]), p.N = atoi(argv[4]);
    const int topk = atoi(argv[5]);
    p.gather = atoi(argv[6]) != 0;
    if (p.K % 128 || p.N % 128 || topk > p.E) {
        fprintf(stderr, "K and N must be multiples of 128, k at most E\n");
        return 2;
    }
    p.KB = p.K / 128, p.G = p.N / 64, p.R = p.S * topk;
    // Routing: each token to k distinct random experts; rows grouped by expert in token order.
    std::mt19937 rng(20261203);
    std::vector<std::vector<int>> by_e(p.E);
    std::vector<int> perm(p.E);
    for (int e = 0; e < p.E; ++e) perm[e] = e;
    for (int t = 0; t < p.S; ++t) {
        for (int j = 0; j < topk; ++j) std::swap(perm[j], perm[j + rng() % (p.E - j)]);
        for (int j = 0; j < topk; ++j) by_e[perm[j]].push_back(t);
    }
    std::vector<int> row_start(p.E + 1, 0), row_token;
    for (int e = 0; e < p.E; ++e) {
        row_start[e + 1] = row_start[e] + (int)by_e[e].size();
        row_token.insert(row_token.end(), by_e[e].begin(), by_e[e].end());
    }
    const size_t a_rows = p.gather ? p.S : p.R;
    unsigned char *d_a, *d_w;
    float *d_as, *d_ws, *d_y;
    int *d_rt, *d_rs;
    CK(cudaMalloc(&d_a, a_rows * p.K));
    CK(cudaMalloc(&d_as, a_rows * p.KB * 4));
    CK(cudaMalloc(&d_w, (size_t)p.E * p.N * p.K));
    CK(cudaMalloc(&d_ws, (size_t)p.E * p.G * p.KB * 4));
    CK(cudaMalloc(&d_y, (size_t)p.R * p.N * 4));
    CK(cudaMalloc(&d_rt, row_token.size() * 4));
    CK(cudaMalloc(&d_rs, row_start.size() * 4));
    k_fill_codes<<<1024, 256>>>(d_a, a_rows * p.K, 1);
    k_fill_codes<<<4096, 256>>>(d_w, (size_t)p.E * p.N * p.K, 2);
    k_fill_scales<<<256, 256>>>(d_as, a_rows * p.KB, 3);
    k_fill_scales<<<256, 256>>>(d_ws, (size_t)p.E * p.G * p.KB, 5);
    CK(cudaMemcpy(d_rt, row_token.data(), row_token.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_rs, row_start.data(), row_start.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());
    p.a = d_a, p.a_scale = d_as, p.w = d_w, p.w_scale = d_ws, p.y = d_y, p.row_token = d_rt, p.row_start = d_rs;

    const std::vector<Task> t128 = tasks_for(row_start, p.E, p.N, 128), t256 = tasks_for(row_start, p.E, p.N, 256);
    Task *d_t128, *d_t256;
    CK(cudaMalloc(&d_t128, t128.size() * sizeof(Task)));
    CK(cudaMalloc(&d_t256, t256.size() * sizeof(Task)));
    CK(cudaMemcpy(d_t128, t128.data(), t128.size() * sizeof(Task), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_t256, t256.data(), t256.size() * sizeof(Task), cudaMemcpyHostToDevice));
    Problem p128 = p, p256 = p;
    p128.tasks = d_t128, p128.ntasks = (int)t128.size();
    p256.tasks = d_t256, p256.ntasks = (int)t256.size();

    const CUtensorMap map_a = map_e4m3(d_a, p.K, (long long)a_rows, 128);
    const CUtensorMap map_w128 = make_map_3d(d_w, p.K, p.N, p.E, (long long)p.N * p.K, 128);
    const CUtensorMap map_w256 = make_map_3d(d_w, p.K, p.N, p.E, (long long)p.N * p.K, 256);

    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int smem_old = OLD_STAGES * (BM + FP8_BN) * ROW_BYTES + 1024;
    const int smem_n128 = TmaFp8Engine<NEW_STAGES, 128>::SMEM_BYTES + 1024;
    const int smem_n256 = TmaFp8Engine<4, 256>::SMEM_BYTES + 1024;
    CK(cudaFuncSetAttribute(k_old, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_old));
    CK(cudaFuncSetAttribute(k_new<128, NEW_STAGES>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_n128));
    CK(cudaFuncSetAttribute(k_new<256, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_n256));

    const size_t ny = (size_t)p.R * p.N;
    auto poison = [&] { CK(cudaMemset(d_y, 0xff, ny * 4)); };
    auto fetch = [&] {
        CK(cudaDeviceSynchronize());
        std::vector<float> h(ny);
        CK(cudaMemcpy(h.data(), d_y, ny * 4, cudaMemcpyDeviceToHost));
        return h;
    };
    int passed = 0, failed = 0;
    auto check = [&](const char *what, bool ok, const char *detail) {
        printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", what, detail[0] ? ": " : "", detail);
        ok ? ++passed : ++failed;
    };
    auto unwritten = [&](const std::vector<float> &h) {
        size_t n = 0;
        for (float v : h) n += std::isnan(v);
        return n;
    };
    char buf[256];
    printf("S=%d E=%d K=%d N=%d k=%d %s: %zu tiles of 128 (%zu of 256), %d SMs\n", p.S, p.E, p.K, p.N, topk,
           p.gather ? "gathered A" : "contiguous A", t128.size(), t256.size(), sms);

    poison();
    k_old<<<sms, 256, smem_old>>>(p128);
    CK(cudaGetLastError());
    const std::vector<float> ref = fetch();
    snprintf(buf, sizeof buf, "%zu unwritten", unwritten(ref));
    check("old engine writes every element", unwritten(ref) == 0, buf);
    {   // sampled rows against FP64 on the host
        std::vector<unsigned char> ha(a_rows * p.K);
        std::vector<float> has(a_rows * p.KB), hws((size_t)p.E * p.G * p.KB);
        CK(cudaMemcpy(ha.data(), d_a, ha.size(), cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(has.data(), d_as, has.size() * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(hws.data(), d_ws, hws.size() * 4, cudaMemcpyDeviceToHost));
        double worst = 0;
        std::vector<unsigned char> hw((size_t)p.N * p.K);
        for (int q = 0; q < 6; ++q) {
            const int r = (int)((size_t)q * 7919 * 13 % p.R);
            int e = 0;
            while (row_start[e + 1] <= r) ++e;
            const int ar = p.gather ? row_token[r] : r;
            CK(cudaMemcpy(hw.data(), d_w + (size_t)e * p.N * p.K, hw.size(), cudaMemcpyDeviceToHost));
            for (int c = 0; c < p.N; ++c) {
                double s = 0, mag = 0;
                for (int kb = 0; kb < p.KB; ++kb) {
                    double part = 0;
                    for (int k = kb * 128; k < kb * 128 + 128; ++k) part += e4m3(ha[(size_t)ar * p.K + k]) * e4m3(hw[(size_t)c * p.K + k]);
                    const double sc = (double)has[(size_t)ar * p.KB + kb] * hws[((size_t)e * p.G + c / 64) * p.KB + kb];
                    s += part * sc;
                    mag += fabs(part * sc);
                }
                worst = std::max(worst, fabs(ref[(size_t)r * p.N + c] - s) / (mag + 1e-30));
            }
        }
        snprintf(buf, sizeof buf, "worst |old − fp64| / Σ|terms| %.2e on 6 rows", worst);
        check("old engine against FP64", worst < 1e-2, buf);
    }
    struct Variant { const char *name; Problem *pp; void (*launch)(const Problem &, const CUtensorMap &, const CUtensorMap &, int, int); const CUtensorMap *mw; int smem; };
    const Variant vs[] = {
        {"tma fp8, 128 rows", &p128, [](const Problem &q, const CUtensorMap &a, const CUtensorMap &w, int g, int s) { k_new<128, NEW_STAGES><<<g, TMA_THREADS, s>>>(q, a, w); }, &map_w128, smem_n128},
        {"tma fp8, 256 rows", &p256, [](const Problem &q, const CUtensorMap &a, const CUtensorMap &w, int g, int s) { k_new<256, 4><<<g, TMA_THREADS, s>>>(q, a, w); }, &map_w256, smem_n256},
    };
    for (const Variant &v : vs) {
        poison();
        v.launch(*v.pp, map_a, *v.mw, sms, v.smem);
        CK(cudaGetLastError());
        const std::vector<float> h = fetch();
        size_t diff = 0;
        for (size_t i = 0; i < ny; ++i) diff += memcmp(&h[i], &ref[i], 4) != 0;
        snprintf(buf, sizeof buf, "%zu of %zu elements differ", diff, ny);
        check(v.name, diff == 0, buf);
    }
    const double flops = 2.0 * p.R * (double)p.N * p.K;
    const int reps = 20;
    printf("%-40s %10s %10s\n", "engine", "ms", "TFLOP/s");
    const float t_old = time_ms([&] { k_old<<<sms, 256, smem_old>>>(p128); }, reps);
    printf("%-40s %10.4f %10.1f\n", "old fp8 tile (gemm_tile_fp8)", t_old, flops / t_old / 1e9);
    for (const Variant &v : vs) {
        const float t = time_ms([&] { v.launch(*v.pp, map_a, *v.mw, sms, v.smem); }, reps);
        printf("%-40s %10.4f %10.1f\n", v.name, t, flops / t / 1e9);
    }
    CK(cudaGetLastError());
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
