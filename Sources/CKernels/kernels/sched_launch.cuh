// One launch from end to end: the phases in order (one GPU or ranks), and the single-GPU launch's last block
// out (error mirror, device epoch and its wrap). See moe.cu.
#pragma once
#include "moe_params.cuh"
#include "phase_gate.cuh"
#include "phase_experts.cuh"
#include "phase_experts_tma.cuh"

namespace fmoe {

// One launch, all phases. One GPU: gate → scan → place → grid barrier → experts + combine. Ranks: gate → scan →
// count all-gather → dispatch → experts (starting per row block as its rows land) → the source combines.
FMOE_DEVICE void forward(const Params &p, char *smem) {
    __shared__ Layout L;
    stamp(p, 0);
    FMOE_TRACE_START();
    if (!gate_phase(p, smem, L)) return;
    if (RANKS == 1) {
        load_layout(p, L);
        stamp(p, 2);
        if (!decode_prefix(p)) {
            if (FMOE_STOP_AFTER != 1) {  // timing variant 1 skips placement
                if (PLACE_PAIRS) place_pairs(p, L, cta(), ctas());
                else place_phase(p, L, cta(), ctas());
            }
            stamp(p, 3);
            if (!grid_barrier(&p.sync->barrier, p.epoch, 1, 1, p.err, p.budget_ns, 0)) return;
            FMOE_TRACE_WAIT(FMOE_EV_BARRIER);
        } else if (FMOE_TID == 0) {
            // The decode prefix placed everything before the scan flag, so there is no barrier to wait for; the
            // block still arrives, so the monotone barrier counter keeps its count for the launches after this.
            atomicAdd(&p.sync->barrier, 1ull);
        }
        stamp(p, 4);
#if FMOE_TMA
        if (FMOE_STOP_AFTER == 0) expert_phase_tma(p, L, *s_tma.maps, smem);  // timing variants stop before
#else
        if (FMOE_STOP_AFTER == 0) expert_phase(p, L, smem);  // timing variants stop before the experts
#endif
        stamp(p, 5);
    } else {
        if (!rank_layout(p, L)) return;
        stamp(p, 10);
        prepare_tiles(p, L);
        if (!dispatch_rows(p, L, smem)) return;
        stamp(p, 11);
        if (FMOE_STOP_AFTER == 0 && !expert_phase(p, L, smem)) return;
        // The rank's last block out checks every flag it received, resets the gate counters for the next launch
        // (every block of the rank has left the gate phase by then) and tells the peers this rank is done. The
        // same done_epoch is the rank's device epoch: the next launch starts from it (fmoe_forward_ranks), and
        // every block of this launch read it at entry, before arriving here. The fence orders the resets before
        // it, for the next launch and for peers that wait on it before writing into this rank.
        if (last_arrival(&p.sync->exit_count, ctas()) && check_row_flags(p) && FMOE_TID == 0) {
            stamp(p, 13, true);
            p.sync->gate_ticket = 0;
            p.sync->tiles_done = 0;
            p.sync->exit_count = 0;
            p.sync->xq_ready = 0;  // fp8: every block of the rank has passed its dispatch wait
            for (int i = 0; i < (p.tokens + BT - 1) / BT; ++i) p.tile_done[i] = 0;
            fence_sys();
            st_relaxed_sys_u64(&p.sync->done_epoch, p.epoch);
        }
    }
}

// One GPU, after forward (every block gets here: exits are block-uniform, aborted launches included). The last
// block out (the exit counter reaching the grid) copies a nonzero error record to the host-mapped mirror, so no
// fault is lost even when the host never waits for this launch (a graph replay), and stores this launch's epoch
// as the device epoch the next launch on the stream starts from. The launch whose epoch reaches the wrap first
// clears every epoch-tagged word (ring, combine list, scan flag, barrier counter) and stores 0: the 32-bit epoch
// tags restart from 1 with no host involvement.
FMOE_DEVICE void finish_launch(const Params &p) {
    if (!last_arrival(&p.sync->exit_count, (int)gridDim.x)) return;
    const bool wrap = p.epoch >= p.epoch_wrap;
    if (wrap) {
        for (int i = FMOE_TID; i < p.row_blocks; i += THREADS) p.ring[i] = 0;
        for (int i = FMOE_TID; i < p.max_tokens; i += THREADS) p.combine_list[i] = 0;
    }
    // Phase-1 counters, for the next launch: every block has left the gate phase (the decode prefix has no grid
    // barrier after which one block could reset them while another still takes a gate ticket).
    for (int i = FMOE_TID; i < (p.tokens + BT - 1) / BT; i += THREADS) p.tile_done[i] = 0;
    sync_block();
    if (FMOE_TID == 0) {
        p.sync->gate_ticket = 0;
        p.sync->tiles_done = 0;
        if (p.err_mirror != nullptr) mirror_error(p.err, p.err_mirror);
        if (wrap) {
            p.sync->barrier = 0;
            p.sync->scan_done = 0;
        }
        p.sync->exit_count = 0;
        p.sync->epoch = wrap ? 0 : p.epoch;
    }
}

}  // namespace fmoe
