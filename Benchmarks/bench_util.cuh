// What the standalone nvcc benchmarks of this folder share (stream_bench.cu, l2_feed_bench.cu): a CUDA-call check
// that exits with status 1 naming the call, and the median time of a launch.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                                                   \
    do {                                                                                                           \
        cudaError_t e_ = (x);                                                                                      \
        if (e_ != cudaSuccess) {                                                                                   \
            std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                                          \
            std::exit(1);                                                                                          \
        }                                                                                                          \
    } while (0)

// Median milliseconds of launch(i) for i = 3 … 22, timed with CUDA events one at a time (i = 0 … 2 warm up).
template <class Launch> static double median_launch_ms(Launch launch) {
    cudaEvent_t a, b;
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
    std::vector<float> ms;
    for (int it = 0; it < 23; ++it) {
        CHECK(cudaEventRecord(a));
        launch(it);
        CHECK(cudaGetLastError());
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        float t = 0;
        CHECK(cudaEventElapsedTime(&t, a, b));
        if (it >= 3) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    CHECK(cudaEventDestroy(a));
    CHECK(cudaEventDestroy(b));
    return ms[ms.size() / 2];
}
