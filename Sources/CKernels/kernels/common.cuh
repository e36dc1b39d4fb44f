// FlashMoE device code shared by every kernel: scalar types, PTX wrappers, memory ordering.
// Compiled by NVRTC with no CUDA toolkit headers, so everything beyond NVRTC's builtins is declared here.
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define FMOE_DEVICE __device__ __forceinline__
#define FMOE_INF __int_as_float(0x7f800000)

// %tid.x read by its own instruction, where a lane's terms must not be hoisted: from threadIdx.x the compiler moved
// the lane's row and column terms of gemm0_group_fp8 and of the fp8 engine's ring scales out of the consumers'
// loop, live across every mainloop, and ptxas spilled the loop's state (deepseek-v3: 16 – 20 B; moe.cu's role test
// uses it too).
FMOE_DEVICE int fresh_tid() {
    int tid;
    asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid));
    return tid;
}

// The thread's index in its block, as every kernel file reads it. FMOE_FRESH_TID 1 (set by the host for the fp8 TMA
// engine's 256-row tiles, FusedSpecialization.swift): each read is its own instruction (fresh_tid). From threadIdx.x
// the compiler keeps one read, and the tests on it (thread 0's work in every phase) as predicate bits, live from the
// kernel's start through the consumers' mainloops, where 128 + 64 accumulators leave no register for them: ptxas
// spilled them and reloaded them after barriers and divisions in every phase (qwen3-30b-a3b's 256-row kernel: 272 B
// of spills, 32 B with fresh reads; NVRTC 13.0). 0: threadIdx.x, the code every other build was measured with (a
// macro: through a function returning threadIdx.x NVVM optimised some uses differently).
#ifndef FMOE_FRESH_TID
#define FMOE_FRESH_TID 0
#endif
#if FMOE_FRESH_TID
#define FMOE_TID ((unsigned)fresh_tid())
#else
#define FMOE_TID (threadIdx.x)
#endif

// ---- 16-bit storage types -------------------------------------------------------------------------------------
// Plain 16-bit wrappers: only the bits matter to the tensor cores; conversions go through PTX cvt (round to
// nearest even, NaN preserved), the same rounding as the host's BFloat16/Float16.
struct bf16_t { unsigned short bits; };
struct f16_t { unsigned short bits; };

FMOE_DEVICE unsigned short f32_to_bf16_bits(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
FMOE_DEVICE unsigned short f32_to_f16_bits(float f) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
FMOE_DEVICE float bf16_bits_to_f32(unsigned short b) { return __uint_as_float(((u32)b) << 16); }
FMOE_DEVICE float f16_bits_to_f32(unsigned short b) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
}

// Storage traits: how a T element converts to and from FP32.
template <class T> struct Storage;
template <> struct Storage<float> {
    static FMOE_DEVICE float load(float v) { return v; }
    static FMOE_DEVICE float store(float v) { return v; }
};
template <> struct Storage<bf16_t> {
    static FMOE_DEVICE float load(bf16_t v) { return bf16_bits_to_f32(v.bits); }
    static FMOE_DEVICE bf16_t store(float v) { bf16_t r; r.bits = f32_to_bf16_bits(v); return r; }
};
template <> struct Storage<f16_t> {
    static FMOE_DEVICE float load(f16_t v) { return f16_bits_to_f32(v.bits); }
    static FMOE_DEVICE f16_t store(float v) { f16_t r; r.bits = f32_to_f16_bits(v); return r; }
};

// ---- Block barriers ----------------------------------------------------------------------------------------------
// FMOE_TMA 1 (sm_90a, 16-bit, one GPU; chosen by the host, FusedSpecialization): blocks of 384 threads, the last
// warpgroup the TMA engine's producer (tma_engine.cuh, phase_experts_tma.cuh); it never runs the phases, so every
// phase's block barrier is named barrier 0 over the first 256 threads (PHASE_THREADS). Otherwise blocks of 256 and
// the plain __syncthreads. Named barrier 1 is the producer warpgroup's own, 2 the producer's hand-over from the
// phases, 3 and 4 the fp8 consumers' ordered issue (ptx_sm90.cuh, off by default). The named barriers are the
// non-aligned `barrier.sync` form: the compiler does not reconverge a warp before inline asm (after `if
// (threadIdx.x == 0)`), and `bar.sync` requires a converged warp (compute-sanitizer's synccheck flagged it).
#ifndef FMOE_TMA
#define FMOE_TMA 0
#endif
constexpr int PHASE_THREADS = 256;
FMOE_DEVICE void sync_block() {
#if FMOE_TMA
    asm volatile("barrier.sync 0, 256;\n" ::: "memory");
#else
    __syncthreads();
#endif
}
// sync_block that returns whether `v` is nonzero in every phase thread (__syncthreads_and).
FMOE_DEVICE int sync_block_and(int v) {
#if FMOE_TMA
    u32 r;
    asm volatile(
        "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n barrier.red.and.pred q, 0, 256, p;\n selp.u32 %0, 1, 0, q;\n}\n"
        : "=r"(r)
        : "r"((u32)v)
        : "memory");
    return (int)r;
#else
    return __syncthreads_and(v);
#endif
}

// ---- Async copies (cp.async, sm_80+) --------------------------------------------------------------------------
FMOE_DEVICE u32 smem_addr(const void *p) { return (u32)__cvta_generic_to_shared(p); }

// Copies 16 bytes global → shared; when `valid` is false the destination is zero-filled and nothing is read
// (src-size 0), which is how tile edges (rows past the expert's count, K past the end) become zeros.
FMOE_DEVICE void cp_async16(u32 dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
// 4 bytes (the L1-allocating form: cg copies only 16), zero-filled when !valid.
FMOE_DEVICE void cp_async4(u32 dst, const void *src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
// FMOE_DECODE_EVICT_FIRST 1 (default; 0 for A/B runs): decode tiles (wgmma.cuh) and the GEMV tiles (gemv.cuh) read
// their weights with the L2 evict-first policy. A decode launch reads each weight byte once, and qwen3-30b-a3b S = 1
// reads 75 MB of them through a 60 MiB L2, so with the normal policy the next launch finds the kernel's code, x and
// the router's rows evicted and fetches them from HBM again, in the decode prefix's chain of dependent steps. Measured
// (H200, 2026-12-02, Benchmarks/RESULTS.md "Round 14"): qwen3-30b-a3b S = 1 bf16 0.056 → 0.051 ms, paper-e64 S = 1
// 0.049 → 0.047; in the trace the gate phase ends at 13.2 µs instead of 16.9 (the gate dot products end at 2.9 µs
// instead of 4.7, the scan takes 1.4 instead of 2.1; routing the token still takes 3.5). S = 8, 64, fp8 and
// deepseek-v3 S = 1 unchanged. Same bytes, same bits.
#ifndef FMOE_DECODE_EVICT_FIRST
#define FMOE_DECODE_EVICT_FIRST 1
#endif
// The same copy with an L2 cache policy (l2_evict_first below).
FMOE_DEVICE void cp_async16_hint(u32 dst, const void *src, bool valid, u64 policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0), "l"(policy));
}
// An L2 policy for bytes read once per launch (a decode launch's weights): evicted first, so they do not push out of
// L2 what every launch reads again (the kernel's code, x, the router's rows, the counters).
FMOE_DEVICE u64 l2_evict_first() {
    u64 policy;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));  // pure: may be hoisted
    return policy;
}
FMOE_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> FMOE_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ---- Tensor-core fragments -------------------------------------------------------------------------------------
FMOE_DEVICE void ldmatrix_x4(u32 addr, u32 &r0, u32 &r1, u32 &r2, u32 &r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

FMOE_DEVICE u32 to_tf32(u32 x) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(__uint_as_float(x)));
    return r;
}

// ---- Memory ordering -------------------------------------------------------------------------------------------
// Publication protocol used everywhere: write the data, fence at the scope of the readers, then store/RMW the
// flag; readers load the flag (relaxed, volatile) and fence before reading the data. `fence.acq_rel.gpu` on both
// sides gives the release/acquire pairing for one GPU; peers on other GPUs need `.sys`.
FMOE_DEVICE void fence_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }
FMOE_DEVICE void fence_sys() { asm volatile("fence.acq_rel.sys;\n" ::: "memory"); }

FMOE_DEVICE u64 ld_relaxed_u64(const u64 *p) {
    u64 v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];\n" : "=l"(v) : "l"(p) : "memory");
    return v;
}
FMOE_DEVICE int ld_relaxed_i32(const int *p) {
    int v;
    asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}
FMOE_DEVICE void st_relaxed_u64(u64 *p, u64 v) {
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;\n" ::"l"(p), "l"(v) : "memory");
}

// System scope, for words another rank reads or writes: with ranks on several GPUs the peer is another device,
// and a .gpu-scoped access would not be morally strong against it (a data race in the PTX memory model).
FMOE_DEVICE u64 ld_relaxed_sys_u64(const u64 *p) {
    u64 v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];\n" : "=l"(v) : "l"(p) : "memory");
    return v;
}
FMOE_DEVICE void st_relaxed_sys_u64(u64 *p, u64 v) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;\n" ::"l"(p), "l"(v) : "memory");
}
FMOE_DEVICE void st_relaxed_sys_u32(u32 *p, u32 v) {
    asm volatile("st.relaxed.sys.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
FMOE_DEVICE int atom_add_sys_i32(int *p, int v) {
    int old;
    asm volatile("atom.relaxed.sys.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}
FMOE_DEVICE u32 atom_cas_sys_u32(u32 *p, u32 compare, u32 value) {
    u32 old;
    asm volatile("atom.relaxed.sys.global.cas.b32 %0, [%1], %2, %3;\n"
                 : "=r"(old) : "l"(p), "r"(compare), "r"(value) : "memory");
    return old;
}

// Flag access at a compile-time scope: SYS for flags shared between ranks, GPU scope otherwise.
template <bool SYS> FMOE_DEVICE u64 ld_flag(const u64 *p) { return SYS ? ld_relaxed_sys_u64(p) : ld_relaxed_u64(p); }
// 32-bit counters are only waited on by the rank that owns them (GPU scope).
template <bool SYS> FMOE_DEVICE int ld_flag(const int *p) {
    static_assert(!SYS, "32-bit counters are local to a rank");
    return ld_relaxed_i32(p);
}
template <bool SYS> FMOE_DEVICE void st_flag(u64 *p, u64 v) {
    if (SYS) st_relaxed_sys_u64(p, v); else st_relaxed_u64(p, v);
}
template <bool SYS> FMOE_DEVICE void fence_at() {
    if (SYS) fence_sys(); else fence_gpu();
}

FMOE_DEVICE u64 globaltimer_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
