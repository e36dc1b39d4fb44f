// The host's side of the launch contract, checked when NVRTC compiles: the host computes the kernel's dynamic shared
// memory with the same formula (Sources/FlashMoE/Fused/FusedSharedMemory.swift) to choose the pipeline stages that
// fit a GPU, and passes its value as FMOE_DYNAMIC_SMEM. A disagreement is a compile error, not a launch that
// overruns its shared memory. Without the define (a kernel built by hand, scripts/kernel_harness.py) nothing is
// checked.
#pragma once

#ifdef FMOE_DYNAMIC_SMEM
#define FMOE_CHECK_DYNAMIC_SMEM(bytes) \
    static_assert((bytes) == FMOE_DYNAMIC_SMEM, "FusedSharedMemory.swift and the kernel disagree on DYNAMIC_SMEM")
#else
#define FMOE_CHECK_DYNAMIC_SMEM(bytes) static_assert((bytes) > 0, "")
#endif
