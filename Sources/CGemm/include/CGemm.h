#pragma once
#include <stddef.h>

/// The single-precision GEMM micro-kernels behind FlashMoE's CPU backend.
///
/// They compute C = A·Wᵀ (+ C) where A [m, k] is row-major and W [n, k] (Hugging Face's [out, in] layout) has
/// been packed once by `fm_gemm_pack` into panels of `fm_gemm_panel_width(kind)` output columns, each panel stored
/// as [k][width] and zero-padded past n. Every product is an FP32 fused multiply-add (the portable kernel: an FP32
/// multiply-add) accumulated in FP32 in ascending k order within blocks of `FM_GEMM_KC`.
///
/// Kernels are chosen at run time from what the CPU and the OS support; an explicit `kind` lets a caller (the
/// tests) run any kernel the machine has.

/// Which micro-kernel to run.
typedef enum {
    /// Plain C, any CPU (vectorised by the compiler for the baseline ISA).
    FM_GEMM_PORTABLE = 0,
    /// x86-64 AVX2 + FMA: 6 × 16 register tile.
    FM_GEMM_AVX2 = 1,
    /// x86-64 AVX-512F: 8 × 32 register tile.
    FM_GEMM_AVX512 = 2,
} fm_gemm_kind;

/// The reduction block: partial sums are kept in registers for this many k at a time.
#define FM_GEMM_KC 256

/// The fastest kernel this CPU and OS support.
fm_gemm_kind fm_gemm_best_kind(void);

/// Whether this CPU and OS can run `kind`.
int fm_gemm_supported(fm_gemm_kind kind);

/// A short name for `kind` ("avx512", "avx2", "portable").
const char *fm_gemm_kind_name(fm_gemm_kind kind);

/// Output columns per packed panel for `kind`.
int fm_gemm_panel_width(fm_gemm_kind kind);

/// Floats needed to pack an [n, k] matrix for `kind`: ceil(n / width) · k · width.
size_t fm_gemm_packed_count(fm_gemm_kind kind, int n, int k);

/// Packs W [n, k] (row stride `ldw`) into `dst` (`fm_gemm_packed_count` floats, best 64-byte aligned).
void fm_gemm_pack(fm_gemm_kind kind, int n, int k, const float *w, ptrdiff_t ldw, float *dst);

/// For rows i < m and the columns of panels [p0, p1) (clamped to n):
/// C[i, j] = (accumulate ? C[i, j] : 0) + Σ_k A[i, k] · W[j, k].
/// `packed` is the whole packed W; `c` points at column 0 of row 0 of C.
void fm_gemm_packed(
    fm_gemm_kind kind, int m, int n, int k, const float *a, ptrdiff_t lda, const float *packed, int p0, int p1,
    float *c, ptrdiff_t ldc, int accumulate);
