// How fast a block streams a decode GEMV's weights (issue 11's decode path): the fp8 GEMV of gemv.cuh, alone.
//
// At qwen3-30b-a3b S = 1 fp8 a GEMM0 GEMV task (128 weight rows × 2,048 bytes, 8 warps, each a 16-row slab over all
// of K) takes 12.7 µs in round 36's H200 trace (Benchmarks/RESULTS.md), about 20 GB/s an SM, with 96 blocks
// streaming at once. Rounds 11 and 12 found the bf16 decode tiles as slow from L2 as from HBM, and bf16's GEMV no
// faster with twice the loads in flight. This harness times the GEMV's weight stream in isolation, in four forms, each with gemv_slab's promotion
// of every K block (acc += tmp · a scale · w scale):
//   regs   gemv_slab as it is: a lane loads 4 K blocks of its rows g and g + 8 (16-byte ld.global.nc), then
//          multiplies them (m16n8k32 e4m3 mma.sync, which ptxas runs on Hopper as F16 MMAs after unpacking every
//          operand pair, F2FP)
//   pipe   batches of 2 K blocks, the next batch's loads issued before this batch's MMAs
//   bulk   lane 0 of each warp copies its 16 rows' next chunk (CH bytes a row) into a ring of NS stages in shared
//          memory with cp.async.bulk (the copy engine, one instruction a row, completing on the stage's mbarrier),
//          and the lanes read their fragments from shared memory: up to NS · 16 · CH bytes in flight a warp
//          without holding registers
//   wgmma  regs' loads, the MMAs as E4M3 warpgroup MMAs (m64n8k32, the weights from registers, the 8 A rows
//          staged once in shared memory in the order of the registers' K bytes), waited for each K block
// Each launch: B blocks (96: the GEMM0 tasks of qwen3-30b-a3b S = 1; 132: every SM), each streaming T tiles of 256 KiB
// at distinct addresses. `hbm`: the launches rotate over 1.5 GiB, so every byte comes from HBM; `l2`: every launch
// reads the same B tiles (24 – 33 MiB, resident in the 50 MiB L2). Median of 30 launches (2 warm-ups), microseconds
// and GB/s an SM, and each form's sums against the regs form's: "same" bits for pipe and bulk (the same MMAs and
// promotions in the same K order), the largest relative difference for wgmma (the tensor core's FP8 accumulation).
// Round 47 (H100, Benchmarks/RESULTS.md): about 8 µs a tile once running (T = 4), from HBM as from L2; pipe the
// same, bulk 9 – 98 % slower, wgmma 22 – 80 % slower.
//
// Build and run: scripts/gpu-engine-test --stream (sm_90a; compiled in CI by scripts/nvcc-check).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <algorithm>
#include <vector>

#include "harness.cuh"
#include "ptx_sm90.cuh"
#include "mma_fp8.cuh"
#include "wgmma_fp8.cuh"

using namespace fmoe;

constexpr int ROWS = 128, KBYTES = 2048, TILE = ROWS * KBYTES, KBLOCKS = KBYTES / 128;
constexpr int WARPS = 8, THREADS_ = WARPS * 32;
enum Mode { REGS, PIPE, BULK, WG };

// gemv.cuh's ld_weights16 without the evict-first hint, and (below) its gemv_mma2: written out here because gemv.cuh
// needs the fused kernel's specialisation (moe_params.cuh's -D shape).
FMOE_DEVICE uint4 ldnc16(const char *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
// gemv.cuh's gemv_mma2: d += W(16 × 64 B) · A(64 B × 8) from the lane's 16 bytes of rows g, g + 8 and of A's row g.
FMOE_DEVICE void mma2(float d[4], const uint4 &w0, const uint4 &w1, const uint4 &a) {
    const u32 fa0[4] = {w0.x, w1.x, w0.y, w1.y}, fb0[2] = {a.x, a.y};
    const u32 fa1[4] = {w0.z, w1.z, w0.w, w1.w}, fb1[2] = {a.z, a.w};
    Fp8MmaEngine::mma_e4m3(d, fa0, fb0);
    Fp8MmaEngine::mma_e4m3(d, fa1, fb1);
}
// gemv_slab's promotion of K block blk: acc += tmp · (a scale · w scale).
FMOE_DEVICE void promote(float acc[4], const float tmp[4], const float *sa, const float *sw, int blk) {
    const float s = sa[blk] * sw[blk];
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[c] = fmaf(tmp[c], s, acc[c]);
}

// d (+)= W(64 rows × k32, from the warpgroup's registers: warp w holds rows 16w … 16w + 15 as mma.sync's m16n8k32
// A fragment) · B(k32 × 8 tokens, shared memory, 128-byte swizzled K-major rows); scale_d = 0 overwrites d.
FMOE_DEVICE void wgmma_m64n8k32_e4m3_ra(float d[4], const u32 a[4], u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));
}
// The K byte of a 64-byte chunk that a lane's 16-byte load puts at the MMA's logical k (0 … 31) of k32 step s (0, 1)
// of the chunk: gemv_mma2's registers {w.x, w.y} (step 0) and {w.z, w.w} (step 1) hold bytes 16t … 16t + 7 and
// 16t + 8 … 16t + 15, which the MMA reads as k 4t … 4t + 3 and 16 + 4t … 16 + 4t + 3.
FMOE_DEVICE int chunk_byte(int s, int k) { return 16 * ((k % 16) / 4) + 8 * s + 4 * (k / 16) + k % 4; }

// One K block from a lane's registers (its two 64-byte chunks of rows g, g + 8 and of A's row g): gemv_slab's MMAs
// into a temporary, then the promotion.
FMOE_DEVICE void k_block(float acc[4], const uint4 *q0, const uint4 *q1, const uint4 *qa, const float *sa,
                         const float *sw, int blk) {
    float tmp[4] = {0.f, 0.f, 0.f, 0.f};
    mma2(tmp, q0[0], q1[0], qa[0]);
    mma2(tmp, q0[1], q1[1], qa[1]);
    promote(acc, tmp, sa, sw, blk);
}

template <int MODE, int CH, int NS>
__global__ void __launch_bounds__(THREADS_, 1)
    stream(const char *w, const char *a, const float *sa, const float *sw, float *out, int tiles, long long first) {
    static_assert(MODE != BULK || NS > 0, "a ring of NS stages");
    extern __shared__ __align__(1024) char smem_raw[];
    char *smem = (char *)(((size_t)smem_raw + 1023) & ~(size_t)1023);  // the 128-byte swizzle's 1 KiB atoms
    __shared__ u64 bars[WARPS][NS > 0 ? NS : 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const char *arow = a + g * KBYTES;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    constexpr int PITCH = CH + 64;  // rows g and g + 1 of a quarter-warp's reads 16 banks apart
    char *ring = smem + warp * NS * 16 * PITCH;
    if (MODE == BULK && lane == 0) {
        for (int s = 0; s < NS; ++s) mbar_init(&bars[warp][s], 1);
        mbar_init_fence();
    }
    __syncwarp();
    if (MODE == WG) {
        // B: the 8 token rows, K block b at smem + 1024 b (8 rows × 128 bytes, 128-byte swizzle), each K block's
        // byte at logical position 32 ks + k the activation byte chunk_byte(ks % 2, k) of its 64-byte chunk ks / 2.
        for (int i = threadIdx.x; i < 8 * KBYTES; i += THREADS_) {
            const int n = i / KBYTES, L = i % KBYTES, b = L / 128, l = L % 128, ks = l / 32, k = l % 32;
            const int src = b * 128 + 64 * (ks / 2) + chunk_byte(ks % 2, k);
            smem[b * 1024 + n * 128 + (((l / 16) ^ n) * 16) + l % 16] = a[n * KBYTES + src];
        }
        fence_proxy_async();  // the generic writes, before the MMAs read them through the async proxy
        __syncthreads();
    }
    u32 use = 0;  // BULK: chunks this warp has consumed (its ring's position and phase)
    for (int i = 0; i < tiles; ++i) {
        const char *tile = w + (first + blockIdx.x + (long long)i * gridDim.x) * TILE;
        const char *slab = tile + (size_t)(16 * warp) * KBYTES;
        const char *w0 = slab + (size_t)g * KBYTES, *w1 = w0 + 8 * KBYTES;
        if constexpr (MODE == REGS) {
            constexpr int U = 4;
            for (int kb = 0; kb < KBYTES; kb += 128 * U) {
                uint4 q0[2 * U], q1[2 * U], qa[2 * U];
#pragma unroll
                for (int u = 0; u < 2 * U; ++u) {
                    const int at = kb + 64 * u + 16 * t;
                    q0[u] = ldnc16(w0 + at);
                    q1[u] = ldnc16(w1 + at);
                    qa[u] = *(const uint4 *)(arow + at);
                }
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    k_block(acc, q0 + 2 * u, q1 + 2 * u, qa + 2 * u, sa, sw, kb / 128 + u);
                }
            }
        } else if constexpr (MODE == PIPE) {
            constexpr int PB = 2, PC = 2 * PB;
            auto load = [&](int kb, uint4 *q0, uint4 *q1, uint4 *qa) {
#pragma unroll
                for (int u = 0; u < PC; ++u) {
                    const int at = kb + 64 * u + 16 * t;
                    const bool in = at < KBYTES;
                    q0[u] = in ? ldnc16(w0 + at) : make_uint4(0, 0, 0, 0);
                    q1[u] = in ? ldnc16(w1 + at) : make_uint4(0, 0, 0, 0);
                    qa[u] = in ? *(const uint4 *)(arow + at) : make_uint4(0, 0, 0, 0);
                }
            };
            uint4 q0[PC], q1[PC], qa[PC];
            load(0, q0, q1, qa);
            for (int kb = 0; kb < KBYTES; kb += 128 * PB) {
                uint4 n0[PC], n1[PC], na[PC];
                load(kb + 128 * PB, n0, n1, na);
#pragma unroll
                for (int u = 0; u < PB; ++u) {
                    k_block(acc, q0 + 2 * u, q1 + 2 * u, qa + 2 * u, sa, sw, kb / 128 + u);
                }
#pragma unroll
                for (int u = 0; u < PC; ++u) { q0[u] = n0[u]; q1[u] = n1[u]; qa[u] = na[u]; }
            }
        } else if constexpr (MODE == WG) {
            // Warpgroup wg: rows 64 wg … 64 wg + 63 (warp w of it: its 16-row slab, loaded as regs loads it).
            constexpr int U = 4;
            const u32 b0 = smem_addr(smem);
            for (int kb = 0; kb < KBYTES; kb += 128 * U) {
                uint4 q0[2 * U], q1[2 * U];
#pragma unroll
                for (int u = 0; u < 2 * U; ++u) {
                    const int at = kb + 64 * u + 16 * t;
                    q0[u] = ldnc16(w0 + at);
                    q1[u] = ldnc16(w1 + at);
                }
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int blk = kb / 128 + u;
                    float tmp[4] = {0.f, 0.f, 0.f, 0.f};
                    wgmma_fence();
#pragma unroll
                    for (int ks = 0; ks < 4; ++ks) {
                        const uint4 &x0 = q0[2 * u + ks / 2], &x1 = q1[2 * u + ks / 2];
                        const u32 fa[4] = {ks % 2 ? x0.z : x0.x, ks % 2 ? x1.z : x1.x, ks % 2 ? x0.w : x0.y,
                                           ks % 2 ? x1.w : x1.y};
                        wgmma_m64n8k32_e4m3_ra(tmp, fa, wgmma_desc(b0 + blk * 1024 + ks * 32), ks);
                    }
                    wgmma_commit();
                    wgmma_wait<0>();
                    promote(acc, tmp, sa, sw, blk);
                }
            }
        } else {
            constexpr int CHUNKS = KBYTES / CH;
            static_assert(KBYTES % CH == 0 && CH % 128 == 0, "whole K blocks a chunk");
            // Lane 0 fills stage s with chunk c of the slab's 16 rows.
            auto fill = [&](int c, int s) {
                mbar_arrive_expect_tx(&bars[warp][s], 16 * CH);
                for (int r = 0; r < 16; ++r) {
                    asm volatile(
                        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
                            "r"(smem_addr(ring + (s * 16 + r) * PITCH)),
                        "l"(slab + (size_t)r * KBYTES + c * CH), "r"(CH), "r"(smem_addr(&bars[warp][s]))
                        : "memory");
                }
            };
            if (lane == 0)
                for (int c = 0; c < NS && c < CHUNKS; ++c) fill(c, (use + c) % NS);
            for (int c = 0; c < CHUNKS; ++c, ++use) {
                const int s = use % NS;
                mbar_wait(&bars[warp][s], (use / NS) & 1);
                const char *st = ring + s * 16 * PITCH;
#pragma unroll
                for (int b = 0; b < CH / 128; ++b) {
                    float tmp[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int off = b * 128 + 64 * h + 16 * t;
                        const uint4 x0 = *(const uint4 *)(st + g * PITCH + off);
                        const uint4 x1 = *(const uint4 *)(st + (g + 8) * PITCH + off);
                        const uint4 xa = *(const uint4 *)(arow + c * CH + off);
                        mma2(tmp, x0, x1, xa);
                    }
                    promote(acc, tmp, sa, sw, c * (CH / 128) + b);
                }
                __syncwarp();  // every lane has read the stage before lane 0 refills it
                if (lane == 0 && c + NS < CHUNKS) fill(c + NS, s);
            }
        }
    }
    float *o = out + ((size_t)blockIdx.x * THREADS_ + threadIdx.x) * 4;
#pragma unroll
    for (int c = 0; c < 4; ++c) o[c] = acc[c];
}

struct Form {
    const char *name;
    void (*kernel)(const char *, const char *, const float *, const float *, float *, int, long long);
    int smem;
};

int main() {
    const long long pool_tiles = 6 * 1024;  // 1.5 GiB of weight tiles
    char *w, *a;
    float *sa, *sw, *out;
    CK(cudaMalloc(&w, pool_tiles * TILE));
    CK(cudaMalloc(&a, 8 * KBYTES));
    CK(cudaMalloc(&sa, KBLOCKS * 4));
    CK(cudaMalloc(&sw, KBLOCKS * 4));
    CK(cudaMalloc(&out, 132 * THREADS_ * 4 * sizeof(float)));
    {
        // E4M3 codes without NaN (0x7f, 0xff): random bytes with bit 0–6 never all set.
        std::vector<unsigned char> h(8 * KBYTES);
        unsigned s = 12345;
        for (auto &b : h) { s = s * 1103515245u + 12345u; b = (unsigned char)((s >> 16) & 0x77); }
        CK(cudaMemcpy(a, h.data(), h.size(), cudaMemcpyHostToDevice));
        std::vector<unsigned char> hw(64 << 20);
        for (auto &b : hw) { s = s * 1103515245u + 12345u; b = (unsigned char)((s >> 16) & 0x77); }
        for (long long off = 0; off < pool_tiles * TILE; off += (long long)hw.size())
            CK(cudaMemcpy(w + off, hw.data(), hw.size(), cudaMemcpyHostToDevice));
        std::vector<float> hs(KBLOCKS);
        for (int i = 0; i < KBLOCKS; ++i) hs[i] = 1.f / (1 + i);
        CK(cudaMemcpy(sa, hs.data(), KBLOCKS * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(sw, hs.data(), KBLOCKS * 4, cudaMemcpyHostToDevice));
    }
    const Form forms[] = {
        {"regs", stream<REGS, 128, 0>, 0},
        {"pipe", stream<PIPE, 128, 0>, 0},
        {"bulk256x4", stream<BULK, 256, 4>, WARPS * 4 * 16 * (256 + 64) + 1024},
        {"bulk256x5", stream<BULK, 256, 5>, WARPS * 5 * 16 * (256 + 64) + 1024},
        {"bulk512x3", stream<BULK, 512, 3>, WARPS * 3 * 16 * (512 + 64) + 1024},
        {"bulk128x8", stream<BULK, 128, 8>, WARPS * 8 * 16 * (128 + 64) + 1024},
        {"wgmma", stream<WG, 128, 0>, KBLOCKS * 1024 + 1024},
    };
    for (const Form &f : forms)
        if (f.smem > 0) CK(cudaFuncSetAttribute(f.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, f.smem));
    std::vector<float> ref(132 * THREADS_ * 4), got(ref.size());
    printf("%-10s %-4s %4s %2s %10s %10s %10s %s\n", "form", "src", "B", "T", "us", "GB/s/SM", "TB/s", "sums");
    for (const char *src : {"hbm", "l2"}) {
        for (int blocks : {96, 132}) {
            for (int tiles : {1, 4}) {
                bool first_form = true;
                for (const Form &f : forms) {
                    long long next = 0;
                    const long long per = (long long)blocks * tiles;
                    auto launch = [&]() {
                        long long first = 0;
                        if (src[0] == 'h') {
                            if (next + per > pool_tiles) next = 0;
                            first = next;
                            next += per;
                        }
                        f.kernel<<<blocks, THREADS_, f.smem>>>(w, a, sa, sw, out, tiles, first);
                    };
                    const float ms = time_ms(launch, 30);
                    CK(cudaGetLastError());
                    // Sums of one fixed launch (first tile 0), against the regs form's.
                    f.kernel<<<blocks, THREADS_, f.smem>>>(w, a, sa, sw, out, tiles, 0);
                    CK(cudaMemcpy(got.data(), out, blocks * THREADS_ * 4 * sizeof(float), cudaMemcpyDeviceToHost));
                    bool same = true;
                    double worst = 0;
                    if (first_form) ref = got;
                    else same = memcmp(ref.data(), got.data(), blocks * THREADS_ * 4 * sizeof(float)) == 0;
                    for (int i = 0; i < blocks * THREADS_ * 4; ++i)
                        worst = std::max(worst, (double)fabsf(got[i] - ref[i]) / (fabsf(ref[i]) + 1e-3));
                    first_form = false;
                    const double bytes = (double)per * TILE;
                    printf("%-10s %-4s %4d %2d %10.2f %10.1f %10.2f %s (max rel %.2e)\n", f.name, src, blocks, tiles,
                           ms * 1e3, bytes / blocks / (ms * 1e-3) / 1e9, bytes / (ms * 1e-3) / 1e12,
                           same ? "same" : "different", worst);
                }
            }
        }
    }
    return 0;
}
