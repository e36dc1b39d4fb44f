// Self-test kernels: prove that NVRTC, the cubin cache, the driver, memory copies, launches and cooperative
// launches work on this machine, before any MoE kernel runs (`flashmoe selftest`). No toolkit headers: NVRTC
// provides threadIdx, atomics and the rest as builtins.
#include "common.cuh"

// A value the host reads back with cuModuleGetGlobal, to check module globals ("FMOE" in ASCII).
extern "C" __device__ unsigned int fmoe_selftest_marker = 0x464D4F45u;

// y[i] = a * x[i] + y[i] for i < n, grid-stride so any grid size covers any n.
extern "C" __global__ void fmoe_selftest_axpy(float a, const float* __restrict__ x, float* __restrict__ y, int n) {
    for (int i = blockIdx.x * blockDim.x + FMOE_TID; i < n; i += gridDim.x * blockDim.x) {
        y[i] = a * x[i] + y[i];
    }
}

// Co-residency check for cooperative launches: every block arrives at one counter, then waits until it has seen
// all gridDim.x arrivals, or until spin_budget polls have passed (so a grid that is not co-resident fails with a
// short count instead of hanging). Block b writes the count it last saw to seen[b]; all must equal gridDim.x.
extern "C" __global__ void fmoe_selftest_grid_barrier(unsigned int* arrived, unsigned int* seen,
                                                      unsigned int spin_budget) {
    if (FMOE_TID != 0) return;
    atomicAdd(arrived, 1u);
    unsigned int count = 0;
    for (unsigned int poll = 0; poll < spin_budget; ++poll) {
        count = atomicAdd(arrived, 0u);  // an atomic read, coherent across SMs
        if (count >= gridDim.x) break;
        __nanosleep(64);
    }
    seen[blockIdx.x] = count;
}
