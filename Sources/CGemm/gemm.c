// Register-tiled FP32 GEMM micro-kernels for the CPU backend (see CGemm.h for the contract).
//
// Loop nest of one call, outermost first: row chunks of FM_GEMM_MC (A's chunk stays in L2), panels of `width`
// output columns, reduction blocks of FM_GEMM_KC (the panel's KC × width block stays in L1 while every row tile
// of the chunk streams past it), then row tiles of MR rows held in registers. The vector ISA is chosen per call;
// the x86 kernels are compiled with per-function target attributes, so the package needs no compiler flags and
// still runs on a baseline x86-64 CPU (through the portable kernel).
#include "CGemm.h"
#include <stdatomic.h>
#include <stdint.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#define FM_X86 1
#else
#define FM_X86 0
#endif

#define FM_GEMM_MC 96

static inline int min_int(int a, int b) { return a < b ? a : b; }

// Calls `tile` with the row count as a compile-time constant (1...8), so that the compiler unrolls the row loop
// and keeps the whole register tile in registers. Row counts above a kernel's tile height never reach it.
#define FM_MAX_MR 8
#define FM_DISPATCH_ROWS(tile, mr)                                      \
    switch (mr) {                                                       \
    case 8: tile(8, kc, a, lda, b, c, ldc, ncols, acc); break;          \
    case 7: tile(7, kc, a, lda, b, c, ldc, ncols, acc); break;          \
    case 6: tile(6, kc, a, lda, b, c, ldc, ncols, acc); break;          \
    case 5: tile(5, kc, a, lda, b, c, ldc, ncols, acc); break;          \
    case 4: tile(4, kc, a, lda, b, c, ldc, ncols, acc); break;          \
    case 3: tile(3, kc, a, lda, b, c, ldc, ncols, acc); break;          \
    case 2: tile(2, kc, a, lda, b, c, ldc, ncols, acc); break;          \
    default: tile(1, kc, a, lda, b, c, ldc, ncols, acc); break;         \
    }

// MARK: - Portable kernel (4 × 8 tile, plain C)

#define P_MR 4
#define P_NR 8

static inline __attribute__((always_inline)) void tile_portable(
    const int mr, int kc, const float *a, ptrdiff_t lda, const float *b, float *c, ptrdiff_t ldc, int ncols,
    int acc) {
    float t[FM_MAX_MR][P_NR];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < P_NR; j++) t[i][j] = (acc && j < ncols) ? c[i * ldc + j] : 0.0f;
    for (int k = 0; k < kc; k++) {
        const float *bk = b + (ptrdiff_t)k * P_NR;
        for (int i = 0; i < mr; i++) {
            const float ai = a[i * lda + k];
            for (int j = 0; j < P_NR; j++) t[i][j] += ai * bk[j];
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < ncols; j++) c[i * ldc + j] = t[i][j];
}

static void run_tile_portable(
    int mr, int kc, const float *a, ptrdiff_t lda, const float *b, float *c, ptrdiff_t ldc, int ncols, int acc) {
    FM_DISPATCH_ROWS(tile_portable, mr)
}

// MARK: - AVX2 + FMA kernel (6 × 16 tile)

#if FM_X86
#define A2_MR 6
#define A2_NR 16

static inline __attribute__((always_inline, target("avx2,fma"))) void tile_avx2(
    const int mr, int kc, const float *a, ptrdiff_t lda, const float *b, float *c, ptrdiff_t ldc, int ncols,
    int acc) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i k0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(ncols), lane);
    const __m256i k1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(ncols - 8), lane);
    __m256 c0[FM_MAX_MR], c1[FM_MAX_MR];
    for (int i = 0; i < mr; i++) {
        if (acc) {
            c0[i] = _mm256_maskload_ps(c + i * ldc, k0);
            c1[i] = _mm256_maskload_ps(c + i * ldc + 8, k1);
        } else {
            c0[i] = _mm256_setzero_ps();
            c1[i] = _mm256_setzero_ps();
        }
    }
    for (int k = 0; k < kc; k++) {
        const __m256 b0 = _mm256_loadu_ps(b + (ptrdiff_t)k * A2_NR);
        const __m256 b1 = _mm256_loadu_ps(b + (ptrdiff_t)k * A2_NR + 8);
        for (int i = 0; i < mr; i++) {
            const __m256 ai = _mm256_broadcast_ss(a + i * lda + k);
            c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
        }
    }
    for (int i = 0; i < mr; i++) {
        _mm256_maskstore_ps(c + i * ldc, k0, c0[i]);
        _mm256_maskstore_ps(c + i * ldc + 8, k1, c1[i]);
    }
}

__attribute__((target("avx2,fma"))) static void run_tile_avx2(
    int mr, int kc, const float *a, ptrdiff_t lda, const float *b, float *c, ptrdiff_t ldc, int ncols, int acc) {
    FM_DISPATCH_ROWS(tile_avx2, mr)
}

// MARK: - AVX-512F kernel (8 × 32 tile)

#define A5_MR 8
#define A5_NR 32

static inline __attribute__((always_inline, target("avx512f"))) void tile_avx512(
    const int mr, int kc, const float *a, ptrdiff_t lda, const float *b, float *c, ptrdiff_t ldc, int ncols,
    int acc) {
    const __mmask16 m0 = ncols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << ncols) - 1);
    const __mmask16 m1 = ncols >= 32 ? (__mmask16)0xFFFF
                         : ncols > 16 ? (__mmask16)((1u << (ncols - 16)) - 1)
                                      : (__mmask16)0;
    __m512 c0[FM_MAX_MR], c1[FM_MAX_MR];
    for (int i = 0; i < mr; i++) {
        if (acc) {
            c0[i] = _mm512_maskz_loadu_ps(m0, c + i * ldc);
            c1[i] = _mm512_maskz_loadu_ps(m1, c + i * ldc + 16);
        } else {
            c0[i] = _mm512_setzero_ps();
            c1[i] = _mm512_setzero_ps();
        }
    }
    for (int k = 0; k < kc; k++) {
        const __m512 b0 = _mm512_loadu_ps(b + (ptrdiff_t)k * A5_NR);
        const __m512 b1 = _mm512_loadu_ps(b + (ptrdiff_t)k * A5_NR + 16);
        for (int i = 0; i < mr; i++) {
            const __m512 ai = _mm512_set1_ps(a[i * lda + k]);
            c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
        }
    }
    for (int i = 0; i < mr; i++) {
        _mm512_mask_storeu_ps(c + i * ldc, m0, c0[i]);
        _mm512_mask_storeu_ps(c + i * ldc + 16, m1, c1[i]);
    }
}

__attribute__((target("avx512f"))) static void run_tile_avx512(
    int mr, int kc, const float *a, ptrdiff_t lda, const float *b, float *c, ptrdiff_t ldc, int ncols, int acc) {
    FM_DISPATCH_ROWS(tile_avx512, mr)
}

// MARK: - CPU detection

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static fm_gemm_kind detect(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return FM_GEMM_PORTABLE;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    if (!osxsave || !avx) return FM_GEMM_PORTABLE;
    const uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return FM_GEMM_PORTABLE;  // the OS saves XMM and YMM state
    if (__get_cpuid_max(0, 0) < 7) return FM_GEMM_PORTABLE;
    __cpuid_count(7, 0, a, b, c, d);
    const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1;
    if (avx512f && (xcr0 & 0xE6) == 0xE6) return FM_GEMM_AVX512;  // and opmask + ZMM state
    if (avx2 && fma) return FM_GEMM_AVX2;
    return FM_GEMM_PORTABLE;
}
#else
static fm_gemm_kind detect(void) { return FM_GEMM_PORTABLE; }
#endif

// MARK: - Public entry points

fm_gemm_kind fm_gemm_best_kind(void) {
    static _Atomic int cached = -1;
    int k = atomic_load_explicit(&cached, memory_order_relaxed);
    if (k < 0) {
        k = (int)detect();
        atomic_store_explicit(&cached, k, memory_order_relaxed);
    }
    return (fm_gemm_kind)k;
}

int fm_gemm_supported(fm_gemm_kind kind) {
    switch (kind) {
    case FM_GEMM_PORTABLE: return 1;
    case FM_GEMM_AVX2: return fm_gemm_best_kind() >= FM_GEMM_AVX2;
    case FM_GEMM_AVX512: return fm_gemm_best_kind() >= FM_GEMM_AVX512;
    }
    return 0;
}

const char *fm_gemm_kind_name(fm_gemm_kind kind) {
    switch (kind) {
    case FM_GEMM_AVX512: return "avx512";
    case FM_GEMM_AVX2: return "avx2";
    default: return "portable";
    }
}

int fm_gemm_panel_width(fm_gemm_kind kind) {
#if FM_X86
    switch (kind) {
    case FM_GEMM_AVX512: return A5_NR;
    case FM_GEMM_AVX2: return A2_NR;
    default: break;
    }
#endif
    (void)kind;
    return P_NR;
}

static int row_tile(fm_gemm_kind kind) {
#if FM_X86
    switch (kind) {
    case FM_GEMM_AVX512: return A5_MR;
    case FM_GEMM_AVX2: return A2_MR;
    default: break;
    }
#endif
    (void)kind;
    return P_MR;
}

size_t fm_gemm_packed_count(fm_gemm_kind kind, int n, int k) {
    const size_t w = (size_t)fm_gemm_panel_width(kind);
    return ((size_t)n + w - 1) / w * (size_t)k * w;
}

void fm_gemm_pack(fm_gemm_kind kind, int n, int k, const float *w, ptrdiff_t ldw, float *dst) {
    const int width = fm_gemm_panel_width(kind);
    const int panels = (n + width - 1) / width;
    for (int p = 0; p < panels; p++) {
        float *panel = dst + (size_t)p * (size_t)k * (size_t)width;
        const int cols = min_int(width, n - p * width);
        const float *rows = w + (ptrdiff_t)p * width * ldw;
        // Sequential writes; the reads stream through `cols` rows side by side, each cache line used in full.
        for (int kk = 0; kk < k; kk++) {
            float *out = panel + (size_t)kk * width;
            for (int j = 0; j < cols; j++) out[j] = rows[(ptrdiff_t)j * ldw + kk];
            for (int j = cols; j < width; j++) out[j] = 0.0f;
        }
    }
}

typedef void (*tile_fn)(int, int, const float *, ptrdiff_t, const float *, float *, ptrdiff_t, int, int);

void fm_gemm_packed(
    fm_gemm_kind kind, int m, int n, int k, const float *a, ptrdiff_t lda, const float *packed, int p0, int p1,
    float *c, ptrdiff_t ldc, int accumulate) {
    if (!fm_gemm_supported(kind)) kind = FM_GEMM_PORTABLE;
    tile_fn tile = run_tile_portable;
#if FM_X86
    if (kind == FM_GEMM_AVX512) tile = run_tile_avx512;
    else if (kind == FM_GEMM_AVX2) tile = run_tile_avx2;
#endif
    const int width = fm_gemm_panel_width(kind), mr_max = row_tile(kind);
    if (k <= 0) {  // an empty reduction: C = C or 0
        if (accumulate) return;
        for (int i = 0; i < m; i++)
            for (int j = p0 * width; j < min_int(n, p1 * width); j++) c[i * ldc + j] = 0.0f;
        return;
    }
    for (int m0 = 0; m0 < m; m0 += FM_GEMM_MC) {
        const int mc = min_int(FM_GEMM_MC, m - m0);
        for (int p = p0; p < p1; p++) {
            const int cols = min_int(width, n - p * width);
            if (cols <= 0) break;
            const float *panel = packed + (size_t)p * (size_t)k * (size_t)width;
            for (int kb = 0; kb < k; kb += FM_GEMM_KC) {
                const int kc = min_int(FM_GEMM_KC, k - kb);
                const int acc = accumulate || kb > 0;
                for (int i = 0; i < mc; i += mr_max) {
                    const int mr = min_int(mr_max, mc - i);
                    tile(mr, kc, a + (ptrdiff_t)(m0 + i) * lda + kb, lda, panel + (size_t)kb * width,
                         c + (ptrdiff_t)(m0 + i) * ldc + (ptrdiff_t)p * width, ldc, cols, acc);
                }
            }
        }
    }
}
