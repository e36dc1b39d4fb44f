// Standalone check and timing of the sm_90a TMA engine (Sources/CKernels/kernels/tma_engine.cuh) against the
// cp.async wgmma engine (wgmma.cuh) on the fused kernel's expert GEMMs, paper-e64 bf16 shapes by default:
//   GEMM0: H[r] = relu(x[row_token[r]] · W1[e]ᵀ) (bf16 out), rows gathered per expert as in expert_tiles.cuh;
//   GEMM1: Y[r] = H[r] · W2[e]ᵀ (fp32 out), rows contiguous per expert.
// Every variant runs the same tiles (expert, row block, column tile) in the fused kernel's order over a persistent
// grid of one block per SM. Checks: outputs poisoned (NaN) before each run, every element written, the new engine
// bit-identical to the old one (same wgmma sequence and k order), the old one within bf16 tolerance of an FP32
// reference GEMM. Build and run: scripts/gpu-engine-test (nvcc -arch=sm_90a, -lcuda).
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
#include "tma_engine.cuh"
#include "tma_queue.cuh"

using namespace fmoe;


constexpr int STAGES_T = 4;
struct Task { int e, m, n; };

struct Problem {
    int S, H, I, E, R;
    const unsigned short *x, *xg, *w1, *w2;  // bf16 bits
    const int *row_token, *row_start;
    const Task *tasks0, *tasks1;
    int ntasks0, ntasks1;
    const Task *pairs0, *pairs1;  // clusters of 2: tiles 2i and 2i + 1 share B (row block m + 1 may be empty)
    int npairs0, npairs1;
    const Task *apairs1;  // GEMM1 tiles 2i and 2i + 1 share A (column tiles n, n + 1; H / 256 must be even)
    int napairs1;
    int *ticket;        // k_tick's and the expert phase's ticket counter (zeroed before each launch)
    int *done0;         // the expert phase: GEMM0 tiles done per row block (zeroed before each launch)
    const int *rb_start;  // [E + 1] each expert's first row block
    int nrb;              // row blocks
    unsigned short *h;  // [R, I]
    float *y;           // [R, H]
    const unsigned short *h_in;  // GEMM1's input (the old engine's H, so both engines multiply the same bits)
};

__device__ __forceinline__ float relu(float v) { return v > 0.f ? v : 0.f; }
__device__ __forceinline__ u32 pack_bf16(float a, float b) {
    return (u32)f32_to_bf16_bits(a) | ((u32)f32_to_bf16_bits(b) << 16);
}

// ---- the cp.async engine, as expert_tiles.cuh runs it -------------------------------------------------------
// One tile of GEMM `GEMM` with its epilogue, ending with a block barrier (GEMM1 reads p.h_in).
template <int GEMM> __device__ void old_tile(const Problem &p, const Task &tk, char *smem) {
    const int rows = p.row_start[tk.e + 1] - p.row_start[tk.e], row0 = tk.m * BM;
    TileSource src;
    if (GEMM == 0) {
        src.k_bytes = p.H * 2;
#pragma unroll
        for (int i = 0; i < BM / 32; ++i) {
            const int r = loader_row(i);
            src.a_valid[i] = row0 + r < rows;
            const int token = src.a_valid[i] ? p.row_token[p.row_start[tk.e] + row0 + r] : 0;
            src.a[i] = (const char *)(p.x + (size_t)token * p.H);
        }
        point_rows<256>(src.b, src.b_valid, p.w1 + (size_t)tk.e * p.I * p.H, tk.n * 256, p.I, p.H);
    } else {
        src.k_bytes = p.I * 2;
        point_rows<BM>(src.a, src.a_valid, p.h_in + (size_t)p.row_start[tk.e] * p.I, row0, rows, p.I);
        point_rows<256>(src.b, src.b_valid, p.w2 + (size_t)tk.e * p.H * p.I, tk.n * 256, p.H, p.I);
    }
    gemm_tile_wgmma<WgmmaEngine<MMA_BF16>, STAGES_T>(smem, src);
    const float *c = (const float *)smem;
    constexpr int CS = c_stride<256>();
    for (int u = threadIdx.x; u < BM * 256 / 4; u += 256) {
        const int r = u / 64, c4 = (u % 64) * 4;
        if (row0 + r >= rows) continue;
        const size_t grow = (size_t)p.row_start[tk.e] + row0 + r;
        const int col = tk.n * 256 + c4;
        if (GEMM == 0) {
            uint2 v;
            v.x = pack_bf16(relu(c[r * CS + c4]), relu(c[r * CS + c4 + 1]));
            v.y = pack_bf16(relu(c[r * CS + c4 + 2]), relu(c[r * CS + c4 + 3]));
            *(uint2 *)&p.h[grow * p.I + col] = v;
        } else {
            *(float4 *)&p.y[grow * p.H + col] = *(const float4 *)&c[r * CS + c4];
        }
    }
    __syncthreads();
}

template <int GEMM>
__global__ void __launch_bounds__(256, 1) k_old(const Problem p) {
    extern __shared__ __align__(1024) char smem_raw[];
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    const int ntasks = GEMM == 0 ? p.ntasks0 : p.ntasks1;
    for (int ti = blockIdx.x; ti < ntasks; ti += gridDim.x) old_tile<GEMM>(p, GEMM == 0 ? p.tasks0[ti] : p.tasks1[ti], smem);
}

// ---- the TMA engine ----------------------------------------------------------------------------------------------
// GATHER: GEMM0's A gathered by cp.async (else read by TMA from the pre-gathered xg). SYNC: a block barrier after
// every tile (the producer may not run ahead into the next tile during the epilogue), as a drop-in for the fused
// kernel's per-ticket loop would have it.
// CREGS > 0: the consumers raise their register limit to CREGS with setmaxnreg (the producer always lowers its
// own to TMA_PRODUCER_REGS); only safe when the kernel's register count leaves that many free (checked on the host).
template <int GEMM, bool GATHER>
__device__ __forceinline__ TmaTile make_tile(const Problem &p, const Task &tk, const CUtensorMap *map_a,
                                             const CUtensorMap *map_b) {
    const int rows = p.row_start[tk.e + 1] - p.row_start[tk.e], row0 = tk.m * BM;
    const int start = p.row_start[tk.e];
    TmaTile t;
    t.map_b = map_b;
    t.map_a = map_a;
    t.a_row0 = start + row0;
    if (GEMM == 0) {
        t.b_row0 = tk.e * p.I + tk.n * 256;
        t.k_bytes = p.H * 2;
        if (GATHER) {
            t.map_a = nullptr;
            t.a_base = (const char *)p.x;
            t.a_index = p.row_token + start + row0;
            t.a_stride = (size_t)p.H * 2;
            t.a_rows = rows - row0;
        }
    } else {
        t.b_row0 = tk.e * p.H + tk.n * 256;
        t.k_bytes = p.I * 2;
    }
    return t;
}

// The epilogue from the accumulators (TmaEngine's register layout): relu + bf16 for GEMM0, fp32 for GEMM1. Row masks
// are predicates on the stores only: no branch around reads of the accumulators (ptxas would serialise the wgmma).
// WIDE (GEMM0): 16-byte stores after quad_transpose (wgmma.cuh) instead of one 4-byte pair per lane.
template <int GEMM, bool WIDE = false>
__device__ __forceinline__ void store_tile(const Problem &p, const Task &tk, const float *acc) {
    const int rows = p.row_start[tk.e + 1] - p.row_start[tk.e], row0 = tk.m * BM;
    const int start = p.row_start[tk.e];
    const int r0 = wgmma_acc_row(), c0 = wgmma_acc_col();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = r0 + 8 * h;
        const bool ok = row0 + r < rows;
        const size_t grow = (size_t)start + (ok ? row0 + r : 0);
        if constexpr (GEMM == 0 && WIDE) {
#pragma unroll
            for (int jg = 0; jg < 8; ++jg) {
                u32 w[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int j = 4 * jg + i;
                    w[i] = pack_bf16(relu(acc[4 * j + 2 * h]), relu(acc[4 * j + 2 * h + 1]));
                }
                const uint4 v = quad_transpose(w);
                const int col = tk.n * 256 + 8 * (4 * jg + (int)(threadIdx.x & 3));
                if (ok) *(uint4 *)&p.h[grow * p.I + col] = v;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 32; ++j) {
                const int col = tk.n * 256 + 8 * j + c0;
                const float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
                if (GEMM == 0) {
                    const u32 v = pack_bf16(relu(v0), relu(v1));
                    if (ok) *(u32 *)&p.h[grow * p.I + col] = v;
                } else {
                    if (ok) *(float2 *)&p.y[grow * p.H + col] = make_float2(v0, v1);
                }
            }
        }
    }
}

template <int GEMM, bool GATHER, bool SYNC, int CREGS, bool WIDE = false>
__global__ void __launch_bounds__(TMA_THREADS, 1)
    k_new(const Problem p, const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b) {
    extern __shared__ __align__(1024) char smem_raw[];
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    using Eng = TmaEngine<MMA_BF16, STAGES_T>;
    Eng eng;
    eng.init(smem);
    const int ntasks = GEMM == 0 ? p.ntasks0 : p.ntasks1;
    // Each role runs its own loop over the same tiles, so the producer's code after setmaxnreg.dec is only its own.
    if (Eng::is_producer()) {
        regs_dealloc<TMA_PRODUCER_REGS>();
        if (threadIdx.x == TMA_CONSUMER_THREADS) {
            tma_prefetch_map(&map_a);
            tma_prefetch_map(&map_b);
        }
        for (int ti = blockIdx.x; ti < ntasks; ti += gridDim.x) {
            const Task tk = GEMM == 0 ? p.tasks0[ti] : p.tasks1[ti];
            eng.produce(make_tile<GEMM, GATHER>(p, tk, &map_a, &map_b));
            if (SYNC) __syncthreads();
        }
    } else {
        if (CREGS > 0) regs_alloc<(CREGS > 0 ? CREGS : 24)>();
        for (int ti = blockIdx.x; ti < ntasks; ti += gridDim.x) {
            const Task tk = GEMM == 0 ? p.tasks0[ti] : p.tasks1[ti];
            float acc[128];
            eng.consume(make_tile<GEMM, GATHER>(p, tk, &map_a, &map_b), acc);
            store_tile<GEMM, WIDE>(p, tk, acc);
            if (SYNC) __syncthreads();
        }
    }
}

// Tiles handed out by a ticket counter, as the fused kernel's expert phase does (phase_experts.cuh), instead of a
// static stride, through the fused kernel's TicketQueue (tma_queue.cuh): the producer takes ticket i + 1 and fills
// the ring with its slices while the consumers still run tile i and its epilogue. A ticket past the last tile is
// passed on as −1 and ends both roles. The harness's consumers wait for a ticket at most 2 s (then trap).
__device__ __forceinline__ int next_ticket(TicketQueue &tq, u32 &qi) {
    const int t = tq.consume(qi, 2000000000ull, make_int4(-2, 0, 0, 0)).x;
    if (t == -2) __trap();
    return t;
}

template <int GEMM, bool WIDE>
__global__ void __launch_bounds__(TMA_THREADS, 1)
    k_tick(const Problem p, const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b) {
    extern __shared__ __align__(1024) char smem_raw[];
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    __shared__ TicketQueue tq;
    using Eng = TmaEngine<MMA_BF16, STAGES_T>;
    if (threadIdx.x == 0) tq.init();
    u32 qi = 0;
    Eng eng;
    eng.init(smem);  // fences the barrier inits and ends with a block barrier
    const int ntasks = GEMM == 0 ? p.ntasks0 : p.ntasks1;
    const Task *tasks = GEMM == 0 ? p.tasks0 : p.tasks1;
    if (Eng::is_producer()) {
        const int pt = threadIdx.x - TMA_CONSUMER_THREADS;
        if (pt == 0) {
            tma_prefetch_map(&map_a);
            tma_prefetch_map(&map_b);
        }
        for (;;) {
            const int t = tq.produce(qi, pt, [&] {
                const int i = atomicAdd(p.ticket, 1);
                return make_int4(i < ntasks ? i : -1, 0, 0, 0);
            }).x;
            if (t < 0) break;
            eng.produce(make_tile<GEMM, GEMM == 0>(p, tasks[t], &map_a, &map_b));
        }
    } else {
        for (;;) {
            const int t = next_ticket(tq, qi);
            if (t < 0) break;
            float acc[128];
            eng.consume(make_tile<GEMM, GEMM == 0>(p, tasks[t], &map_a, &map_b), acc);
            store_tile<GEMM, WIDE>(p, tasks[t], acc);
        }
    }
    eng.finish();
}

// ---- the expert phase: both GEMMs in one launch ------------------------------------------------------------------
// As the fused kernel's phase 3 runs them (phase_experts.cuh): one ticket counter hands out every GEMM0 tile, then
// every GEMM1 tile; a GEMM0 tile counts itself done for its row block (done0) after its stores, and a GEMM1 tile
// starts once all I / 256 GEMM0 tiles of its row block have (every GEMM0 ticket is taken before any GEMM1 ticket
// and none of them waits, so the wait ends). GEMM1 multiplies this launch's h. A wait past 2 s traps.
__device__ __forceinline__ int ld_acquire_gpu(const int *a) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(a) : "memory");
    return v;
}
__device__ int task_rb(const Problem &p, const Task &tk) { return p.rb_start[tk.e] + tk.m; }
__device__ void wait_row_block(const Problem &p, int rb) {
    const u64 t0 = globaltimer_ns();
    while (ld_acquire_gpu(&p.done0[rb]) < p.I / 256) {
        if (globaltimer_ns() - t0 > 2000000000ull) __trap();
        __nanosleep(64);
    }
}

// The cp.async engine: thread 0 takes each ticket; a GEMM0 tile is counted after old_tile's closing barrier (every
// thread's h stores issued), with a fence (the barrier-then-fence release); a GEMM1 tile's thread 0 acquires the
// count before the block's barrier.
__global__ void __launch_bounds__(256, 1) k_phase_old(const Problem p) {
    extern __shared__ __align__(1024) char smem_raw[];
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    __shared__ int s_t;
    const int total = p.ntasks0 + p.ntasks1;
    for (;;) {
        if (threadIdx.x == 0) s_t = atomicAdd(p.ticket, 1);
        __syncthreads();
        const int t = s_t;  // thread 0 writes it again only after the tile's own barriers
        if (t >= total) break;
        if (t < p.ntasks0) {
            const Task tk = p.tasks0[t];
            old_tile<0>(p, tk, smem);
            if (threadIdx.x == 0) {
                __threadfence();
                atomicAdd(&p.done0[task_rb(p, tk)], 1);
            }
        } else {
            const Task tk = p.tasks1[t - p.ntasks0];
            if (threadIdx.x == 0) wait_row_block(p, task_rb(p, tk));
            __syncthreads();
            old_tile<1>(p, tk, smem);
        }
    }
}

// The TMA engine with k_tick's ticket queue: the producer's thread 0 takes the ticket and, for a GEMM1 tile, waits
// for its row block (then a proxy fence: TMA reads h through the async proxy) before handing the ticket on, so
// the consumers run the previous tile meanwhile. The consumers count a GEMM0 tile after a barrier of their own
// (bar 2, 256 threads; the producer warpgroup has bar 1).
template <bool WIDE>
__global__ void __launch_bounds__(TMA_THREADS, 1)
    k_phase_tma(const Problem p, const __grid_constant__ CUtensorMap map_w1, const __grid_constant__ CUtensorMap map_h,
                const __grid_constant__ CUtensorMap map_w2) {
    extern __shared__ __align__(1024) char smem_raw[];
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    __shared__ TicketQueue tq;
    using Eng = TmaEngine<MMA_BF16, STAGES_T>;
    if (threadIdx.x == 0) tq.init();
    u32 qi = 0;
    Eng eng;
    eng.init(smem);
    const int total = p.ntasks0 + p.ntasks1;
    if (Eng::is_producer()) {
        const int pt = threadIdx.x - TMA_CONSUMER_THREADS;
        if (pt == 0) {
            tma_prefetch_map(&map_w1);
            tma_prefetch_map(&map_h);
            tma_prefetch_map(&map_w2);
        }
        for (;;) {
            const int t = tq.produce(qi, pt, [&] {
                const int i = atomicAdd(p.ticket, 1);
                if (i >= total) return make_int4(-1, 0, 0, 0);
                if (i >= p.ntasks0) {
                    wait_row_block(p, task_rb(p, p.tasks1[i - p.ntasks0]));
                    asm volatile("fence.proxy.async.global;\n" ::: "memory");
                }
                return make_int4(i, 0, 0, 0);
            }).x;
            if (t < 0) break;
            if (t < p.ntasks0) eng.produce(make_tile<0, true>(p, p.tasks0[t], &map_w1, &map_w1));
            else eng.produce(make_tile<1, false>(p, p.tasks1[t - p.ntasks0], &map_h, &map_w2));
        }
    } else {
        for (;;) {
            const int t = next_ticket(tq, qi);
            if (t < 0) break;
            float acc[128];
            if (t < p.ntasks0) {
                const Task tk = p.tasks0[t];
                eng.consume(make_tile<0, true>(p, tk, &map_w1, &map_w1), acc);
                store_tile<0, WIDE>(p, tk, acc);
                asm volatile("fence.proxy.async.global;\n" ::: "memory");  // h, for GEMM1's TMA reads
                asm volatile("bar.sync 2, 256;\n" ::: "memory");
                if (threadIdx.x == 0) {
                    __threadfence();
                    atomicAdd(&p.done0[task_rb(p, tk)], 1);
                }
            } else {
                const Task tk = p.tasks1[t - p.ntasks0];
                eng.consume(make_tile<1, false>(p, tk, &map_h, &map_w2), acc);
                store_tile<1>(p, tk, acc);
            }
        }
    }
    eng.finish();
}

// Clusters of 2 sharing an operand by TMA multicast (TmaEngine CLUSTER = 2): pair i is run by cluster i (strided),
// CTA rank r of the cluster takes tile 2i + r. Launched with a cluster-dimension attribute. SHARE_B: map_b has a box
// of 128 rows, GEMM0 gathers A; SHARE_A (GEMM1 only): map_a has a box of 64 rows. CREL: cluster-scope release on the
// remote empty arrives.
template <int GEMM, int SHARE, bool CREL>
__global__ void __launch_bounds__(TMA_THREADS, 1)
    k_pair(const Problem p, const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b) {
    static_assert(SHARE == SHARE_B || GEMM == 1, "A is shared by TMA only (GEMM1)");
    extern __shared__ __align__(1024) char smem_raw[];
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);
    using Eng = TmaEngine<MMA_BF16, STAGES_T, 2, SHARE, CREL>;
    Eng eng;
    eng.init(smem);
    const int npairs = SHARE == SHARE_A ? p.napairs1 : (GEMM == 0 ? p.npairs0 : p.npairs1);
    const Task *pairs = SHARE == SHARE_A ? p.apairs1 : (GEMM == 0 ? p.pairs0 : p.pairs1);
    const int first = (int)cluster_id_x(), step = (int)cluster_count_x();
    if (Eng::is_producer()) {
        regs_dealloc<TMA_PRODUCER_REGS>();
        for (int pi = first; pi < npairs; pi += step)
            eng.produce(make_tile<GEMM, GEMM == 0>(p, pairs[2 * pi + eng.crank], &map_a, &map_b));
    } else {
        regs_alloc<TMA_CONSUMER_REGS>();
        for (int pi = first; pi < npairs; pi += step) {
            const Task tk = pairs[2 * pi + eng.crank];
            float acc[128];
            eng.consume(make_tile<GEMM, GEMM == 0>(p, tk, &map_a, &map_b), acc);
            store_tile<GEMM>(p, tk, acc);
        }
    }
    eng.finish();
}

// ---- FP32 reference ------------------------------------------------------------------------------------------------
__device__ float bf(unsigned short b) { return __uint_as_float(((u32)b) << 16); }
// out[r, c] = act(Σ_k A[r, k] · W[e(r)][c, k]) in FP32, one thread per output; the block's 32 A rows are staged
// in shared memory, B is read from global memory (each row may belong to another expert).
template <int GEMM>
__global__ void k_ref(const Problem p, float *out, const int *row_expert) {
    __shared__ float sa[32][33];
    const int K = GEMM == 0 ? p.H : p.I, N = GEMM == 0 ? p.I : p.H;
    const int r = blockIdx.y * 32 + threadIdx.y, c = blockIdx.x * 32 + threadIdx.x;
    const unsigned short *arow = GEMM == 0 ? p.x + (size_t)p.row_token[r] * p.H : p.h_in + (size_t)r * p.I;
    const unsigned short *w = (GEMM == 0 ? p.w1 : p.w2) + ((size_t)row_expert[r] * N + c) * K;
    float acc = 0.f;
    for (int k0 = 0; k0 < K; k0 += 32) {
        sa[threadIdx.y][threadIdx.x] = bf(arow[k0 + threadIdx.x]);
        __syncthreads();
        for (int k = 0; k < 32; ++k) acc += sa[threadIdx.y][k] * bf(w[k0 + k]);
        __syncthreads();
    }
    out[(size_t)r * N + c] = GEMM == 0 ? relu(acc) : acc;
}

// ---- host ----------------------------------------------------------------------------------------------------------
static unsigned short to_bf16(float f) {
    u32 u;
    memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);
    return (unsigned short)(u >> 16);
}
static float from_bf16(unsigned short b) {
    u32 u = (u32)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}



// A [rows, k] tensor of bf16s in the engine's stage layout (harness.cuh).
static CUtensorMap map_bf16(const void *base, int k, long long rows, int box_rows) {
    return make_map(base, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, k, rows, box_rows);
}

int main(int argc, char **argv) {
    const int S = argc > 1 ? atoi(argv[1]) : 8192;
    const int E = argc > 2 ? atoi(argv[2]) : 64;
    const int H = argc > 3 ? atoi(argv[3]) : 2048;
    const int I = argc > 4 ? atoi(argv[4]) : 2048;
    const int K = argc > 5 ? atoi(argv[5]) : 2;
    const int reps = 20;
    if (H % 512 || I % 256) { fprintf(stderr, "H must be a multiple of 512 and I of 256\n"); return 2; }
    cuInit(0);
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> uni(-1.f, 1.f);
    // Routing: each token picks K distinct experts uniformly.
    std::vector<std::vector<int>> by_expert(E);
    for (int s = 0; s < S; ++s) {
        std::vector<int> picked;
        while ((int)picked.size() < K) {
            int e = rng() % E;
            bool dup = false;
            for (int q : picked) dup |= q == e;
            if (!dup) picked.push_back(e);
        }
        for (int e : picked) by_expert[e].push_back(s);
    }
    std::vector<int> row_start(E + 1, 0), row_token, row_expert;
    std::vector<Task> t0, t1, q0, q1, a1;
    for (int e = 0; e < E; ++e) {
        row_start[e + 1] = row_start[e] + (int)by_expert[e].size();
        for (int s : by_expert[e]) { row_token.push_back(s); row_expert.push_back(e); }
        const int mt = ((int)by_expert[e].size() + BM - 1) / BM;
        for (int n = 0; n < I / 256; ++n)
            for (int m = 0; m < mt; ++m) t0.push_back({e, m, n});
        for (int n = 0; n < H / 256; ++n)
            for (int m = 0; m < mt; ++m) t1.push_back({e, m, n});
        for (int n = 0; n < I / 256; ++n)
            for (int m = 0; m < mt; m += 2) { q0.push_back({e, m, n}); q0.push_back({e, m + 1, n}); }
        for (int n = 0; n < H / 256; ++n)
            for (int m = 0; m < mt; m += 2) { q1.push_back({e, m, n}); q1.push_back({e, m + 1, n}); }
        for (int n = 0; n + 1 < H / 256; n += 2)
            for (int m = 0; m < mt; ++m) { a1.push_back({e, m, n}); a1.push_back({e, m, n + 1}); }
    }
    const int R = row_start[E];
    std::vector<unsigned short> hx((size_t)S * H), hw1((size_t)E * I * H), hw2((size_t)E * H * I), hxg((size_t)R * H);
    for (auto &v : hx) v = to_bf16(uni(rng));
    for (auto &v : hw1) v = to_bf16(uni(rng) / sqrtf((float)H));
    for (auto &v : hw2) v = to_bf16(uni(rng) / sqrtf((float)I));
    for (int r = 0; r < R; ++r) memcpy(&hxg[(size_t)r * H], &hx[(size_t)row_token[r] * H], H * 2);

    auto up = [](const void *src, size_t bytes) {
        void *d;
        CK(cudaMalloc(&d, bytes));
        CK(cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice));
        return d;
    };
    Problem p{};
    p.S = S; p.H = H; p.I = I; p.E = E; p.R = R;
    p.x = (unsigned short *)up(hx.data(), hx.size() * 2);
    p.xg = (unsigned short *)up(hxg.data(), hxg.size() * 2);
    p.w1 = (unsigned short *)up(hw1.data(), hw1.size() * 2);
    p.w2 = (unsigned short *)up(hw2.data(), hw2.size() * 2);
    p.row_token = (int *)up(row_token.data(), row_token.size() * 4);
    p.row_start = (int *)up(row_start.data(), row_start.size() * 4);
    std::vector<int> rb_start(E + 1, 0);
    for (int e = 0; e < E; ++e) rb_start[e + 1] = rb_start[e] + (row_start[e + 1] - row_start[e] + BM - 1) / BM;
    p.rb_start = (int *)up(rb_start.data(), rb_start.size() * 4);
    p.nrb = rb_start[E];
    CK(cudaMalloc(&p.done0, (size_t)(p.nrb > 0 ? p.nrb : 1) * sizeof(int)));
    int *d_row_expert = (int *)up(row_expert.data(), row_expert.size() * 4);
    p.tasks0 = (Task *)up(t0.data(), t0.size() * sizeof(Task));
    p.tasks1 = (Task *)up(t1.data(), t1.size() * sizeof(Task));
    p.ntasks0 = (int)t0.size();
    p.ntasks1 = (int)t1.size();
    p.pairs0 = (Task *)up(q0.data(), q0.size() * sizeof(Task));
    p.pairs1 = (Task *)up(q1.data(), q1.size() * sizeof(Task));
    p.npairs0 = (int)q0.size() / 2;
    p.npairs1 = (int)q1.size() / 2;
    p.apairs1 = (Task *)up(a1.data(), a1.size() * sizeof(Task));
    p.napairs1 = (int)a1.size() / 2;
    unsigned short *h_old, *h_new;
    float *y_old, *y_new, *ref;
    CK(cudaMalloc(&h_old, (size_t)R * I * 2));
    CK(cudaMalloc(&h_new, (size_t)R * I * 2));
    CK(cudaMalloc(&y_old, (size_t)R * H * 4));
    CK(cudaMalloc(&y_new, (size_t)R * H * 4));
    CK(cudaMalloc(&ref, (size_t)R * (H > I ? H : I) * 4));

    const CUtensorMap m_w1 = map_bf16(p.w1, H, E * I, 256), m_w2 = map_bf16(p.w2, I, E * H, 256);
    const CUtensorMap m_xg = map_bf16(p.xg, H, R, 128), m_h = map_bf16(h_old, I, R, 128);
    const CUtensorMap m_w1h = map_bf16(p.w1, H, E * I, 128), m_w2h = map_bf16(p.w2, I, E * H, 128);
    const CUtensorMap m_h64 = map_bf16(h_old, I, R, 64);

    const int smem_old = STAGES_T * stage_bytes<256>() + 1024;
    const int smem_new = tma_smem_bytes<STAGES_T>() + 1024;
    CK(cudaFuncSetAttribute(k_old<0>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_old));
    CK(cudaFuncSetAttribute(k_old<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_old));
#define SET_NEW(G, GA, SY, CR) CK(cudaFuncSetAttribute(k_new<G, GA, SY, CR>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_new))
    SET_NEW(0, true, false, 0); SET_NEW(0, false, false, 0); SET_NEW(1, false, false, 0);
    SET_NEW(0, true, true, 0); SET_NEW(1, false, true, 0);
    CK(cudaFuncSetAttribute(k_new<0, true, false, 0, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_new));
    CK(cudaFuncSetAttribute(k_new<0, false, false, 0, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_new)); SET_NEW(0, true, false, TMA_CONSUMER_REGS); SET_NEW(1, false, false, TMA_CONSUMER_REGS);
    CK(cudaFuncSetAttribute(k_tick<0, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_new));
    CK(cudaFuncSetAttribute(k_tick<1, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_new));
    CK(cudaMalloc(&p.ticket, sizeof(int)));
    CK(cudaFuncSetAttribute(k_phase_old, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_old));
    CK(cudaFuncSetAttribute(k_phase_tma<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_new));
#define SET_PAIR(G, SH, CR) CK(cudaFuncSetAttribute(k_pair<G, SH, CR>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_new))
    SET_PAIR(0, SHARE_B, true); SET_PAIR(0, SHARE_B, false); SET_PAIR(1, SHARE_B, true); SET_PAIR(1, SHARE_B, false);
    SET_PAIR(1, SHARE_A, false);
    cudaLaunchAttribute cl_attr[1];
    cl_attr[0].id = cudaLaunchAttributeClusterDimension;
    cl_attr[0].val.clusterDim.x = 2;
    cl_attr[0].val.clusterDim.y = 1;
    cl_attr[0].val.clusterDim.z = 1;
    cudaLaunchConfig_t cl_cfg = {};
    cl_cfg.gridDim = dim3(sms);
    cl_cfg.blockDim = dim3(TMA_THREADS);
    cl_cfg.dynamicSmemBytes = smem_new;
    cl_cfg.attrs = cl_attr;
    cl_cfg.numAttrs = 1;
    int clusters = 0;
    CK(cudaOccupancyMaxActiveClusters(&clusters, (void *)k_pair<0, SHARE_B, false>, &cl_cfg));
    cl_cfg.gridDim = dim3(2 * clusters);
    printf("clusters of 2: %d co-resident; B-sharing pairs0=%d (%d empty tiles) pairs1=%d (%d empty); A-sharing "
           "pairs1=%d\n", clusters, p.npairs0, 2 * p.npairs0 - p.ntasks0, p.npairs1, 2 * p.npairs1 - p.ntasks1,
           p.napairs1);
    cudaFuncAttributes fa;
    CK(cudaFuncGetAttributes(&fa, k_new<0, true, false, TMA_CONSUMER_REGS>));
    const int pool = 384 * ((fa.numRegs + 7) / 8 * 8);
    const bool creg_ok = 128 * TMA_PRODUCER_REGS + 256 * TMA_CONSUMER_REGS <= pool;
    printf("k_new registers %d (pool %d): setmaxnreg.inc %d for the consumers %s\n", fa.numRegs, pool, TMA_CONSUMER_REGS,
           creg_ok ? "fits" : "does not fit, skipped");

    const double flops0 = 2.0 * R * I * H, flops1 = 2.0 * R * H * I;
    printf("S=%d E=%d H=%d I=%d k=%d rows=%d tiles0=%d tiles1=%d sms=%d smem old=%d new=%d\n", S, E, H, I, K, R,
           p.ntasks0, p.ntasks1, sms, smem_old, smem_new);

    auto poison = [&](void *ptr, size_t bytes) { CK(cudaMemset(ptr, 0xff, bytes)); };
    int failures = 0;
    // GEMM0 ----------------------------------------------------------------------------------------------------
    Problem po = p;
    po.h = h_old;
    poison(h_old, (size_t)R * I * 2);
    k_old<0><<<sms, 256, smem_old>>>(po);
    CK(cudaDeviceSynchronize());
    std::vector<unsigned short> ho((size_t)R * I), hn((size_t)R * I);
    CK(cudaMemcpy(ho.data(), h_old, ho.size() * 2, cudaMemcpyDeviceToHost));
    {
        Problem pr = p;
        pr.h_in = h_old;
        k_ref<0><<<dim3(I / 32, R / 32), dim3(32, 32)>>>(pr, ref, d_row_expert);
        CK(cudaDeviceSynchronize());
        std::vector<float> rf((size_t)(R / 32) * 32 * I);
        CK(cudaMemcpy(rf.data(), ref, rf.size() * 4, cudaMemcpyDeviceToHost));
        double maxerr = 0, maxref = 0;
        for (size_t i = 0; i < rf.size(); ++i) {
            maxerr = fmax(maxerr, fabs(from_bf16(ho[i]) - rf[i]));
            maxref = fmax(maxref, fabs(rf[i]));
        }
        const bool ok = maxerr <= 0.01 * maxref + 1e-6;
        failures += !ok;
        printf("GEMM0 old vs fp32 reference (first %d rows): max |err| %.3g of max |ref| %.3g: %s\n", (R / 32) * 32,
               maxerr, maxref, ok ? "ok" : "FAIL");
    }
    auto check_same = [&](const char *name, const void *dev, const void *want, size_t bytes) {
        std::vector<unsigned char> got(bytes);
        CK(cudaMemcpy(got.data(), dev, bytes, cudaMemcpyDeviceToHost));
        size_t diff = 0, first = (size_t)-1;
        for (size_t i = 0; i < bytes; ++i)
            if (got[i] != ((const unsigned char *)want)[i]) { ++diff; if (first == (size_t)-1) first = i; }
        failures += diff != 0;
        if (diff) printf("%s: %zu bytes differ from the old engine (first at byte %zu): FAIL\n", name, diff, first);
        else printf("%s: bit-identical to the old engine, all %zu bytes written: ok\n", name, bytes);
    };
    Problem pn = p;
    pn.h = h_new;
    poison(h_new, (size_t)R * I * 2);
    k_new<0, true, false, 0><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1);
    CK(cudaDeviceSynchronize());
    check_same("GEMM0 tma (gather A)", h_new, ho.data(), ho.size() * 2);
    poison(h_new, (size_t)R * I * 2);
    k_new<0, false, false, 0><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1);
    CK(cudaDeviceSynchronize());
    check_same("GEMM0 tma (TMA A, pre-gathered x)", h_new, ho.data(), ho.size() * 2);
    poison(h_new, (size_t)R * I * 2);
    k_new<0, true, true, 0><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1);
    CK(cudaDeviceSynchronize());
    check_same("GEMM0 tma (gather A, sync per tile)", h_new, ho.data(), ho.size() * 2);
    poison(h_new, (size_t)R * I * 2);
    k_new<0, true, false, 0, true><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1);
    CK(cudaDeviceSynchronize());
    check_same("GEMM0 tma (gather A, 16-byte stores)", h_new, ho.data(), ho.size() * 2);
    poison(h_new, (size_t)R * I * 2);
    k_new<0, false, false, 0, true><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1);
    CK(cudaDeviceSynchronize());
    check_same("GEMM0 tma (TMA A, 16-byte stores)", h_new, ho.data(), ho.size() * 2);
    poison(h_new, (size_t)R * I * 2);
    CK(cudaLaunchKernelEx(&cl_cfg, k_pair<0, SHARE_B, true>, pn, m_xg, m_w1h));
    CK(cudaDeviceSynchronize());
    check_same("GEMM0 tma cluster 2 (B multicast, gather A, cluster-scope release)", h_new, ho.data(), ho.size() * 2);
    poison(h_new, (size_t)R * I * 2);
    CK(cudaLaunchKernelEx(&cl_cfg, k_pair<0, SHARE_B, false>, pn, m_xg, m_w1h));
    CK(cudaDeviceSynchronize());
    check_same("GEMM0 tma cluster 2 (B multicast, gather A)", h_new, ho.data(), ho.size() * 2);
    poison(h_new, (size_t)R * I * 2);
    CK(cudaMemset(pn.ticket, 0, sizeof(int)));
    k_tick<0, true><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1);
    CK(cudaDeviceSynchronize());
    check_same("GEMM0 tma (tickets, gather A, 16-byte stores)", h_new, ho.data(), ho.size() * 2);
    if (creg_ok) {
        poison(h_new, (size_t)R * I * 2);
        k_new<0, true, false, TMA_CONSUMER_REGS><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1);
        CK(cudaDeviceSynchronize());
        check_same("GEMM0 tma (gather A, setmaxnreg 56/224)", h_new, ho.data(), ho.size() * 2);
    }

    // GEMM1 (input: the old engine's H) ---------------------------------------------------------------------------
    po.h_in = h_old; po.y = y_old;
    pn.h_in = h_old; pn.y = y_new;
    poison(y_old, (size_t)R * H * 4);
    k_old<1><<<sms, 256, smem_old>>>(po);
    CK(cudaDeviceSynchronize());
    std::vector<float> yo((size_t)R * H);
    CK(cudaMemcpy(yo.data(), y_old, yo.size() * 4, cudaMemcpyDeviceToHost));
    {
        k_ref<1><<<dim3(H / 32, R / 32), dim3(32, 32)>>>(po, ref, d_row_expert);
        CK(cudaDeviceSynchronize());
        std::vector<float> rf((size_t)(R / 32) * 32 * H);
        CK(cudaMemcpy(rf.data(), ref, rf.size() * 4, cudaMemcpyDeviceToHost));
        double maxerr = 0, maxref = 0;
        for (size_t i = 0; i < rf.size(); ++i) {
            maxerr = fmax(maxerr, fabs(yo[i] - rf[i]));
            maxref = fmax(maxref, fabs(rf[i]));
        }
        const bool ok = maxerr <= 1e-3 * maxref + 1e-6;
        failures += !ok;
        printf("GEMM1 old vs fp32 reference: max |err| %.3g of max |ref| %.3g: %s\n", maxerr, maxref,
               ok ? "ok" : "FAIL");
    }
    poison(y_new, (size_t)R * H * 4);
    k_new<1, false, false, 0><<<sms, TMA_THREADS, smem_new>>>(pn, m_h, m_w2);
    CK(cudaDeviceSynchronize());
    check_same("GEMM1 tma", y_new, yo.data(), yo.size() * 4);
    poison(y_new, (size_t)R * H * 4);
    k_new<1, false, true, 0><<<sms, TMA_THREADS, smem_new>>>(pn, m_h, m_w2);
    CK(cudaDeviceSynchronize());
    check_same("GEMM1 tma (sync per tile)", y_new, yo.data(), yo.size() * 4);
    poison(y_new, (size_t)R * H * 4);
    CK(cudaMemset(pn.ticket, 0, sizeof(int)));
    k_tick<1, false><<<sms, TMA_THREADS, smem_new>>>(pn, m_h, m_w2);
    CK(cudaDeviceSynchronize());
    check_same("GEMM1 tma (tickets)", y_new, yo.data(), yo.size() * 4);
    poison(y_new, (size_t)R * H * 4);
    CK(cudaLaunchKernelEx(&cl_cfg, k_pair<1, SHARE_B, true>, pn, m_h, m_w2h));
    CK(cudaDeviceSynchronize());
    check_same("GEMM1 tma cluster 2 (B multicast, cluster-scope release)", y_new, yo.data(), yo.size() * 4);
    poison(y_new, (size_t)R * H * 4);
    CK(cudaLaunchKernelEx(&cl_cfg, k_pair<1, SHARE_B, false>, pn, m_h, m_w2h));
    CK(cudaDeviceSynchronize());
    check_same("GEMM1 tma cluster 2 (B multicast)", y_new, yo.data(), yo.size() * 4);
    poison(y_new, (size_t)R * H * 4);
    CK(cudaLaunchKernelEx(&cl_cfg, k_pair<1, SHARE_A, false>, pn, m_h64, m_w2));
    CK(cudaDeviceSynchronize());
    check_same("GEMM1 tma cluster 2 (A multicast)", y_new, yo.data(), yo.size() * 4);

    // The expert phase (both GEMMs, one launch; h from this launch): the same h and y bits as the GEMMs above ------
    Problem pp = p;
    pp.h = h_new; pp.h_in = h_new; pp.y = y_new;
    const CUtensorMap m_hn = map_bf16(h_new, I, R, 128);
    auto reset_phase = [&] {
        CK(cudaMemsetAsync(pp.ticket, 0, sizeof(int)));
        CK(cudaMemsetAsync(pp.done0, 0, (size_t)(pp.nrb > 0 ? pp.nrb : 1) * sizeof(int)));
    };
    poison(h_new, (size_t)R * I * 2);
    poison(y_new, (size_t)R * H * 4);
    reset_phase();
    k_phase_old<<<sms, 256, smem_old>>>(pp);
    CK(cudaDeviceSynchronize());
    check_same("expert phase, cp.async engine: h", h_new, ho.data(), ho.size() * 2);
    check_same("expert phase, cp.async engine: y", y_new, yo.data(), yo.size() * 4);
    poison(h_new, (size_t)R * I * 2);
    poison(y_new, (size_t)R * H * 4);
    reset_phase();
    k_phase_tma<true><<<sms, TMA_THREADS, smem_new>>>(pp, m_w1, m_hn, m_w2);
    CK(cudaDeviceSynchronize());
    check_same("expert phase, tma (tickets, 16-byte stores): h", h_new, ho.data(), ho.size() * 2);
    check_same("expert phase, tma (tickets, 16-byte stores): y", y_new, yo.data(), yo.size() * 4);

    // Timing ----------------------------------------------------------------------------------------------------
    struct Row { const char *name; float ms; double flops; };
    std::vector<Row> rows;
    rows.push_back({"GEMM0 old cp.async wgmma", time_ms([&] { k_old<0><<<sms, 256, smem_old>>>(po); }, reps), flops0});
    rows.push_back({"GEMM0 tma, gather A", time_ms([&] { k_new<0, true, false, 0><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1); }, reps), flops0});
    rows.push_back({"GEMM0 tma cluster 2, B mc, cl. release", time_ms([&] { CK(cudaLaunchKernelEx(&cl_cfg, k_pair<0, SHARE_B, true>, pn, m_xg, m_w1h)); }, reps), flops0});
    rows.push_back({"GEMM0 tma cluster 2, B multicast", time_ms([&] { CK(cudaLaunchKernelEx(&cl_cfg, k_pair<0, SHARE_B, false>, pn, m_xg, m_w1h)); }, reps), flops0});
    rows.push_back({"GEMM0 tma, gather A, sync/tile", time_ms([&] { k_new<0, true, true, 0><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1); }, reps), flops0});
    rows.push_back({"GEMM0 tma, gather A, 16B stores", time_ms([&] { k_new<0, true, false, 0, true><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1); }, reps), flops0});
    rows.push_back({"GEMM0 tma, TMA A, 16B stores", time_ms([&] { k_new<0, false, false, 0, true><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1); }, reps), flops0});
    rows.push_back({"GEMM0 tma, tickets, 16B stores", time_ms([&] { CK(cudaMemsetAsync(pn.ticket, 0, sizeof(int))); k_tick<0, true><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1); }, reps), flops0});
    rows.push_back({"GEMM0 tma, TMA A (pre-gathered)", time_ms([&] { k_new<0, false, false, 0><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1); }, reps), flops0});
    if (creg_ok) rows.push_back({"GEMM0 tma, gather A, setmaxnreg", time_ms([&] { k_new<0, true, false, TMA_CONSUMER_REGS><<<sms, TMA_THREADS, smem_new>>>(pn, m_xg, m_w1); }, reps), flops0});
    rows.push_back({"GEMM1 old cp.async wgmma", time_ms([&] { k_old<1><<<sms, 256, smem_old>>>(po); }, reps), flops1});
    rows.push_back({"GEMM1 tma", time_ms([&] { k_new<1, false, false, 0><<<sms, TMA_THREADS, smem_new>>>(pn, m_h, m_w2); }, reps), flops1});
    rows.push_back({"GEMM1 tma cluster 2, B mc, cl. release", time_ms([&] { CK(cudaLaunchKernelEx(&cl_cfg, k_pair<1, SHARE_B, true>, pn, m_h, m_w2h)); }, reps), flops1});
    rows.push_back({"GEMM1 tma cluster 2, B multicast", time_ms([&] { CK(cudaLaunchKernelEx(&cl_cfg, k_pair<1, SHARE_B, false>, pn, m_h, m_w2h)); }, reps), flops1});
    rows.push_back({"GEMM1 tma cluster 2, A multicast", time_ms([&] { CK(cudaLaunchKernelEx(&cl_cfg, k_pair<1, SHARE_A, false>, pn, m_h64, m_w2)); }, reps), flops1});
    rows.push_back({"GEMM1 tma, tickets", time_ms([&] { CK(cudaMemsetAsync(pn.ticket, 0, sizeof(int))); k_tick<1, false><<<sms, TMA_THREADS, smem_new>>>(pn, m_h, m_w2); }, reps), flops1});
    rows.push_back({"GEMM1 tma, sync/tile", time_ms([&] { k_new<1, false, true, 0><<<sms, TMA_THREADS, smem_new>>>(pn, m_h, m_w2); }, reps), flops1});
    if (creg_ok) rows.push_back({"GEMM1 tma, setmaxnreg", time_ms([&] { k_new<1, false, false, TMA_CONSUMER_REGS><<<sms, TMA_THREADS, smem_new>>>(pn, m_h, m_w2); }, reps), flops1});
    // (each launch preceded by the two counters' memsets, inside the timing)
    rows.push_back({"phase old (GEMM0 + GEMM1)", time_ms([&] { reset_phase(); k_phase_old<<<sms, 256, smem_old>>>(pp); }, reps), flops0 + flops1});
    rows.push_back({"phase tma (GEMM0 + GEMM1)", time_ms([&] { reset_phase(); k_phase_tma<true><<<sms, TMA_THREADS, smem_new>>>(pp, m_w1, m_hn, m_w2); }, reps), flops0 + flops1});
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    for (auto &r : rows) printf("%-34s %8.4f ms  %6.1f TFLOP/s\n", r.name, r.ms, r.flops / r.ms / 1e9);
    const int checks = 22 + (creg_ok ? 1 : 0);
    printf("%d passed, %d failed\n", checks - failures, failures);
    return failures ? 1 : 0;
}
