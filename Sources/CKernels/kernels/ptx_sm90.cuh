// Raw PTX wrappers for Hopper (sm_90a) features used by the TMA engine (tma_engine.cuh): mbarriers, tensor-map
// (TMA) bulk copies and multicast, clusters, register reallocation.
// Compiled by NVRTC and nvcc alike: no CUDA headers. Only included where the target is sm_90a.
#pragma once
#include "common.cuh"

namespace fmoe {

// ---- mbarrier (shared::cta, 8 bytes) ----------------------------------------------------------------------------
FMOE_DEVICE void mbar_init(u64 *bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the other threads and to the async proxy (TMA completes on them).
// A __syncthreads must follow before any thread uses them.
FMOE_DEVICE void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Release-arrive (CTA scope): the arriving thread's earlier writes are visible to whoever completes the wait.
FMOE_DEVICE void mbar_arrive(u64 *bar) {
    asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Arrives on `bar` once every cp.async this thread issued before it has landed (noinc: the arrival is one of the
// barrier's expected count, as a plain arrive would be). The thread does not wait; the copies' writes are visible to
// the threads that observe the phase complete (in the generic proxy: a reader through the async proxy fences).
FMOE_DEVICE void cp_async_mbar_arrive(u64 *bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
// Arrives once and adds `bytes` to the transaction count the phase waits for (TMA completes them).
FMOE_DEVICE void mbar_arrive_expect_tx(u64 *bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
                 "r"(bytes)
                 : "memory");
}
// One bounded probe of the phase with the given parity (acquire, CTA scope): true once that phase completed.
FMOE_DEVICE bool mbar_try_wait(u64 *bar, u32 parity) {
    u32 done;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    return done != 0;
}
// Waits for the phase with the given parity. Every phase a CTA waits on is completed by this CTA's own threads or
// by TMA copies it issued, so it ends unless the pipeline is broken; bounded all the same: past
// FMOE_MBAR_TIMEOUT_NS the launch traps (an error the host sees) instead of hanging. The loop is one asm block on
// purpose: a C++ loop with a data-dependent exit makes the compiler assume divergence at the wgmma that follow
// and serialise them (ptxas C7518).
#ifndef FMOE_MBAR_TIMEOUT_NS
#define FMOE_MBAR_TIMEOUT_NS 2000000000
#endif
#define FMOE_STR2(x) #x
#define FMOE_STR(x) FMOE_STR2(x)
FMOE_DEVICE void mbar_wait(u64 *bar, u32 parity) {
    asm volatile(
        "{\n .reg .pred p;\n .reg .u64 t0, t1;\n"
        " mov.u64 t0, %%globaltimer;\n"
        "FMOE_MBAR_WAIT:\n"
        " mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%0], %1;\n"
        " @p bra FMOE_MBAR_DONE;\n"
        " mov.u64 t1, %%globaltimer;\n"
        " sub.u64 t1, t1, t0;\n"
        " setp.gt.u64 p, t1, " FMOE_STR(FMOE_MBAR_TIMEOUT_NS) ";\n"
        " @p trap;\n"
        " bra FMOE_MBAR_WAIT;\n"
        "FMOE_MBAR_DONE:\n}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}
// Release-arrive by the threads for which `pred` holds, without a branch around it (see mbar_wait).
FMOE_DEVICE void mbar_arrive_if(u64 *bar, bool pred) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.u32 p, %1, 0;\n"
        " @p mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n}\n" ::"r"(smem_addr(bar)),
        "r"((u32)pred)
        : "memory");
}

// ---- TMA: tensor-map bulk copies global → shared ---------------------------------------------------------------
// `map` is the generic address of a CUtensorMap (a __grid_constant__ kernel parameter or global memory).
FMOE_DEVICE void tma_prefetch_map(const void *map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(map) : "memory");
}
// Copies the box at element coordinates (c0 innermost = K, c1 = row) into shared memory at `dst` and completes
// its bytes on `bar`. Elements outside the tensor are zero-filled.
FMOE_DEVICE void tma_load_2d(u32 dst, const void *map, u64 *bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
            "r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(smem_addr(bar))
        : "memory");
}

// The 3-D form: c2 picks one matrix of a stack whose matrices lie a fixed byte stride apart (the fp8 experts'
// weight images, tma_fp8_engine.cuh); rows past a matrix's own read as zeros, not as the next matrix's.
FMOE_DEVICE void tma_load_3d(u32 dst, const void *map, u64 *bar, int c0, int c1, int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::
            "r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
        : "memory");
}

// The same copy, written at the same shared-memory offset into every CTA of the cluster in `cta_mask`, completing
// on the barrier at `bar`'s offset in each of them.
FMOE_DEVICE void tma_load_2d_multicast(u32 dst, const void *map, u64 *bar, int c0, int c1, unsigned short cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(smem_addr(bar)), "h"(cta_mask)
        : "memory");
}

// ---- Clusters ----------------------------------------------------------------------------------------------------
FMOE_DEVICE u32 cluster_cta_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
FMOE_DEVICE u32 cluster_id_x() {
    u32 r;
    asm volatile("mov.u32 %0, %%clusterid.x;\n" : "=r"(r));
    return r;
}
FMOE_DEVICE u32 cluster_count_x() {
    u32 r;
    asm volatile("mov.u32 %0, %%nclusterid.x;\n" : "=r"(r));
    return r;
}
// Every thread of every CTA of the cluster (release, then acquire).
FMOE_DEVICE void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
// Arrive on the barrier at `bar`'s offset in CTA `cta` of the cluster, by the threads for which `pred` holds.
// CLUSTER_SCOPE: release at cluster scope (orders this thread's earlier writes for the peer). Otherwise the default
// (release at CTA scope), enough where the arrive only says "my reads of this stage are done" (wgmma.wait_group
// already returned), which is the ring's empty barriers' case.
#define FMOE_REMOTE_ARRIVE(SEM)                                                                              \
    asm volatile("{\n .reg .pred p;\n .reg .b32 remote;\n setp.ne.u32 p, %2, 0;\n"                       \
                 " mapa.shared::cluster.u32 remote, %0, %1;\n"                                             \
                 " @p mbarrier.arrive" SEM ".shared::cluster.b64 _, [remote];\n}\n" ::"r"(smem_addr(bar)), \
                 "r"(cta), "r"((u32)pred)                                                                   \
                 : "memory")
template <bool CLUSTER_SCOPE> FMOE_DEVICE void mbar_arrive_cluster_if(u64 *bar, u32 cta, bool pred) {
    if (CLUSTER_SCOPE) FMOE_REMOTE_ARRIVE(".release.cluster");
    else FMOE_REMOTE_ARRIVE("");
}
#undef FMOE_REMOTE_ARRIVE

// ---- Issue order of the two consumer warpgroups (named barriers 3 and 4) -----------------------------------------
// TmaFp8Engine's ordered issue (FMOE_FP8_ORDERED_ISSUE, tma_fp8_engine.cuh): warpgroup w (thread index / 128) waits on
// barrier 4 − w before issuing a K block's first MMAs and arrives on 3 + w after: 1 issues only after 0 has, and 0
// only once 1 has issued the K block before; an idle warpgroup 1 (consume) waits and arrives the same way, so each K
// block pairs one wait with one arrival on each barrier. The first wait of warpgroup 0 in a launch is met by
// warpgroup 1's arrival before its first tile, and 1's last arrival by 0's wait after its last (expert_consumers_fp8;
// the same pair around each tile's mainloop made ptxas spill 8 B, deepseek-v3). The index is a fresh read of %tid.x
// inside the asm, so neither call holds a register across the mainloop (holding the warpgroup spilled 20 B). No
// memory clobber: they order instructions, not data (the stage's bytes are ordered by its mbarrier).
FMOE_DEVICE void order_issue_wait() {
    asm volatile("{\n .reg .u32 w;\n shr.u32 w, %0, 7;\n sub.u32 w, 4, w;\n barrier.sync w, 256;\n}\n" ::"r"(
        fresh_tid()));
}
FMOE_DEVICE void order_issue_done() {
    asm volatile("{\n .reg .u32 w;\n shr.u32 w, %0, 7;\n add.u32 w, 3, w;\n barrier.arrive w, 256;\n}\n" ::"r"(
        fresh_tid()));
}
// A turn without MMAs to issue (an idle warpgroup's K block): the wait and the arrival.
FMOE_DEVICE void order_issue_pass() {
    order_issue_wait();
    order_issue_done();
}
// Warpgroup 1's arrival on barrier 4 before the launch's first tile, and warpgroup 0's wait there after its last.
FMOE_DEVICE void order_issue_open() {
    if (FMOE_TID >= 128) order_issue_done();
}
FMOE_DEVICE void order_issue_close() {
    if (FMOE_TID < 128) order_issue_wait();
}

// ---- Register reallocation ------------------------------------------------------------------------------------------
template <int N> FMOE_DEVICE void regs_dealloc() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N> FMOE_DEVICE void regs_alloc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }

}  // namespace fmoe
