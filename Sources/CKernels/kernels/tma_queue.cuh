// The hand-over of tiles from the TMA engine's producer warpgroup to its consumers (tma_engine.cuh): the producer
// takes the next ticket while the consumers still run the previous tile's mainloop and epilogue, so no tile starts
// with an empty pipeline (docs/engine-notes.md measured the run-ahead: the expert phase 7 – 11 % faster than the
// cp.async engine's, one block barrier a tile).
//
// TQ slots in shared memory, each a 16-byte task with a full barrier (count 1: the producer's thread 0 wrote the slot;
// its release-arrive publishes the write, the consumers' acquire-wait sees it) and an empty barrier (one lane of
// each consumer warp: every consumer thread has read the slot). Each thread counts the tasks its role has passed
// through the queue itself (qi), so slot and parity need no shared state; consume_counted keeps a consumer warp's
// count in shared memory instead, for the build whose registers could not hold it. Tasks reach each thread through a
// shuffle from lane 0, warp-uniform to ptxas (a value read from shared memory would make it treat the consumers'
// wgmma as divergent and serialise them).
#pragma once
#include "ptx_sm90.cuh"

namespace fmoe {

constexpr int TQ = 2;

// Waits for the barrier phase with the given parity for at most budget_ns; false when the budget ran out (the
// caller reports it: unlike mbar_wait, whose phases always end unless the pipeline itself is broken, a consumer
// waits here for a producer that may be waiting on other blocks).
FMOE_DEVICE bool mbar_wait_budget(u64 *bar, u32 parity, u64 budget_ns) {
    u32 ok;
    asm volatile(
        "{\n .reg .pred p;\n .reg .u64 t0, t1;\n"
        " mov.u64 t0, %%globaltimer;\n"
        "FMOE_MBAR_BWAIT:\n"
        " mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n"
        " @p bra FMOE_MBAR_BDONE;\n"
        " mov.u64 t1, %%globaltimer;\n"
        " sub.u64 t1, t1, t0;\n"
        " setp.gt.u64 p, t1, %3;\n"
        " @!p bra FMOE_MBAR_BWAIT;\n"
        " mov.u32 %0, 0;\n"
        " bra FMOE_MBAR_BEND;\n"
        "FMOE_MBAR_BDONE:\n"
        " mov.u32 %0, 1;\n"
        "FMOE_MBAR_BEND:\n}\n"
        : "=r"(ok)
        : "r"(smem_addr(bar)), "r"(parity), "l"(budget_ns)
        : "memory");
    return ok != 0;
}

struct TicketQueue {
    int4 slot[TQ];
    u64 full[TQ], empty[TQ];
    u32 taken[PHASE_THREADS / 32];  // each consumer warp's count of tasks taken (consume_counted)

    // One thread, before either role uses the queue (a block barrier must follow, after mbar_init_fence).
    FMOE_DEVICE void init() {
        for (int w = 0; w < PHASE_THREADS / 32; ++w) taken[w] = 0;
        for (int q = 0; q < TQ; ++q) {
            mbar_init(&full[q], 1);
            mbar_init(&empty[q], PHASE_THREADS / 32);
        }
    }
    // The producer warpgroup (pt: its thread index, 0 … 127): thread 0 waits for a free slot, takes a task with
    // next() (which may wait for the task's inputs) and publishes it; every producer thread returns it. The
    // warpgroup's own named barrier 1 keeps thread 0 from rewriting the slot before all have read it.
    template <class Next> FMOE_DEVICE int4 produce(u32 &qi, int pt, Next next) {
        const int q = qi % TQ;
        if (pt == 0) {
            mbar_wait(&empty[q], ((qi / TQ) & 1) ^ 1);  // a fresh barrier's previous phase counts as complete
            slot[q] = next();
            mbar_arrive(&full[q]);
        }
        asm volatile("barrier.sync 1, 128;\n" ::: "memory");
        int4 t = slot[q];
        t.x = __shfl_sync(0xffffffffu, t.x, 0);
        t.y = __shfl_sync(0xffffffffu, t.y, 0);
        t.z = __shfl_sync(0xffffffffu, t.z, 0);
        t.w = __shfl_sync(0xffffffffu, t.w, 0);
        ++qi;
        return t;
    }
    // Every consumer thread: the next task, or `timeout` when none came within budget_ns; the slot is released once
    // each consumer warp has read it.
    FMOE_DEVICE int4 consume(u32 &qi, u64 budget_ns, int4 timeout) {
        const int q = qi % TQ;
        const bool ok = __shfl_sync(0xffffffffu, (int)mbar_wait_budget(&full[q], (qi / TQ) & 1, budget_ns), 0) != 0;
        if (!ok) return timeout;
        int4 t = slot[q];
        t.x = __shfl_sync(0xffffffffu, t.x, 0);
        t.y = __shfl_sync(0xffffffffu, t.y, 0);
        t.z = __shfl_sync(0xffffffffu, t.z, 0);
        t.w = __shfl_sync(0xffffffffu, t.w, 0);
        __syncwarp();
        mbar_arrive_if(&empty[q], (FMOE_TID & 31) == 0);
        ++qi;
        return t;
    }
    // consume, with the warp's count kept in shared memory (taken) instead of a register held across the
    // consumers' whole task loop: the fp8 engine's storage-rows build with 256-row tiles spilled that register
    // (deepseek-v3, NVRTC 13.0). Only the warp reads and writes its count: a __syncwarp orders lane 0's write after
    // every lane's read, and before the next task's reads.
    FMOE_DEVICE int4 consume_counted(u64 budget_ns, int4 timeout) {
        const int w = (int)(FMOE_TID >> 5);
        u32 qi = *(volatile u32 *)&taken[w];
        const int4 t = consume(qi, budget_ns, timeout);
        __syncwarp();
        if ((FMOE_TID & 31) == 0) *(volatile u32 *)&taken[w] = qi;
        __syncwarp();
        return t;
    }
};

}  // namespace fmoe
