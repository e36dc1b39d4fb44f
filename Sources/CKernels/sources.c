// Embeds the kernel files into the binary (C23 #embed), so a static binary copied alone to a GPU host carries
// its CUDA sources. Each file is NUL-terminated.
#include "CKernels.h"
#include <string.h>

#pragma clang diagnostic ignored "-Wc23-extensions"

static const char common_cuh[] = {
#embed "kernels/common.cuh"
    , 0};

static const char sync_cuh[] = {
#embed "kernels/sync.cuh"
    , 0};

static const char gemm_tile_cuh[] = {
#embed "kernels/gemm_tile.cuh"
    , 0};

static const char wgmma_cuh[] = {
#embed "kernels/wgmma.cuh"
    , 0};

static const char router_cuh[] = {
#embed "kernels/router.cuh"
    , 0};

static const char launch_limits_cuh[] = {
#embed "kernels/launch_limits.cuh"
    , 0};

static const char trace_cuh[] = {
#embed "kernels/trace.cuh"
    , 0};

static const char moe_cu[] = {
#embed "kernels/moe.cu"
    , 0};

static const char selftest_cu[] = {
#embed "kernels/selftest.cu"
    , 0};

static const struct {
    const char *name;
    const char *text;
    size_t length;
} files[] = {
    {"common.cuh", common_cuh, sizeof(common_cuh) - 1},
    {"sync.cuh", sync_cuh, sizeof(sync_cuh) - 1},
    {"gemm_tile.cuh", gemm_tile_cuh, sizeof(gemm_tile_cuh) - 1},
    {"wgmma.cuh", wgmma_cuh, sizeof(wgmma_cuh) - 1},
    {"router.cuh", router_cuh, sizeof(router_cuh) - 1},
    {"launch_limits.cuh", launch_limits_cuh, sizeof(launch_limits_cuh) - 1},
    {"trace.cuh", trace_cuh, sizeof(trace_cuh) - 1},
    {"moe.cu", moe_cu, sizeof(moe_cu) - 1},
    {"selftest.cu", selftest_cu, sizeof(selftest_cu) - 1},
};

const char *flashmoe_kernel_source(const char *name, size_t *length) {
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        if (strcmp(files[i].name, name) == 0) {
            if (length) *length = files[i].length;
            return files[i].text;
        }
    }
    return NULL;
}

size_t flashmoe_kernel_file_count(void) { return sizeof(files) / sizeof(files[0]); }

const char *flashmoe_kernel_file_name(size_t i) {
    return i < flashmoe_kernel_file_count() ? files[i].name : NULL;
}
