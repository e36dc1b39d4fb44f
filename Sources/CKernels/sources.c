// Embeds the kernel files into the binary (C23 #embed), so a static binary copied alone to a GPU host carries
// its CUDA sources. Each file is NUL-terminated.
#include "CKernels.h"
#include <string.h>

#pragma clang diagnostic ignored "-Wc23-extensions"

static const char common_cuh[] = {
#embed "kernels/common.cuh"
    , 0};

static const char activation_cuh[] = {
#embed "kernels/activation.cuh"
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

static const char ptx_sm90_cuh[] = {
#embed "kernels/ptx_sm90.cuh"
    , 0};

static const char tma_engine_cuh[] = {
#embed "kernels/tma_engine.cuh"
    , 0};

static const char tma_queue_cuh[] = {
#embed "kernels/tma_queue.cuh"
    , 0};

static const char phase_experts_tma_cuh[] = {
#embed "kernels/phase_experts_tma.cuh"
    , 0};

static const char tma_fp8_engine_cuh[] = {
#embed "kernels/tma_fp8_engine.cuh"
    , 0};

static const char tma_fp8_tasks_cuh[] = {
#embed "kernels/tma_fp8_tasks.cuh"
    , 0};

static const char tma_fp8_epilogues_cuh[] = {
#embed "kernels/tma_fp8_epilogues.cuh"
    , 0};

static const char phase_experts_tma_fp8_cuh[] = {
#embed "kernels/phase_experts_tma_fp8.cuh"
    , 0};

static const char wgmma_fp8_cuh[] = {
#embed "kernels/wgmma_fp8.cuh"
    , 0};

static const char router_cuh[] = {
#embed "kernels/router.cuh"
    , 0};

static const char moe_params_cuh[] = {
#embed "kernels/moe_params.cuh"
    , 0};

static const char phase_gate_cuh[] = {
#embed "kernels/phase_gate.cuh"
    , 0};

static const char routing_tasks_cuh[] = {
#embed "kernels/routing_tasks.cuh"
    , 0};

static const char phase_place_cuh[] = {
#embed "kernels/phase_place.cuh"
    , 0};

static const char phase_dispatch_cuh[] = {
#embed "kernels/phase_dispatch.cuh"
    , 0};

static const char phase_experts_cuh[] = {
#embed "kernels/phase_experts.cuh"
    , 0};

static const char expert_tiles_cuh[] = {
#embed "kernels/expert_tiles.cuh"
    , 0};

static const char register_epilogues_cuh[] = {
#embed "kernels/register_epilogues.cuh"
    , 0};

static const char decode_tiles_cuh[] = {
#embed "kernels/decode_tiles.cuh"
    , 0};

static const char phase_combine_cuh[] = {
#embed "kernels/phase_combine.cuh"
    , 0};

static const char fp8_cuh[] = {
#embed "kernels/fp8.cuh"
    , 0};

static const char mma_fp8_cuh[] = {
#embed "kernels/mma_fp8.cuh"
    , 0};

static const char gemv_cuh[] = {
#embed "kernels/gemv.cuh"
    , 0};

static const char task_space_cuh[] = {
#embed "kernels/task_space.cuh"
    , 0};

static const char gate_gemv_cuh[] = {
#embed "kernels/gate_gemv.cuh"
    , 0};

static const char phase_fp8_cuh[] = {
#embed "kernels/phase_fp8.cuh"
    , 0};

static const char sched_launch_cuh[] = {
#embed "kernels/sched_launch.cuh"
    , 0};

static const char launch_limits_cuh[] = {
#embed "kernels/launch_limits.cuh"
    , 0};

static const char trace_cuh[] = {
#embed "kernels/trace.cuh"
    , 0};

static const char transport_nvshmem_cuh[] = {
#embed "kernels/transport_nvshmem.cuh"
    , 0};

static const char moe_cu[] = {
#embed "kernels/moe.cu"
    , 0};

static const char quantize_cu[] = {
#embed "kernels/quantize.cu"
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
    {"activation.cuh", activation_cuh, sizeof(activation_cuh) - 1},
    {"sync.cuh", sync_cuh, sizeof(sync_cuh) - 1},
    {"gemm_tile.cuh", gemm_tile_cuh, sizeof(gemm_tile_cuh) - 1},
    {"wgmma.cuh", wgmma_cuh, sizeof(wgmma_cuh) - 1},
    {"ptx_sm90.cuh", ptx_sm90_cuh, sizeof(ptx_sm90_cuh) - 1},
    {"tma_engine.cuh", tma_engine_cuh, sizeof(tma_engine_cuh) - 1},
    {"tma_queue.cuh", tma_queue_cuh, sizeof(tma_queue_cuh) - 1},
    {"phase_experts_tma.cuh", phase_experts_tma_cuh, sizeof(phase_experts_tma_cuh) - 1},
    {"tma_fp8_engine.cuh", tma_fp8_engine_cuh, sizeof(tma_fp8_engine_cuh) - 1},
    {"tma_fp8_tasks.cuh", tma_fp8_tasks_cuh, sizeof(tma_fp8_tasks_cuh) - 1},
    {"tma_fp8_epilogues.cuh", tma_fp8_epilogues_cuh, sizeof(tma_fp8_epilogues_cuh) - 1},
    {"phase_experts_tma_fp8.cuh", phase_experts_tma_fp8_cuh, sizeof(phase_experts_tma_fp8_cuh) - 1},
    {"wgmma_fp8.cuh", wgmma_fp8_cuh, sizeof(wgmma_fp8_cuh) - 1},
    {"router.cuh", router_cuh, sizeof(router_cuh) - 1},
    {"moe_params.cuh", moe_params_cuh, sizeof(moe_params_cuh) - 1},
    {"phase_gate.cuh", phase_gate_cuh, sizeof(phase_gate_cuh) - 1},
    {"routing_tasks.cuh", routing_tasks_cuh, sizeof(routing_tasks_cuh) - 1},
    {"phase_place.cuh", phase_place_cuh, sizeof(phase_place_cuh) - 1},
    {"phase_dispatch.cuh", phase_dispatch_cuh, sizeof(phase_dispatch_cuh) - 1},
    {"phase_experts.cuh", phase_experts_cuh, sizeof(phase_experts_cuh) - 1},
    {"expert_tiles.cuh", expert_tiles_cuh, sizeof(expert_tiles_cuh) - 1},
    {"register_epilogues.cuh", register_epilogues_cuh, sizeof(register_epilogues_cuh) - 1},
    {"decode_tiles.cuh", decode_tiles_cuh, sizeof(decode_tiles_cuh) - 1},
    {"phase_combine.cuh", phase_combine_cuh, sizeof(phase_combine_cuh) - 1},
    {"fp8.cuh", fp8_cuh, sizeof(fp8_cuh) - 1},
    {"mma_fp8.cuh", mma_fp8_cuh, sizeof(mma_fp8_cuh) - 1},
    {"phase_fp8.cuh", phase_fp8_cuh, sizeof(phase_fp8_cuh) - 1},
    {"gemv.cuh", gemv_cuh, sizeof(gemv_cuh) - 1},
    {"gate_gemv.cuh", gate_gemv_cuh, sizeof(gate_gemv_cuh) - 1},
    {"task_space.cuh", task_space_cuh, sizeof(task_space_cuh) - 1},
    {"sched_launch.cuh", sched_launch_cuh, sizeof(sched_launch_cuh) - 1},
    {"launch_limits.cuh", launch_limits_cuh, sizeof(launch_limits_cuh) - 1},
    {"trace.cuh", trace_cuh, sizeof(trace_cuh) - 1},
    {"transport_nvshmem.cuh", transport_nvshmem_cuh, sizeof(transport_nvshmem_cuh) - 1},
    {"moe.cu", moe_cu, sizeof(moe_cu) - 1},
    {"selftest.cu", selftest_cu, sizeof(selftest_cu) - 1},
    {"quantize.cu", quantize_cu, sizeof(quantize_cu) - 1},
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
