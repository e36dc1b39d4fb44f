// Bounded waits, the error record, and the grid barrier.
//
// Every spin in FlashMoE has a time budget (%globaltimer). On expiry the waiting thread records what it waited
// for in the error record (first error wins) and raises the abort flag; every other spin sees the flag and gives
// up at once, so the whole persistent grid exits within one budget and the host turns the record into a typed
// error instead of hanging the GPU.
#pragma once
#include "common.cuh"

// What the host reads back after a launch. Layout mirrored in Swift (FusedErrorRecord).
struct ErrorRecord {
    u32 code;      // 0 = ok, else one of FMOE_ERR_*
    u32 phase;     // FMOE_PHASE_*: where the wait was
    u32 index;     // which flag: row block, tile, barrier number...
    u32 rank;      // rank whose wait expired (0 on one GPU)
    u64 expected;  // the value waited for
    u64 seen;      // the last value seen
    u32 abort;     // set once any thread failed; spins check it
    u32 pad;
};

#define FMOE_ERR_TIMEOUT 1u
#define FMOE_ERR_ABORTED 2u
#define FMOE_ERR_BAD_EXPERT 3u
#define FMOE_ERR_BAD_FLAG 4u     // a (source, expert) flag of this epoch carried the wrong row count
#define FMOE_ERR_EPOCH_LIMIT 5u  // ranks: a launch past epoch_wrap (expected = epoch_wrap, seen = its epoch) ran nothing

#define FMOE_PHASE_SCAN 1u       // waiting for the routing scan to be published
#define FMOE_PHASE_BARRIER 2u    // grid barrier
#define FMOE_PHASE_TASK 3u       // waiting for a GEMM1 row block to be published
#define FMOE_PHASE_DISPATCH 4u   // waiting for a source's row flag (index = source · E + expert)
// (5 was a wait for returned results; returns are counted per token instead, see complete_row_block.)
#define FMOE_PHASE_COMBINE 6u    // waiting for a token to be pushed to the combine list
#define FMOE_PHASE_COUNTS 7u     // waiting for a rank's per-expert counts (index = that rank)
#define FMOE_PHASE_PEER_DONE 8u  // waiting for a peer to finish the previous launch (index = that rank)
#define FMOE_PHASE_TILES 9u      // waiting for this rank's token tiles to be prepared (index = tile, or tile count)
#define FMOE_PHASE_GATE 10u      // a route task waiting for its token tile's gate tasks (index = tile)
#define FMOE_PHASE_XQ 11u        // ranks, fp8: dispatch waiting for the rank's blocks to quantize x (index = blocks)

// The abort flag may be raised by a rank on another GPU: a volatile load (relaxed, system scope) sees it.
FMOE_DEVICE bool aborted(const ErrorRecord *err) {
    return *(volatile const u32 *)&err->abort != 0;
}

// First error wins. System-scope atomics: with ranks on several GPUs all of them share one record (on the first
// GPU), so the claim and the abort flag must be atomic against every device.
FMOE_DEVICE void report_error(ErrorRecord *err, u32 code, u32 phase, u32 index, u32 rank, u64 expected, u64 seen) {
    if (atom_cas_sys_u32(&err->code, 0u, code) == 0u) {
        err->phase = phase;
        err->index = index;
        err->rank = rank;
        err->expected = expected;
        err->seen = seen;
    }
    __threadfence_system();
    st_relaxed_sys_u32(&err->abort, 1u);
}

// One GPU: copies a nonzero error record to the host-mapped mirror (run by the launch's last block out, after
// every other block; see finish_launch). The code goes last, so a host that sees it sees the rest.
FMOE_DEVICE void mirror_error(const ErrorRecord *err, ErrorRecord *mirror) {
    const volatile ErrorRecord *e = err;
    const u32 code = e->code;
    if (code == 0u) return;
    volatile ErrorRecord *m = mirror;
    m->phase = e->phase;
    m->index = e->index;
    m->rank = e->rank;
    m->expected = e->expected;
    m->seen = e->seen;
    m->abort = 1u;
    __threadfence_system();
    m->code = code;
    __threadfence_system();
}

// Spins until *flag >= target (a monotone 64-bit counter or epoch-tagged flag, or a rank's own 32-bit counter of
// this launch). Returns false when the budget expired or another thread aborted; the caller must then leave the
// kernel. Acquire: the fence after the successful load orders the caller's later reads after the writer's
// release. SYS: the flag is written by another rank (maybe another GPU), so the load and the fence are
// system-scoped. `seen_out`, when given, receives the value that ended the wait (a ring entry's row block), so the
// caller needs no second load of the flag.
template <bool SYS = false, class W>
FMOE_DEVICE bool wait_at_least(const W *flag, W target, ErrorRecord *err, u64 budget_ns, u32 phase, u32 index,
                               u32 rank, W *seen_out = nullptr) {
    W seen = ld_flag<SYS>(flag);
    if (seen < target) {
        const u64 start = globaltimer_ns();
        u32 spins = 0;
        while ((seen = ld_flag<SYS>(flag)) < target) {
            // The abort flag every 16th spin, the clock every 64th: a spin is then one load, not two in a row, so
            // a wait ends sooner after its flag is written (decode's routing is a chain of such waits).
            if ((++spins & 15u) == 0) {
                if (aborted(err)) return false;
                if ((spins & 63u) == 0 && globaltimer_ns() - start > budget_ns) {
                    report_error(err, FMOE_ERR_TIMEOUT, phase, index, rank, (u64)target, (u64)seen);
                    return false;
                }
            }
            __nanosleep(64);  // no sleep measured the same (Benchmarks/RESULTS.md, round 8)
        }
    }
    fence_at<SYS>();
    if (seen_out != nullptr) *seen_out = seen;
    return true;
}

// How a block releases its threads' writes before thread 0 counts or flags them (FMOE_RELEASE_FENCE). 1: the block
// barrier, then thread 0's fence.acq_rel.gpu: each thread's writes precede the barrier, the barrier synchronizes
// the threads with thread 0, and the fence before thread 0's count makes the count a release of all of them (the
// PTX memory model's release pattern; cooperative groups' grid sync uses the same shape). 0, round 17's form: every
// thread's __threadfence() before the barrier, which is fence.sc.gpu (MEMBAR.SC.GPU in the SASS), the strongest and
// slowest fence, paid by every thread at every count.
#ifndef FMOE_RELEASE_FENCE
#define FMOE_RELEASE_FENCE 1
#endif

// Every thread; thread 0 then counts or flags (relaxed) what the block wrote.
FMOE_DEVICE void release_block_writes() {
#if FMOE_RELEASE_FENCE
    sync_block();
    if (FMOE_TID == 0) fence_gpu();
#else
    __threadfence();
    sync_block();
#endif
}

// Counts this block's task (`tasks` of them at once: the fp8 TMA engine's tile pairs) on `counter`, which `arrivals`
// tasks reach in all (a token tile's route tasks, a row block's GEMM1 tiles, a launch's blocks); true, block-uniform,
// in the block whose count is the last. Release: release_block_writes before the count; acquire: the last block
// fences after it, so it reads every counted task's writes.
FMOE_DEVICE bool last_arrival(int *counter, int arrivals, int tasks = 1) {
    __shared__ int s_last_arrival;
    release_block_writes();
    if (FMOE_TID == 0) {
        s_last_arrival = atomicAdd(counter, tasks) == arrivals - tasks;
        if (s_last_arrival) fence_gpu();
    }
    sync_block();
    return s_last_arrival != 0;
}

// Grid barrier on a monotone 64-bit counter that is never reset: barrier number `n` of launch epoch `epoch`
// completes when the counter reaches ((epoch − 1) · barriers_per_launch + n) · gridDim.x. Arrival is a release
// (fence, then atomicAdd); waiting is an acquire (wait_at_least fences after the load).
FMOE_DEVICE bool grid_barrier(u64 *counter, u64 epoch, u32 barriers_per_launch, u32 n, ErrorRecord *err,
                              u64 budget_ns, u32 rank) {
    sync_block();
    __shared__ int ok;
    if (FMOE_TID == 0) {
        const u64 target = ((epoch - 1) * barriers_per_launch + n) * (u64)gridDim.x;
        fence_gpu();
        atomicAdd(counter, 1ull);
        ok = wait_at_least(counter, target, err, budget_ns, FMOE_PHASE_BARRIER, n, rank);
    }
    sync_block();
    return ok != 0;
}
