// How fast L2 can feed the SMs the way the expert tiles load their operands: the bound the prefill GEMMs are read
// against (docs/engine-notes.md infers ~5.9 TB/s from the bf16 tiles' ~500 TFLOP/s at 48 KiB per k-slice, and
// docs/performance.md reads fp8's 0.86 µs K blocks as up to 4.9 TB/s; this measures the ceiling instead).
//
//   nvcc -O3 -arch=sm_90a -o /tmp/l2_feed_bench Benchmarks/l2_feed_bench.cu && /tmp/l2_feed_bench
//
// One block of 256 threads per SM, a ring of 4 stages of 384 rows × 128 bytes (48 KiB: a 128 × 256 bf16 tile's
// k-slice, A rows then B rows) in shared memory, filled with cp.async 16-byte copies as gemm_tile.cuh's load_stage
// does (8 threads a row, the 16-byte chunks XOR-swizzled by row), 3 slices in flight, one block barrier per slice,
// no math. A block reads a group of 384 rows of a row-major matrix, 128 bytes of each row a slice, walking K and
// starting over. Cases (group sizes chosen so the L2 cases' bytes stay in the H200's 60 MiB L2 after a warm-up
// launch; the HBM case's do not fit):
//   L2 private   rows of 512 bytes, each block its own group (132 × 192 KiB = 25 MiB)
//   L2 pairs     the same, blocks 2i and 2i + 1 sharing a group (two row blocks of one column tile)
//   L2 shared    every block the same group (one weight slab read by every SM at once)
//   HBM private  rows of 4096 bytes, each block its own group of 1.5 MiB (198 MiB in all)
// Rate = bytes copied into shared memory over the kernel's time (CUDA events, median of 20 runs after 3), in all
// and per SM. Exit status 1 on a CUDA error.
#include "bench_util.cuh"

constexpr int THREADS = 256;
constexpr int ROWS = 384;           // rows a slice (128 A + 256 B)
constexpr int SLICE_BYTES = 128;    // bytes of each row a slice
constexpr int STAGE = ROWS * SLICE_BYTES;
constexpr int STAGES = 4;           // the fused kernel's bf16 stages on the H200

__device__ __forceinline__ void cp_async16(unsigned dst, const void *src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Slice s of a walk over the 384 rows from row0 of a matrix with k_bytes a row: bytes [128 s', +128) of each row,
// s' = s mod (k_bytes / 128).
__device__ void load_slice(char *stage, const char *base, size_t row0, int k_bytes, int s) {
    const unsigned sbase = (unsigned)__cvta_generic_to_shared(stage);
    const int chunk = threadIdx.x & 7, k0 = (s % (k_bytes / SLICE_BYTES)) * SLICE_BYTES;
#pragma unroll
    for (int i = 0; i < ROWS / 32; ++i) {
        const int row = (int)(threadIdx.x >> 3) + 32 * i;
        const char *src = base + (row0 + row) * k_bytes + k0 + chunk * 16;
        cp_async16(sbase + row * SLICE_BYTES + ((chunk ^ (row & 7)) * 16), src);
    }
}

// share: blocks per group (1 private, 2 pairs, gridDim.x shared). Each block reads `slices` slices of its group.
__global__ void feed(const char *base, int k_bytes, int share, int slices, unsigned *sink) {
    extern __shared__ __align__(1024) char smem[];
    const size_t row0 = (size_t)(blockIdx.x / share) * ROWS;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < slices) load_slice(smem + s * STAGE, base, row0, k_bytes, s);
        cp_commit();
    }
    unsigned acc = 0;
    for (int s = 0; s < slices; ++s) {
        cp_wait<STAGES - 2>();
        __syncthreads();  // slice s landed for every thread; slice s − 1's stage is free
        const int next = s + STAGES - 1;
        if (next < slices) load_slice(smem + (next % STAGES) * STAGE, base, row0, k_bytes, next);
        cp_commit();
        acc ^= *(const unsigned *)(smem + (s % STAGES) * STAGE + threadIdx.x * 16);  // touch the stage
    }
    cp_wait<0>();
    if (acc == 0x9e3779b9u) sink[0] = acc;  // keeps the loads
}

int main() {
    int dev = 0, sms = 0;
    CHECK(cudaGetDevice(&dev));
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    const size_t bytes_max = (size_t)sms * ROWS * 4096;
    char *buf = nullptr;
    unsigned *sink = nullptr;
    CHECK(cudaMalloc(&buf, bytes_max));
    CHECK(cudaMalloc(&sink, 4));
    CHECK(cudaMemset(buf, 1, bytes_max));
    const int smem = STAGES * STAGE;
    CHECK(cudaFuncSetAttribute(feed, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const int slices = 2048;  // 96 MiB a block
    std::printf("L2 feed: %d blocks x %d threads, %d stages of %d KiB, %d slices a block\n", sms, THREADS, STAGES,
                STAGE / 1024, slices);
    struct Case { const char *name; int k_bytes, share; };
    const Case cases[] = {{"L2 private", 512, 1}, {"L2 pairs", 512, 2}, {"L2 shared", 512, sms},
                          {"HBM private", 4096, 1}};
    for (const Case &c : cases) {
        feed<<<sms, THREADS, smem>>>(buf, c.k_bytes, c.share, slices, sink);  // warm-up (fills L2)
        CHECK(cudaGetLastError());
        const double t = median_launch_ms([&](int) {
                             feed<<<sms, THREADS, smem>>>(buf, c.k_bytes, c.share, slices, sink);
                         }) * 1e-3;
        const double bytes = (double)sms * slices * STAGE;
        std::printf("%-12s %6.0f GB/s  (%5.1f GB/s an SM, %.3f ms)\n", c.name, bytes / t / 1e9, bytes / t / 1e9 / sms,
                    t * 1e3);
    }
    CHECK(cudaFree(buf));
    CHECK(cudaFree(sink));
    return 0;
}
