// HBM streaming rate of one block per SM reading its own weight slab, by access order: what a decode tile could
// reach (docs/performance.md: qwen3-30b-a3b's S = 1 tiles stream 256 KB at about 24 GB/s an SM, 3.1 TB/s in all).
//
//   nvcc -O3 -arch=sm_90a -o /tmp/stream_bench Benchmarks/stream_bench.cu && /tmp/stream_bench [SLAB_KB] [BLOCKS,...]
//
// BLOCKS: one block count or a comma-separated list of them, each measured in turn (e.g. 96,132: whether 96 blocks,
// qwen3-30b-a3b S = 1's GEMM0 decode tiles, stream faster a block than 132 do, Benchmarks/RESULTS.md "Round 13").
// Each of BLOCKS blocks (default: one per SM) reads slabs of SLAB_KB KiB (default 256) laid out as weight rows of
// 4 KiB (qwen3-30b-a3b's H = 2048 in bf16), from a fresh part of a buffer far larger than L2, so every byte comes
// from HBM: one slab (a decode tile's bytes, the launch's ramp included: round 9 measured 2.0 - 2.2 TB/s so, about
// 16 µs a launch) and then 16 slabs one after the other (the rate a block sustains once streaming). Orders:
//   contiguous   256 threads read the slab front to back, 16 bytes each, U loads in flight a thread
//   k-slices     the tiles' order (256 KiB slabs: 64 rows): step k reads bytes [128k, 128k + 128) of every row
//                (8 threads a row), U steps in flight; the rows are 4 KiB apart, so each step touches every row
//   bulk         front to back by the copy engine instead of the threads: one thread issues 16 KiB bulk copies
//                (cp.async.bulk, sm_90) into a ring of N shared-memory stages completed through mbarriers, N in
//                flight (what a TMA-fed decode tile could stream an SM, against the threads' loads above)
// The rate is total bytes over the kernel's time (CUDA events, median of 20 runs after 3). Prints one line per
// slab count, order and U. A launch's bytes: BLOCKS × SLAB_KB KiB × slabs.
#include "bench_util.cuh"

constexpr int THREADS = 256;
constexpr int ROW_BYTES = 4096;

__device__ __forceinline__ uint4 ld_stream(const char *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Front to back: iteration i reads 16 bytes at (i · THREADS + threadIdx.x) · 16, U iterations' loads issued first.
template <int U> __global__ void contiguous(const char *base, size_t slab, int slabs, unsigned *sink) {
    unsigned acc = 0;
    const size_t step = (size_t)THREADS * 16;
    for (int q = 0; q < slabs; ++q) {
        const char *s = base + ((size_t)blockIdx.x * slabs + q) * slab;
        for (size_t o = threadIdx.x * 16; o < slab; o += step * U) {
            uint4 v[U];
#pragma unroll
            for (int u = 0; u < U; ++u)
                v[u] = o + u * step < slab ? ld_stream(s + o + u * step) : make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
        }
    }
    if (acc == 0x12345678u) sink[0] = acc;  // keeps the loads
}

// The tiles' order over a 64-row slab: k-step j reads 128 bytes of every row (thread t: rows t / 8 and t / 8 + 32,
// 16 bytes at 16 · (t % 8)), U steps' loads (2U a thread) issued before any is used.
template <int U> __global__ void kslices(const char *base, size_t slab, int slabs, unsigned *sink) {
    unsigned acc = 0;
    for (int q = 0; q < slabs; ++q) {
        const char *s = base + ((size_t)blockIdx.x * slabs + q) * slab;
        const char *p0 = s + (size_t)(threadIdx.x / 8) * ROW_BYTES + (threadIdx.x % 8) * 16;
        const char *p1 = p0 + (size_t)32 * ROW_BYTES;
        for (int j0 = 0; j0 < ROW_BYTES / 128; j0 += U) {
            uint4 v[U][2];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const bool in = j0 + u < ROW_BYTES / 128;
                v[u][0] = in ? ld_stream(p0 + (j0 + u) * 128) : make_uint4(0, 0, 0, 0);
                v[u][1] = in ? ld_stream(p1 + (j0 + u) * 128) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) acc ^= v[u][0].x ^ v[u][0].y ^ v[u][1].z ^ v[u][1].w;
        }
    }
    if (acc == 0x12345678u) sink[0] = acc;
}

// Front to back by bulk copies: thread 0 keeps N 16 KiB copies in flight into a ring of N stages, each completing
// on its stage's mbarrier (expect_tx of the copy's bytes), and reads one word of each landed stage before reusing
// it. The slab must be a multiple of 16 KiB.
constexpr unsigned BULK_CHUNK = 16384;
template <int N> constexpr int bulk_smem() { return N * (int)BULK_CHUNK; }
template <int N> __global__ void bulk(const char *base, size_t slab, int slabs, unsigned *sink) {
    extern __shared__ __align__(128) char ring[];
    __shared__ __align__(8) unsigned long long full[N];
    if (threadIdx.x != 0) return;  // one thread issues and waits; the copy engine moves the bytes
    for (int s = 0; s < N; ++s)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"((unsigned)__cvta_generic_to_shared(&full[s])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    const char *src = base + (size_t)blockIdx.x * slabs * slab;
    const size_t chunks = slab * slabs / BULK_CHUNK;
    auto issue = [&](size_t i) {
        const unsigned bar = (unsigned)__cvta_generic_to_shared(&full[i % N]);
        const unsigned dst = (unsigned)__cvta_generic_to_shared(ring + (i % N) * BULK_CHUNK);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(BULK_CHUNK) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                     "l"(src + i * BULK_CHUNK), "r"(BULK_CHUNK), "r"(bar)
                     : "memory");
    };
    for (size_t i = 0; i < chunks && i < (size_t)N; ++i) issue(i);
    unsigned acc = 0;
    for (size_t i = 0; i < chunks; ++i) {
        const unsigned bar = (unsigned)__cvta_generic_to_shared(&full[i % N]);
        const unsigned parity = (unsigned)(i / N) & 1u;
        unsigned done = 0;
        unsigned long long t0, t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
        while (!done) {
            asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                         " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
            if (!done && t - t0 > 2000000000ull) __trap();  // bounded: a copy that never lands ends the run
        }
        acc ^= *(volatile unsigned *)(ring + (i % N) * BULK_CHUNK);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // that read, before the copy engine refills
        if (i + N < chunks) issue(i + N);
    }
    if (acc == 0x12345678u) sink[0] = acc;
}

template <class Kernel>
static double rate(Kernel k, const char *buf, size_t buf_bytes, size_t slab, int slabs, int blocks, unsigned *sink,
                   int smem = 0) {
    const size_t launch = slab * slabs * blocks;
    const int regions = (int)(buf_bytes / launch);
    if (smem > 0) CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const double ms = median_launch_ms([&](int it) {
        const char *region = buf + (size_t)(it % regions) * launch;  // a fresh region each run: nothing in L2
        k<<<blocks, THREADS, smem>>>(region, slab, slabs, sink);
    });
    return launch / (ms * 1e-3) / 1e9;  // GB/s
}

int main(int argc, char **argv) {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    const size_t slab = (size_t)(argc > 1 ? std::atoi(argv[1]) : 256) * 1024;
    // The block counts: "96" or "96,132"; a part that is not a number counts as 0 and is refused below.
    std::vector<int> counts;
    for (const char *c = argc > 2 ? argv[2] : nullptr; c != nullptr;) {
        char *end;
        const long v = std::strtol(c, &end, 10);
        counts.push_back(end == c || (*end != ',' && *end != '\0') ? 0 : (int)v);
        c = *end == ',' ? end + 1 : nullptr;
    }
    if (counts.empty()) counts.push_back(prop.multiProcessorCount);
    const int max_blocks = *std::max_element(counts.begin(), counts.end());
    if (slab < ROW_BYTES || slab % ROW_BYTES != 0 || *std::min_element(counts.begin(), counts.end()) < 1) {
        std::fprintf(stderr, "usage: stream_bench [SLAB_KB (a multiple of 4)] [BLOCKS[,BLOCKS...]]\n");
        return 2;
    }
    constexpr int MAX_SLABS = 16;
    const size_t buf_bytes = std::max<size_t>((size_t)8 << 30, slab * max_blocks * MAX_SLABS * 4);
    char *buf;
    unsigned *sink;
    CHECK(cudaMalloc(&buf, buf_bytes));
    CHECK(cudaMalloc(&sink, 4));
    CHECK(cudaMemset(buf, 1, buf_bytes));
    for (const int blocks : counts) {
        std::printf("%s, %d SMs, L2 %d MiB: %d blocks x %zu KiB slabs (rows of %d B), %.1f MiB a launch\n",
                    prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, blocks, slab >> 10, ROW_BYTES,
                    slab * blocks / 1048576.0);
        for (const int slabs : {1, MAX_SLABS}) {
            std::printf("%d slab%s a block:\n", slabs, slabs == 1 ? "" : "s");
            auto report = [&](const char *label, auto kernel, int smem = 0) {
                const double r = rate(kernel, buf, buf_bytes, slab, slabs, blocks, sink, smem);
                std::printf("%-16s %7.0f GB/s (%.1f a block)\n", label, r, r / blocks);
            };
            report("contiguous U=4:", contiguous<4>);
            report("contiguous U=8:", contiguous<8>);
            report("contiguous U=16:", contiguous<16>);
            if (slab == (size_t)64 * ROW_BYTES) {  // the tiles' order is written for 64-row slabs
                report("k-slices U=1:", kslices<1>);
                report("k-slices U=4:", kslices<4>);
                report("k-slices U=12:", kslices<12>);
            } else {
                std::printf("k-slices: only for 256 KiB slabs (64 rows)\n");
            }
            if (slab % BULK_CHUNK == 0) {
                report("bulk N=4:", bulk<4>, bulk_smem<4>());
                report("bulk N=8:", bulk<8>, bulk_smem<8>());
                report("bulk N=12:", bulk<12>, bulk_smem<12>());
            } else {
                std::printf("bulk: only for slabs of a multiple of 16 KiB\n");
            }
        }
    }
    CHECK(cudaFree(buf));
    CHECK(cudaFree(sink));
    return 0;
}
