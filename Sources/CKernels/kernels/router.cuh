// The router: one warp turns a token's gate logits into its k (expert, weight) pairs.
//
// The rules are the CPU oracle's (RouterConfig in Swift), in FP32:
//   - an expert is eligible when its logit is not NaN; a NaN never becomes an index;
//   - softmax: probabilities over eligible experts (the limit when the largest logit is ±∞); experts are chosen by
//     logit, k rounds of arg-max, ties to the lower index;
//   - sigmoid (DeepSeek-V3): s = sigmoid(l), choice score s + bias; with groups, a group scores the sum of its two
//     best choice scores, the best `groups kept` groups survive and experts of the other groups are no longer
//     candidates (transformers 5.x masks them with −inf); the weight is the unbiased s;
//   - fewer than k eligible experts leave the last ranks unrouted (id −1, weight 0);
//   - optional renormalisation (sigmoid adds 1e-20 to the sum), then the scaling factor.
#pragma once
#include "common.cuh"

namespace fmoe {

constexpr int NONE = 0x7fffffff;  // no expert (or group)

// One warp routes one token whose logits routing_tasks.cuh staged in shared memory (row l, E floats; entry E is the
// shared expert's gate logit when there is one). Lane q owns experts q, q + 32, q + 64, ... Every rule and every
// rounding is the sequential one's (the CPU oracle's order): the top-k is the unique sorted top-k of the order
// "larger value first, then lower index", found in k rounds of a warp arg-max (redux.sync on order-preserving keys) instead of an insertion sort;
// group scores are each group's two best choice scores; the softmax denominator is summed by lane 0 in expert
// order. So the ids and weights have the bits a one-thread-per-token router gave, whose serial chain decode paid
// on its critical path (H200, commit 38496f6: 57 µs to route qwen3-30b-a3b's one token, 188 µs for DeepSeek-V3's
// tile of 64).
template <int E, int K, int SCORING, int GROUPS, int GROUPS_KEPT, bool RENORM> struct WarpRouter {
    static constexpr int NPL = (E + 31) / 32;          // experts per lane
    static constexpr int GS = E / GROUPS;              // experts per group
    static constexpr int GPL = (GROUPS + 31) / 32;     // groups per lane

    static FMOE_DEVICE float sigmoid(float l) { return 1.f / (1.f + expf(-l)); }

    // A float's order as an unsigned key (a larger value, a larger key), for the warp's redux.sync: -0 counts as
    // +0 (the order compares values, so they tie) and NaN maps to 0, the key of "no candidate" (a NaN is never
    // eligible; a NaN choice score could only come from a non-finite selection bias, which the non-finite rules
    // exclude, docs/nonfinite.md).
    static FMOE_DEVICE u32 order_key(float v) {
        if (v != v) return 0u;
        const u32 u = __float_as_uint(v + 0.f);
        return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    }
    static FMOE_DEVICE u32 warp_max(u32 v) {
        u32 r;
        asm volatile("redux.sync.max.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(v));
        return r;
    }
    static FMOE_DEVICE u32 warp_min(u32 v) {
        u32 r;
        asm volatile("redux.sync.min.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(v));
        return r;
    }

    // The warp's arg-max from each lane's best (key, index) (key 0: none): the largest key, then
    // the lowest index holding it. Every lane returns the winner's index, or NONE when no lane has a candidate.
    static FMOE_DEVICE int warp_best(u32 key, int i) {
        const u32 top = warp_max(key);
        if (top == 0u) return NONE;
        return (int)warp_min(key == top ? (u32)i : 0xffffffffu);
    }

    // l: the token's row (shared memory; entries [0, E) are overwritten as scratch); bias: DeepSeek's selection
    // bias or null. Every lane returns the same ids and weights.
    static FMOE_DEVICE void route(float *l, const float *bias, int lane, int (&ids)[K], float (&weights)[K]) {
        float raw[NPL], score[NPL];
        bool cand[NPL];
#pragma unroll
        for (int j = 0; j < NPL; ++j) {
            const int e = lane + 32 * j;
            raw[j] = e < E ? l[e] : 0.f;
            cand[j] = e < E && !(raw[j] != raw[j]);  // NaN is never eligible
            score[j] = raw[j];
        }
        __syncwarp();  // every lane has read its logits before any overwrites the row
        float m = -FMOE_INF, norm = 0.f;
        if (SCORING == 0) {
#pragma unroll
            for (int j = 0; j < NPL; ++j)
                if (cand[j]) m = fmaxf(m, raw[j]);
#pragma unroll
            for (int d = 16; d >= 1; d >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, d));
            // The denominator's terms (0 for NaN: adding +0 to a non-negative sum changes nothing), summed by lane
            // 0 in expert order as the sequential router did.
            const bool inf = m == FMOE_INF || m == -FMOE_INF;
#pragma unroll
            for (int j = 0; j < NPL; ++j) {
                const int e = lane + 32 * j;
                if (e < E) l[e] = cand[j] ? (inf ? (raw[j] == m ? 1.f : 0.f) : expf(raw[j] - m)) : 0.f;
            }
            __syncwarp();
            if (lane == 0) {
#pragma unroll 16
                for (int e = 0; e < E; ++e) norm += l[e];  // unrolled: the loads issue ahead of the serial adds
            }
            norm = __shfl_sync(0xffffffffu, norm, 0);
        } else {
#pragma unroll
            for (int j = 0; j < NPL; ++j) {
                const int e = lane + 32 * j;
                if (cand[j]) score[j] = bias != nullptr ? sigmoid(raw[j]) + bias[e] : sigmoid(raw[j]);
            }
            if (GROUPS > 1) {
                // Choice scores to the row, NaN for the ineligible (with a finite bias, the only NaN), then each
                // lane scores its groups in expert order, the sequential rule: the sum of the two best eligible
                // scores, the best alone if only one is eligible.
#pragma unroll
                for (int j = 0; j < NPL; ++j) {
                    const int e = lane + 32 * j;
                    if (e < E) l[e] = cand[j] ? score[j] : __int_as_float(0x7fc00000);
                }
                __syncwarp();
                float gscore[GPL];
#pragma unroll
                for (int q = 0; q < GPL; ++q) {
                    const int g = lane + 32 * q;
                    float t1 = -FMOE_INF, t2 = -FMOE_INF;
                    int n = 0;
                    if (g < GROUPS) {
                        for (int i = 0; i < GS; ++i) {
                            const float c = l[g * GS + i];
                            if (c != c) continue;
                            ++n;
                            if (c > t1) { t2 = t1; t1 = c; } else if (c > t2) { t2 = c; }
                        }
                    }
                    gscore[q] = n == 0 ? -FMOE_INF : (n == 1 ? t1 : t1 + t2);
                }
                // The kept groups: GROUPS_KEPT rounds of arg-max over the group scores (ties to the lower group).
                unsigned long long kept_lo = 0, kept_hi = 0;
                for (int r = 0; r < GROUPS_KEPT; ++r) {
                    u32 best = 0u;
                    int bg = NONE;
#pragma unroll
                    for (int q = 0; q < GPL; ++q) {  // groups ascending: strictly larger keys win ties to the lower
                        const int g = lane + 32 * q;
                        const bool done = g >= GROUPS || (g < 64 ? (kept_lo >> g & 1) : (kept_hi >> (g - 64) & 1));
                        const u32 key = done ? 0u : order_key(gscore[q]);
                        if (key > best) { best = key; bg = g; }
                    }
                    bg = warp_best(best, bg);
                    if (bg == NONE) break;
                    if (bg < 64) kept_lo |= 1ull << bg; else kept_hi |= 1ull << (bg - 64);
                }
#pragma unroll
                for (int j = 0; j < NPL; ++j) {
                    const int g = (lane + 32 * j) / GS;
                    const bool keep = g < 64 ? (kept_lo >> g & 1) : (kept_hi >> (g - 64) & 1);
                    cand[j] = cand[j] && keep;
                }
            }
        }
        // The top k: k rounds of a warp arg-max over the lanes' best remaining candidates; the owner retires it.
        u32 key[NPL];
#pragma unroll
        for (int j = 0; j < NPL; ++j) key[j] = cand[j] ? order_key(score[j]) : 0u;
        int bi[K];
        float bv_raw[K];
#pragma unroll
        for (int r = 0; r < K; ++r) {
            u32 best = 0u;
            int i = NONE;
#pragma unroll
            for (int j = 0; j < NPL; ++j)  // experts ascending: strictly larger keys win ties to the lower index
                if (key[j] > best) { best = key[j]; i = lane + 32 * j; }
            i = warp_best(best, i);
            bi[r] = i;
            float mine = 0.f;
#pragma unroll
            for (int j = 0; j < NPL; ++j)
                if (i == lane + 32 * j) { key[j] = 0u; mine = raw[j]; }
            bv_raw[r] = __shfl_sync(0xffffffffu, mine, i == NONE ? 0 : (i & 31));
        }
        const bool inf = m == FMOE_INF || m == -FMOE_INF;
#pragma unroll
        for (int j = 0; j < K; ++j) {
            ids[j] = bi[j] == NONE ? -1 : bi[j];
            float w = 0.f;
            if (bi[j] != NONE) {
                const float v = bv_raw[j];
                w = SCORING == 0 ? (inf ? (v == m ? 1.f / norm : 0.f) : expf(v - m) / norm) : sigmoid(v);
            }
            weights[j] = w;
        }
        if (RENORM) {
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < K; ++j) sum += weights[j];
            if (SCORING == 1) sum += 1e-20f;
#pragma unroll
            for (int j = 0; j < K; ++j) weights[j] = ids[j] < 0 ? 0.f : weights[j] / sum;
        }
#pragma unroll
        for (int j = 0; j < K; ++j) weights[j] *= (float)FMOE_SCALE;
    }
};

}  // namespace fmoe
