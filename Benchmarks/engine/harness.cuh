// What the standalone engine harnesses (tma_engine_test.cu, tma_fp8_test.cu) share on the host: the CUDA error
// check, 2-D and 3-D tensor maps in the engines' stage layout, and the median time of a launch.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t e_ = (x);                                                                  \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

// Encodes a `rank`-dimensional map (dims innermost first, byte strides of dimensions 1 …) in the engines' stage
// layout: boxes of 128 bytes of a row × box_rows (× 1), 128-byte swizzle, zero fill (tma_engine.cuh).
static CUtensorMap encode_map(const void *base, CUtensorMapDataType type, int elem_bytes, cuuint32_t rank,
                              const cuuint64_t *dims, const cuuint64_t *strides, int box_rows) {
    CUtensorMap m;
    const cuuint32_t box[3] = {(cuuint32_t)(128 / elem_bytes), (cuuint32_t)box_rows, 1u};
    const cuuint32_t estr[3] = {1, 1, 1};
    CUresult r = cuTensorMapEncodeTiled(&m, type, rank, (void *)base, dims, strides, box, estr,
                                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        fprintf(stderr, "cuTensorMapEncodeTiled (%u-D) failed: %d\n", rank, (int)r);
        exit(1);
    }
    return m;
}

// A [rows, k] tensor of `elem_bytes`-byte elements.
static CUtensorMap make_map(const void *base, CUtensorMapDataType type, int elem_bytes, int k, long long rows,
                            int box_rows) {
    const cuuint64_t dims[2] = {(cuuint64_t)k, (cuuint64_t)rows};
    const cuuint64_t strides[1] = {(cuuint64_t)k * elem_bytes};
    return encode_map(base, type, elem_bytes, 2, dims, strides, box_rows);
}

// A stack of `count` [rows, k] byte matrices `image_bytes` apart (3-D: k, rows, matrix), one matrix a box: the fp8
// engine's weight operand (tma_fp8_engine.cuh).
static CUtensorMap make_map_3d(const void *base, int k, long long rows, long long count, long long image_bytes,
                               int box_rows) {
    const cuuint64_t dims[3] = {(cuuint64_t)k, (cuuint64_t)rows, (cuuint64_t)count};
    const cuuint64_t strides[2] = {(cuuint64_t)k, (cuuint64_t)image_bytes};
    return encode_map(base, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, 3, dims, strides, box_rows);
}

// The median over `reps` launches (device events around each), after two warm-up launches.
template <class F> static float time_ms(F launch, int reps) {
    for (int i = 0; i < 2; ++i) launch();
    CK(cudaDeviceSynchronize());
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    std::vector<float> ts;
    for (int i = 0; i < reps; ++i) {
        CK(cudaEventRecord(a));
        launch();
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    return ts[ts.size() / 2];
}
