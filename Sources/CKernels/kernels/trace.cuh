// Tracing builds of the fused kernel (FMOE_TRACE=1, `flashmoe bench --trace`): every block records %globaltimer at
// the begin and end of its phases and of each gate, GEMM0, GEMM1, routed token and combine task into a device buffer, which the
// host decodes into a Chrome-trace timeline (Sources/FlashMoE/Fused/KernelTrace.swift). Without FMOE_TRACE every macro
// below compiles to nothing, so the one-line hooks in the phase headers cost the normal build nothing.
//
// Buffer (address and capacity in the module globals below, written by the host after loading the module, so Params
// does not change): per block (blockIdx.x), 4 header words then `fmoe_trace_capacity` events of 4 words each.
//   header[0]  events the block tried to record (those past the capacity are counted, not stored)
//   event[0]   begin (ns, %globaltimer)          event[1]  end (ns)
//   event[2]   kind << 56 | warp << 48 | expert << 32 (16 bits each, 0xffff / 0xff = none)
//   event[3]   a << 32 | b (the task's indices: row block and column tile, token tile and K slice, token)
// Block-level events are recorded by thread 0 and nest in time (a phase holds its tasks); combines and routed tokens
// are recorded by lane 0 of the warp that ran them (warp = its index in the block).
#pragma once
#include "common.cuh"

#ifndef FMOE_TRACE
#define FMOE_TRACE 0
#endif

// Event kinds (the host's FusedTrace.Kind has the same numbers).
#define FMOE_EV_GATE_PHASE 1    // gate tasks, routing, scan, until the scan is seen
#define FMOE_EV_GATE 2          // one gate task: expert tile `expert`, token tile a, K slice b (routing nests in it)
#define FMOE_EV_ROUTE 3         // routing token tile a
#define FMOE_EV_SCAN 4          // the scan of a token tiles' counts
#define FMOE_EV_PLACE 5         // placing the tokens' rows
#define FMOE_EV_BARRIER 6       // from the block's previous event to passing the grid barrier
#define FMOE_EV_EXPERT_PHASE 7  // expert tasks and combines until the block runs out of work
#define FMOE_EV_GEMM0 8         // GEMM0 of expert, row block a, column tile b
#define FMOE_EV_GEMM1 9         // GEMM1 of expert, row block a, column tile b
#define FMOE_EV_TASK_WAIT 10    // from the block's previous event to starting a GEMM1 (ticket and ring wait)
#define FMOE_EV_COMBINE 11      // one warp combining (a slice of) token a
#define FMOE_EV_ROUTE_TOKEN 12  // one warp routing token a (inside route: the rest of route is staging the logits)
#define FMOE_EV_RELEASE 13      // after a GEMM tile of expert, row block a, column tile b: counting it done (fp8:
                                // the h quantization by the block completing a row block; GEMM1: the combine list)

#if FMOE_TRACE
extern "C" __device__ u64 *fmoe_trace_buffer = nullptr;  // set by the host; null records nothing
extern "C" __device__ int fmoe_trace_capacity = 0;       // events per block
__shared__ u64 s_trace_last;                             // end of the block's last block-level event
__shared__ int s_trace_count;                            // the block's events so far (recorded or not)

namespace fmoe {

// Takes the block's next record (a shared counter, so the recorder does not wait for a global atomic) and writes
// an event's begin, kind and ids to it; the end is written by trace_end. The block's count (word 0 of its buffer)
// follows by an atomic max nobody waits for. Returns the record's index, or −1 when there is no buffer or it is
// full (the event is counted, not stored).
FMOE_DEVICE int trace_begin(u64 t0, int kind, int warp, int expert, int a, int b) {
    u64 *base = fmoe_trace_buffer;
    if (base == nullptr) return -1;
    u64 *block = base + (size_t)blockIdx.x * (4 + 4 * (size_t)fmoe_trace_capacity);
    const int i = atomicAdd(&s_trace_count, 1);
    atomicMax((unsigned long long *)block, (unsigned long long)(i + 1));
    if (i >= fmoe_trace_capacity) return -1;
    u64 *e = block + 4 + 4 * (size_t)i;
    e[0] = t0;
    e[1] = t0;
    e[2] = ((u64)(kind & 0xff) << 56) | ((u64)(warp & 0xff) << 48) | ((u64)(expert & 0xffff) << 32);
    e[3] = ((u64)(u32)a << 32) | (u64)(u32)b;
    return i;
}

FMOE_DEVICE void trace_end(int slot, u64 t1) {
    fmoe_trace_buffer[(size_t)blockIdx.x * (4 + 4 * (size_t)fmoe_trace_capacity) + 4 + 4 * (size_t)slot + 1] = t1;
}

// Thread 0's end of a block-level record (slot −1: not stored), which later block-level events start from.
FMOE_DEVICE void trace_end_block(int slot) {
    const u64 t1 = globaltimer_ns();
    if (slot >= 0) trace_end(slot, t1);
    s_trace_last = t1;
}

// Records [construction, destruction] for one recorder thread: thread 0 of the block, or lane 0 of each warp. The
// begin and the ids go to the record at construction, so across the scope only the record's index stays in a
// register (with the ids and the begin time held instead, the tracing build of the sm_90a kernel with both decode
// widths spilled: 32 bytes, NVRTC 13.0).
struct TraceScope {
    int slot;
    bool warp_level;
    FMOE_DEVICE TraceScope(int kind, int expert, int a, int b, bool warp_level_) : slot(-1), warp_level(warp_level_) {
        if (warp_level_ ? (FMOE_TID & 31) == 0 : FMOE_TID == 0)
            slot = trace_begin(globaltimer_ns(), kind, warp_level_ ? (int)(FMOE_TID >> 5) : 0xff, expert, a, b);
    }
    FMOE_DEVICE ~TraceScope() {
        if (warp_level ? (FMOE_TID & 31) != 0 : FMOE_TID != 0) return;
        if (!warp_level) trace_end_block(slot);
        else if (slot >= 0) trace_end(slot, globaltimer_ns());
    }
};

// TraceScope recorded by thread 0 whose record index waits in shared memory instead of a register, for scopes
// around register-heavy code: the fp8 TMA consumers' whole expert phase (LEVEL 0; with the index in a register
// ptxas spilled it, 8 B, round 35), and each tile inside it (LEVEL 1: a wide BF16 tile of their shared expert, and
// since round 37 their routed GEMM0 and GEMM1 tiles, whose indices in registers made deepseek-v3's tracing build
// spill 24 B instead of 8; phase_experts_tma_fp8.cuh). A level does not nest within itself.
__shared__ int s_trace_held_slot[2];
template <int LEVEL> struct TraceHeldScope {
    FMOE_DEVICE TraceHeldScope(int kind, int expert, int a, int b) {
        if (FMOE_TID == 0) s_trace_held_slot[LEVEL] = trace_begin(globaltimer_ns(), kind, 0xff, expert, a, b);
    }
    FMOE_DEVICE ~TraceHeldScope() {
        if (FMOE_TID == 0) trace_end_block(s_trace_held_slot[LEVEL]);
    }
};

// A block-level event from the end of the block's previous one (or the block's first event) until now.
FMOE_DEVICE void trace_wait(int kind) {
    if (FMOE_TID != 0) return;
    const u64 t1 = globaltimer_ns();
    const int slot = trace_begin(s_trace_last != 0 ? s_trace_last : t1, kind, 0xff, 0xffff, 0, 0);
    if (slot >= 0) trace_end(slot, t1);
    s_trace_last = t1;
}

// Every thread, before the block's first event; the first warp-level events come after block barriers.
FMOE_DEVICE void trace_block_start() {
    if (FMOE_TID == 0) {
        s_trace_last = 0;
        s_trace_count = 0;
    }
}

}  // namespace fmoe

#define FMOE_TRACE_CAT2(a, b) a##b
#define FMOE_TRACE_CAT(a, b) FMOE_TRACE_CAT2(a, b)
// One hook line each: a scope from here to the end of the enclosing block (C++ scope), recorded by thread 0.
#define FMOE_TRACE_SCOPE(kind, expert, a, b) \
    fmoe::TraceScope FMOE_TRACE_CAT(fmoe_trace_scope_, __LINE__)((kind), (expert), (a), (b), false)
// The same, recorded by lane 0 of every warp that runs it (warp-level tasks).
#define FMOE_TRACE_WARP_SCOPE(kind, a) \
    fmoe::TraceScope FMOE_TRACE_CAT(fmoe_trace_scope_, __LINE__)((kind), 0xffff, (a), 0, true)
// Scopes recorded by thread 0 with the record index in shared memory (TraceHeldScope): a phase, a tile inside it.
#define FMOE_TRACE_PHASE_SCOPE(kind) \
    fmoe::TraceHeldScope<0> FMOE_TRACE_CAT(fmoe_trace_scope_, __LINE__)((kind), 0xffff, 0, 0)
#define FMOE_TRACE_HELD_SCOPE(kind, expert, a, b) \
    fmoe::TraceHeldScope<1> FMOE_TRACE_CAT(fmoe_trace_scope_, __LINE__)((kind), (expert), (a), (b))
#define FMOE_TRACE_WAIT(kind) fmoe::trace_wait(kind)
#define FMOE_TRACE_START() fmoe::trace_block_start()
#else
#define FMOE_TRACE_SCOPE(kind, expert, a, b)
#define FMOE_TRACE_WARP_SCOPE(kind, a)
#define FMOE_TRACE_PHASE_SCOPE(kind)
#define FMOE_TRACE_HELD_SCOPE(kind, expert, a, b)
#define FMOE_TRACE_WAIT(kind)
#define FMOE_TRACE_START()
#endif
