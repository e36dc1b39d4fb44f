// Embeds the kernel files into the binary (C23 #embed), so a static binary copied alone to a GPU host carries
// its CUDA sources. Each file is NUL-terminated.
#include "CKernels.h"
#include <string.h>

#pragma clang diagnostic ignored "-Wc23-extensions"

static const char common_cuh[] = {
#embed "kernels/common.cuh"
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
