// The NVSHMEM transport of the ranks protocol (FMOE_NVSHMEM=1 builds only; see docs/multinode.md, "NVSHMEM").
//
// Every rank's arena (receive rows, flags, counters, combine list, its Sync) lives on NVSHMEM's symmetric heap,
// one PE per rank (PE = rank). The host fills the Peer table with nvshmem_ptr(address, q) where PE q's copy is
// mapped here (the same GPU, NVLink or PCIe peers: the protocol's plain system-scope stores, unchanged), and with
// the symmetric address itself where it is not (PEs on other nodes). For those, the kernel turns each peer access
// into an NVSHMEM call here: rows become non-blocking puts, completed (nvshmem_quiet) by the thread that issued
// them before the flag or counter that announces them is released; flags become signal operations (SET of the
// same 64-bit value) or put-with-signal; counters become NVSHMEM atomics; reads of a peer become nvshmem_g.
//
// Compiled by NVRTC with NVSHMEM's headers (all device calls inlined: NVSHMEM_ENABLE_ALL_DEVICE_INLINING) and
// linked by nvJitLink with the wheel's static device library for the library's device state.
#pragma once
#if FMOE_NVSHMEM
// NVSHMEM 3.4's build options define NVSHMEM_IBGDA_SUPPORT unconditionally, so its transfer_device.cuh includes
// ibgda_device.cuh and <infiniband/mlx5dv.h> (the NIC's queue layouts), which NVRTC cannot compile; 3.8's options
// drop IBGDA (and GPUNetIO) themselves under NVRTC with NVSHMEM_ENABLE_ALL_DEVICE_INLINING. Include the options
// first (#pragma once: nvshmem.h then reuses them) and drop IBGDA here the same way for every version, so remote
// PEs go through the host proxy transport (docs/multinode.md, "NVSHMEM versions").
#include <non_abi/nvshmem_build_options.h>
#include <non_abi/nvshmem_version.h>
#if defined(__CUDACC_RTC__)
#undef NVSHMEM_IBGDA_SUPPORT
#undef NVSHMEM_IBGDA_SUPPORT_GPUMEM_ONLY
#undef NVSHMEM_GPUNETIO_SUPPORT
#if NVSHMEM_VENDOR_MAJOR_VERSION == 3 && NVSHMEM_VENDOR_MINOR_VERSION < 8
// 3.4's collectives (coll/reduce.cuh) name std::is_integral, is_signed and is_unsigned without a header NVRTC has;
// CCCL's are the same traits.
#include <cuda/std/type_traits>
namespace std {
using cuda::std::is_integral;
using cuda::std::is_signed;
using cuda::std::is_unsigned;
}  // namespace std
#endif
#endif
#include <nvshmem.h>
#include <nvshmemx.h>

namespace fmoe {

// Whether PE q is reached only through NVSHMEM calls (no load/store mapping of its heap here). `mine` is any
// symmetric address of this rank (its own Peer entry holds its own addresses).
FMOE_DEVICE bool nv_remote(const void *mine, int q) { return nvshmem_ptr(mine, q) == nullptr; }

// Bounded wait until PE q's 64-bit word at symmetric address `sym` reaches `target` (nvshmem_g each poll): the
// remote counterpart of wait_at_least, with the same budget and error record.
FMOE_DEVICE bool nv_wait_remote_at_least(const u64 *sym, int q, u64 target, ErrorRecord *err, u64 budget_ns,
                                         u32 phase, u32 index, u32 rank) {
    u64 seen = (u64)nvshmem_uint64_g((const uint64_t *)sym, q);
    if (seen < target) {
        const u64 start = globaltimer_ns();
        u32 spins = 0;
        while ((seen = (u64)nvshmem_uint64_g((const uint64_t *)sym, q)) < target) {
            if (aborted(err)) return false;
            if ((++spins & 7u) == 0 && globaltimer_ns() - start > budget_ns) {
                report_error(err, FMOE_ERR_TIMEOUT, phase, index, rank, target, seen);
                return false;
            }
            __nanosleep(256);
        }
    }
    fence_sys();
    return true;
}

// This rank's counts to remote PE q and its count flag as the signal of the same put (one message, ordered).
FMOE_DEVICE void nv_put_counts(int *dst_counts, const int *src_counts, int n, u64 *flag, u64 epoch, int q) {
    nvshmem_putmem_signal_nbi(dst_counts, src_counts, (size_t)n * sizeof(int), (uint64_t *)flag, (uint64_t)epoch,
                              NVSHMEM_SIGNAL_SET, q);
}

// A 64-bit flag SET on remote PE q after everything this thread put to q before (nvshmem_fence orders them).
FMOE_DEVICE void nv_set_flag(u64 *flag, u64 value, int q) {
    nvshmem_fence();
    nvshmemx_signal_op((uint64_t *)flag, (uint64_t)value, NVSHMEM_SIGNAL_SET, q);
}

// One row (bytes) put by a warp to remote PE q (non-blocking: the warp completes it with nv_complete_puts).
FMOE_DEVICE void nv_put_row_warp(void *dst, const void *src, size_t bytes, int q) {
    nvshmemx_putmem_nbi_warp(dst, src, bytes, q);
}

// Completes every put this thread issued (delivered at the targets) before it releases a flag or counter that
// announces them through local memory.
FMOE_DEVICE void nv_complete_puts() { nvshmem_quiet(); }

}  // namespace fmoe
#endif
