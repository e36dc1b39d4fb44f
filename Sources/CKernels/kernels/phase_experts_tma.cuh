// Phase 3 on the sm_90a TMA engine (FMOE_TMA builds: 16-bit or fp8, one GPU; common.cuh): the same tickets, tiles,
// ring and counters as phase_experts.cuh, split between roles. The producer warpgroup (threads 256 … 383, which run
// no other phase) takes each ticket, waits for a GEMM1 tile's row block, hands the tile to the consumers through the
// ticket queue (tma_queue.cuh) and loads its k-slices by TMA (weights, h) or gathers them (x rows) into the ring,
// running ahead into the next tile while the consumers finish this one. The consumers (the 256 phase threads) run
// the wgmma mainloop and the epilogue straight from the accumulators, then count the tile exactly as the cp.async
// path does. Bits are the cp.async engine's: the same wgmma instructions in the same K order, the same epilogue
// arithmetic (Benchmarks/engine/tma_engine_test.cu checks both engines bit for bit). Precision fp8 runs its own
// producer and consumer loops on these roles (phase_experts_tma_fp8.cuh: tile pairs on tma_fp8_engine.cuh).
//
// Tiles that do not fit the ring protocol run the cp.async path unchanged: a launch of decode tiles (split > 1) runs
// phase_experts.cuh entirely (the producer leaves at once), and a ticket of an expert with at most GEMV_TOKENS rows
// (gemv_expert) is handed over as an "own" task: the consumers run gemv_task in the ring's shared memory while the
// producer waits for them (the own_done barrier) before it loads anything more.
#pragma once
#include "moe_params.cuh"
#include "phase_experts.cuh"

#if FMOE_TMA
#include "tma_engine.cuh"
#include "tma_queue.cuh"

namespace fmoe {

static_assert(FMOE_WGMMA && (FMOE_PREC == 2 || FMOE_PREC == 3 || FMOE_PREC == 4) && FMOE_RANKS == 1,
              "FMOE_TMA: sm_90a, bf16, fp16 or fp8, one GPU (the host chooses it only there)");

// The tensor maps of the TMA operands (a second kernel parameter, encoded by the host: FusedTensorMaps.swift):
// weights with boxes of 256 rows (fp8: FMOE_TMA_FP8_BN, over the experts' images), h with boxes of 128 (TmaTile). A
// 64-byte aligned CUtensorMap each.
struct __align__(64) TmaMap {
    u64 words[16];
};
struct TmaMaps {
    TmaMap w1;    // [E · N0, H]
    TmaMap w2;    // [E · H, I]
    TmaMap ws1;   // [N0S, H] (a copy of w1's when there is no shared expert: never read)
    TmaMap ws2;   // [H, IS]
    TmaMap hbuf;  // [row capacity, I]
    TmaMap hs;    // [max tokens, IS]
};

// Precision fp8: the fp8 engine's weight rows a tile (FMOE_TMA_FP8_BN, moe_params.cuh; set by the host, whose weight
// maps' boxes have as many rows) size the ring's stages (moe_params.cuh's RING_BN): STAGES of 128 + FMOE_TMA_FP8_BN
// rows.
constexpr int TMA_RING_STAGE_BYTES = FMOE_PREC == 4 ? (BM + FMOE_TMA_FP8_BN) * ROW_BYTES : TMA_STAGE_BYTES;
constexpr int TMA_RING_STAGES = EXPERT_RING_BYTES / TMA_RING_STAGE_BYTES;
typedef TmaEngine<MMA, TMA_RING_STAGES> ExpertTma;
// The registers of the producer warpgroup after setmaxnreg (FMOE_TMA_PRODUCER_REGS, 72 by default); the consumers,
// which run every phase, take the rest of what the launch gave the block: 168 a thread (the most 384 threads get
// under __launch_bounds__(384, 1)) × 384. setmaxnreg.inc waits until the pool has the registers, so a split that
// asks for more than the launch holds never returns (a producer at 80 hung that way): the static_assert.
// Measured (H200, 2026-12-02, Benchmarks/RESULTS.md round 14): 40 (consumers 232) spilled more in the producer and
// was slower (qwen3-30b-a3b S = 4096 0.996 against 0.946 ms, paper-e64 S = 8192 0.810 against 0.773); 72 (consumers
// 216) removes the spills of the producer's gather loop and was faster (0.924 – 0.929 and 0.755 – 0.759 against
// 0.946 – 0.949 and 0.770 – 0.774; default 0.901 – 0.909 and 0.735 – 0.738). Round 20, with the gathers' async
// arrivals (tma_engine.cuh): 0.905 → 0.897 ms at qwen3-30b-a3b S = 4096, same bits and verify passes; both switches
// the defaults since round 21 (the fuzzer and the sanitizers clean).
#ifndef FMOE_TMA_PRODUCER_REGS
#define FMOE_TMA_PRODUCER_REGS 72
#endif
constexpr int TMA_LAUNCH_REGS = 168 * BLOCK_THREADS;  // the block's register pool at launch
constexpr int TMA_PRODUCER_REGS_FUSED = FMOE_TMA_PRODUCER_REGS;
constexpr int TMA_CONSUMER_REGS_FUSED = (TMA_LAUNCH_REGS - 128 * TMA_PRODUCER_REGS_FUSED) / PHASE_THREADS / 8 * 8;
static_assert(PHASE_THREADS * TMA_CONSUMER_REGS_FUSED + 128 * TMA_PRODUCER_REGS_FUSED <= TMA_LAUNCH_REGS,
              "setmaxnreg: the roles' registers must fit the block's pool at launch, or setmaxnreg.inc never returns");
static_assert(TMA_PRODUCER_REGS_FUSED % 8 == 0 && TMA_PRODUCER_REGS_FUSED >= 24 && TMA_CONSUMER_REGS_FUSED <= 256,
              "setmaxnreg takes multiples of 8 in 24 … 256");

// A task of the queue: kind, expert (task space), row block, column tile.
enum TmaTaskKind { TASK_GEMM0 = 0, TASK_GEMM1 = 1, TASK_OWN0 = 2, TASK_OWN1 = 3, TASK_END = -1, TASK_FAIL = -2,
                   TASK_TIMEOUT = -3 };

// What the producer and the consumers share in this block, set up by the consumers before the hand-over.
struct TmaShared {
    TicketQueue tq;
    u64 ring_bars[2 * TMA_RING_STAGES];
    u64 own_done;           // count 1: the consumers finished an own task (the ring's memory is free again)
    u64 handover;           // count 256: the phase threads handed the expert phase over (tma_hand_over)
    const Layout *layout;   // the phases' Layout (forward's)
    const TmaMaps *maps;    // the kernel's tensor-map parameter
    int go;                 // 1: run the TMA expert phase; 0: the producer leaves
    int handed;             // the consumers have passed the hand-over (block-uniform after it)
};
__shared__ TmaShared s_tma;

// The tile the TMA engine runs for a GEMM0 or GEMM1 task.
FMOE_DEVICE TmaTile tma_tile(const Params &p, const Layout &L, const TmaMaps &maps, int kind, int x, int m, int n) {
    const bool shared = is_shared(L, x);
    const int rows = task_rows(p, L, x), row0 = m * BM;
    TmaTile t;
    t.map_a = nullptr;
    t.a_row0 = 0;
    t.a_index = nullptr;
    t.a_stride = 0;
    t.a_base = nullptr;
    t.a_rows = rows - row0;
    if (kind == TASK_GEMM0) {
        // B: the expert's W1 rows n·EBN … (packed gate/up blocks); A: x rows gathered by token.
        t.map_b = shared ? (const void *)&maps.ws1 : (const void *)&maps.w1;
        t.b_row0 = (shared ? 0 : x * N0) + n * EBN;
        t.a_base = (const char *)p.x;
        t.a_stride = (size_t)H * sizeof(T);
        if (shared) t.a_base += (size_t)row0 * t.a_stride;
        else t.a_index = p.row_token + L.row_start[x] + row0;
        t.k_bytes = H * (int)sizeof(T);
    } else {
        // B: the expert's W2 rows n·EBN …; A: its h rows by TMA (rows past the expert's are another expert's or
        // zero-filled past the buffer: they reach only output rows the epilogue masks).
        t.map_b = shared ? (const void *)&maps.ws2 : (const void *)&maps.w2;
        t.b_row0 = (shared ? 0 : x * H) + n * EBN;
        t.map_a = shared ? (const void *)&maps.hs : (const void *)&maps.hbuf;
        t.a_row0 = (shared ? 0 : L.row_start[x]) + row0;
        t.k_bytes = (shared ? IS : I) * (int)sizeof(T);
    }
    return t;
}

// The row block at GEMM1 ring position `pos` once published (the producer), or -1 when the wait expired (reported).
// As phase_experts.cuh: twice the budget, so an upstream wait is the one that expires and is reported.
FMOE_DEVICE int ring_row_block(const Params &p, int pos) {
    u64 entry = 0;
    if (!wait_at_least(&p.ring[pos], p.epoch << 32, p.err, 2 * p.budget_ns, FMOE_PHASE_TASK, pos, p.rank, &entry))
        return -1;
    // The row block's h was written by the generic proxy (fenced to the async proxy by its writers before they
    // counted it): ordered before this block's TMA reads of it.
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
    return (int)(entry & 0xffffffffull);
}

// FMOE_TMA_CONSUMER_TRAP 0 (default since round 23): a consumer whose wait for a task expires reports it and leaves
// the expert phase as after an expired ring wait (TASK_FAIL), its block's producer then ending in its own bounded
// waits (mbar_wait traps after 2 s), so every wait stays bounded; 1: it reports it and traps the launch. Why 0: with
// the trap in the fp8 consumers' loop, ptxas (CUDA 13.0) keeps that kernel's consumer code near 170 registers although
// setmaxnreg gives it 216, and it spills (NVRTC, qwen3-30b-a3b fp8: 520 B; the 256-row tiles 1,480 B, in their
// mainloop); without it, 56 B and 376 B, up to R213 like the bf16 TMA kernel, and the fp8 layer 4 – 10 % faster
// (round 23, Benchmarks/RESULTS.md).
#ifndef FMOE_TMA_CONSUMER_TRAP
#define FMOE_TMA_CONSUMER_TRAP 0
#endif

// The consumers' next task (every phase thread). The producer hands one over within twice the budget (its only long
// wait is the ring's, which reports and hands over TASK_FAIL); a consumer still waiting past that and a second means
// a broken protocol: reported, then the consumers leave the phase (or the launch traps: FMOE_TMA_CONSUMER_TRAP).
// COUNTED: the count in shared memory (TicketQueue::consume_counted; qi unused).
template <bool COUNTED = false> FMOE_DEVICE int4 next_task(const Params &p, u32 &qi) {
    const u64 budget = 2 * p.budget_ns + 1000000000ull;
    const int4 timeout = make_int4(TASK_TIMEOUT, 0, 0, 0);
    const int4 t = COUNTED ? s_tma.tq.consume_counted(budget, timeout) : s_tma.tq.consume(qi, budget, timeout);
    if (t.x == TASK_TIMEOUT) {
        report_error(p.err, FMOE_ERR_TIMEOUT, FMOE_PHASE_TASK, 0u, (u32)p.rank, 0ull, 0ull);
        if (FMOE_TMA_CONSUMER_TRAP) __trap();
        return make_int4(TASK_FAIL, 0, 0, 0);
    }
    return t;
}

// The consumers after an own task: its shared-memory writes (generic proxy) ordered before the producer's next TMA
// writes there, then the producer released (own_done).
FMOE_DEVICE void own_task_done() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    sync_block();
    if (FMOE_TID == 0) mbar_arrive(&s_tma.own_done);
}

// The producer warpgroup's expert phase: tickets in phase_experts.cuh's order (split 1), each handed over and, for
// the engine's tasks, loaded into the ring.
FMOE_DEVICE void expert_producer(const Params &p, const Layout &L, const TmaMaps &maps, char *smem) {
    const int pt = (int)FMOE_TID - PHASE_THREADS;
    ExpertTma eng;
    eng.attach(smem, s_tma.ring_bars);
    if (pt == 0) {
        tma_prefetch_map(&maps.w1);
        tma_prefetch_map(&maps.w2);
        tma_prefetch_map(&maps.hbuf);
    }
    const int t0_total = L.task0_start[L.xs];
    const int rbs = L.rb_start[L.xs];
    const int total = t0_total + rbs * NT1;
    u32 qi = 0, owns = 0;
    for (;;) {
        const int4 t = s_tma.tq.produce(qi, pt, [&]() -> int4 {
            const int ticket = atomicAdd(&p.sync->ticket, 1);
            if (ticket >= total) return make_int4(TASK_END, 0, 0, 0);
            if (ticket < t0_total) {
                const int x = find_segment(L.task0_start, L.xs, ticket);
                const int mt = L.rb_start[x + 1] - L.rb_start[x];
                const int local = ticket - L.task0_start[x];
                return make_int4(gemv_expert(L, x) ? TASK_OWN0 : TASK_GEMM0, x, local % mt, local / mt);
            }
            int pos, n;
            gemm1_ring_slot(ticket - t0_total, rbs, RING_GROUP, NT1, pos, n);
            // ring_row_block's steps, inline: calling it changed this kernel's code (NVRTC 13.0, round 22), and the
            // measured and verified kernel is this one.
            u64 entry = 0;
            if (!wait_at_least(&p.ring[pos], p.epoch << 32, p.err, 2 * p.budget_ns, FMOE_PHASE_TASK, pos, p.rank,
                               &entry))
                return make_int4(TASK_FAIL, 0, 0, 0);
            asm volatile("fence.proxy.async.global;\n" ::: "memory");
            const int rb = (int)(entry & 0xffffffffull);
            const int x = find_segment(L.rb_start, L.xs, rb);
            return make_int4(gemv_expert(L, x) ? TASK_OWN1 : TASK_GEMM1, x, rb - L.rb_start[x], n);
        });
        if (t.x < 0) break;
        if (t.x >= TASK_OWN0) {
            // The consumers run this tile in the ring's memory: load nothing until they are done.
            mbar_wait(&s_tma.own_done, owns & 1);
            ++owns;
            continue;
        }
        eng.produce(tma_tile(p, L, maps, t.x, t.y, t.z, t.w));
    }
}

// The consumers' expert phase (the 256 phase threads), after the hand-over; returns as expert_phase does.
FMOE_DEVICE bool expert_consumers(const Params &p, const Layout &L, const TmaMaps &maps, char *smem) {
    FMOE_TRACE_SCOPE(FMOE_EV_EXPERT_PHASE, -1, 0, 0);
    ExpertTma eng;
    eng.attach(smem, s_tma.ring_bars);
    const int rbs = L.rb_start[L.xs];
    u32 qi = 0;
    for (;;) {
        const int4 t = next_task(p, qi);
        if (t.x == TASK_FAIL) return false;
        if (t.x == TASK_END) break;
        const int kind = t.x, x = t.y, m = t.z, n = t.w;
        const int rb = L.rb_start[x] + m;
        // GEMM0 and GEMM1 each inline their own mainloop: one shared call site (the task kind chosen at run time)
        // compiles to different code (nvdisasm, 2026-12-02), and the measured and verified kernel is this one.
        if (kind == TASK_GEMM0 || kind == TASK_OWN0) {
            if (kind == TASK_GEMM0) {
                FMOE_TRACE_SCOPE(FMOE_EV_GEMM0, x, m, n);
                float acc[128];
                eng.consume(tma_tile(p, L, maps, TASK_GEMM0, x, m, n), acc);
                gemm0_store_acc(p, L, x, m, n, acc);
            } else {
                gemv_task(p, L, 0, x, n, 0, 1, smem);
            }
            // h is read by other blocks' TMA (the async proxy): fenced to it before the tile is counted.
            asm volatile("fence.proxy.async.global;\n" ::: "memory");
            FMOE_TRACE_SCOPE(FMOE_EV_RELEASE, x, m, n);
            count_gemm0_tile(p, rb, is_shared(L, x) ? NT0S : NT0);
        } else {
            if (kind == TASK_GEMM1) {
                FMOE_TRACE_SCOPE(FMOE_EV_GEMM1, x, m, n);
                float acc[128];
                eng.consume(tma_tile(p, L, maps, TASK_GEMM1, x, m, n), acc);
                gemm1_store_acc(p, L, x, m, n, acc);
            } else {
                gemv_task(p, L, 1, x, n, 0, 1, smem);
            }
            FMOE_TRACE_SCOPE(FMOE_EV_RELEASE, x, m, n);
            count_gemm1_tile(p, L, x, m, rb, NT1);
        }
        if (kind >= TASK_OWN0) own_task_done();
    }
    return sync_block_and(drain_combines(p, gemm1_done_target(rbs, NT1))) != 0;
}

}  // namespace fmoe
// Precision fp8's producer and consumers (expert_producer_fp8, expert_consumers_fp8), on this file's roles and queue.
#include "phase_experts_tma_fp8.cuh"
namespace fmoe {

// The launch's start, every thread of both roles: consumer thread 0 initialises the hand-over barrier, then named
// barrier 2 (the one time the roles meet on a named barrier) makes it visible to the producer.
FMOE_DEVICE void tma_rendezvous() {
    if (FMOE_TID == 0) {
        mbar_init(&s_tma.handover, PHASE_THREADS);
        mbar_init_fence();
    }
    asm volatile("barrier.sync 2, 384;\n" ::: "memory");
}

// Arrivals that release a ring stage: the engine's that runs the expert tiles.
#if FMOE_TMA && FMOE_PREC == 4
constexpr int RING_EMPTY_ARRIVALS = ExpertTmaFp8::EMPTY_ARRIVALS;
#else
constexpr int RING_EMPTY_ARRIVALS = ExpertTma::EMPTY_ARRIVALS;
#endif

// The consumers' side of the hand-over (every phase thread, once per launch, block-uniform): thread 0 initialises the
// queue and ring barriers and writes what the producer needs; every phase thread arrives on the hand-over barrier,
// which the producer has waited on since the launch's start (each arrive a release of that thread's writes, the
// producer's wait an acquire). The consumers' own barrier then makes the queue's initialisation theirs. `go` false
// releases the producer with nothing to do (a decode launch, or a launch that ends early).
FMOE_DEVICE void tma_hand_over(const Layout *L, bool go) {
    if (FMOE_TID == 0) {
        if (go) {
            // The ring's barriers as TmaEngine::init_barriers sets them; calling it here (with own_done moved
            // before it) compiles to different code (nvdisasm, 2026-12-02) than the kernel measured and verified.
            s_tma.tq.init();
            for (int s = 0; s < TMA_RING_STAGES; ++s) {
                mbar_init(&s_tma.ring_bars[s], TMA_FULL_ARRIVALS);
                mbar_init(&s_tma.ring_bars[TMA_RING_STAGES + s], RING_EMPTY_ARRIVALS);
            }
            mbar_init(&s_tma.own_done, 1);
#if FMOE_TMA && FMOE_PREC == 4
            if (ExpertTmaFp8::GROUPED) ExpertTmaFp8::init_groups();  // the A scales' groups (tma_fp8_engine.cuh)
#endif
            mbar_init_fence();
        }
        s_tma.layout = L;
        s_tma.go = go;
        s_tma.handed = 1;
    }
    // Every phase thread releases its own writes (the Layout, placement's tables) to the producer; thread 0's
    // arrive follows its writes above.
    mbar_arrive(&s_tma.handover);
    sync_block();
}

// The consumers' expert phase in a FMOE_TMA build: the hand-over, then this file's phase, or phase_experts.cuh's
// for a launch of decode tiles.
FMOE_DEVICE bool expert_phase_tma(const Params &p, const Layout &L, const TmaMaps &maps, char *smem) {
    const bool tma = expert_split(L.task0_start[L.xs]) == 1;
    tma_hand_over(&L, tma);
#if FMOE_PREC == 4
    return tma ? expert_consumers_fp8(p, L, maps, smem) : expert_phase(p, L, smem);
#else
    return tma ? expert_consumers(p, L, maps, smem) : expert_phase(p, L, smem);
#endif
}

// The producer warpgroup's whole launch (threads 256 … 383 from the kernel's entry): wait for the hand-over, then
// produce, or leave. The wait spans the gate phase and the grid barrier, whose own waits are bounded by the budget
// (and report): past four budgets and a second the protocol itself is broken, and the launch traps rather than hang.
// `p` is the kernel's parameter (its budget is readable before the consumers copy it), `sp` the phases' copy.
FMOE_DEVICE void tma_producer_main(const Params &p, const Params &sp, const TmaMaps &maps, char *smem) {
    regs_dealloc<TMA_PRODUCER_REGS_FUSED>();
    tma_rendezvous();
    if (!mbar_wait_budget(&s_tma.handover, 0, 4 * p.budget_ns + 1000000000ull)) __trap();
#if FMOE_PREC == 4
    if (s_tma.go) expert_producer_fp8(sp, *s_tma.layout, maps, smem);
#else
    if (s_tma.go) expert_producer(sp, *s_tma.layout, maps, smem);
#endif
}
}  // namespace fmoe
#endif
