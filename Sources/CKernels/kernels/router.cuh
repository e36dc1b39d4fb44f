// The router: one thread turns a token's gate logits into its k (expert, weight) pairs.
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

constexpr int NONE = 0x7fffffff;

// Total order used by every top-k: larger value first, then lower index; NONE loses to everything.
FMOE_DEVICE bool better(float v, int i, float bv, int bi) {
    if (i == NONE) return false;
    if (bi == NONE) return true;
    return v > bv || (v == bv && i < bi);
}

// Sequential passes over the token's logits (staged in shared memory by route_tile), a running top-k kept sorted
// by the `better` order. Sums run in expert order, like the oracle's; a tile's 128 tokens route in parallel.
template <int E, int K, int SCORING, int GROUPS, int GROUPS_KEPT, bool RENORM> struct ThreadRouter {
    static constexpr int GS = E / GROUPS;

    // Inserts (v, e) into the sorted top-k (bv, bi); a displaced entry moves down, the last one falls off.
    static FMOE_DEVICE void insert(float (&bv)[K], int (&bi)[K], float v, int e) {
#pragma unroll
        for (int j = 0; j < K; ++j) {
            if (better(v, e, bv[j], bi[j])) {
                const float tv = bv[j];
                const int ti = bi[j];
                bv[j] = v; bi[j] = e;
                v = tv; e = ti;
            }
        }
    }

    static FMOE_DEVICE float sigmoid(float l) { return 1.f / (1.f + expf(-l)); }
    static FMOE_DEVICE float choice(const float *l, const float *bias, int e) {
        return bias != nullptr ? sigmoid(l[e]) + bias[e] : sigmoid(l[e]);
    }

    static FMOE_DEVICE void route(const float *l, const float *bias, int (&ids)[K], float (&weights)[K]) {
        float bv[K];
        int bi[K];
#pragma unroll
        for (int j = 0; j < K; ++j) { bv[j] = 0.f; bi[j] = NONE; }
        float m = -FMOE_INF, norm = 0.f;
        if (SCORING == 0) {
            bool any = false;
            for (int e = 0; e < E; ++e) {
                const float v = l[e];
                if (v != v) continue;
                any = true;
                m = fmaxf(m, v);
            }
            if (any) {
                const bool inf = m == FMOE_INF || m == -FMOE_INF;
                for (int e = 0; e < E; ++e) {
                    const float v = l[e];
                    if (v != v) continue;
                    norm += inf ? (v == m ? 1.f : 0.f) : expf(v - m);
                    insert(bv, bi, v, e);
                }
            }
        } else if (GROUPS == 1) {
            for (int e = 0; e < E; ++e)
                if (!(l[e] != l[e])) insert(bv, bi, choice(l, bias, e), e);
        } else {
            // Group scores (sum of the two best eligible choice scores), then the kept groups by rounds of arg-max.
            float gscore[GROUPS];
#pragma unroll
            for (int g = 0; g < GROUPS; ++g) {
                float t1 = -FMOE_INF, t2 = -FMOE_INF;
                int n = 0;
                for (int i = 0; i < GS; ++i) {
                    const int e = g * GS + i;
                    if (l[e] != l[e]) continue;
                    const float c = choice(l, bias, e);
                    ++n;
                    if (c > t1) { t2 = t1; t1 = c; } else if (c > t2) { t2 = c; }
                }
                gscore[g] = n == 0 ? -FMOE_INF : (n == 1 ? t1 : t1 + t2);
            }
            unsigned long long kept_lo = 0, kept_hi = 0;
            for (int r = 0; r < GROUPS_KEPT; ++r) {
                float best = 0.f;
                int bg = NONE;
#pragma unroll
                for (int g = 0; g < GROUPS; ++g) {
                    const bool done = g < 64 ? (kept_lo >> g & 1) : (kept_hi >> (g - 64) & 1);
                    if (!done && better(gscore[g], g, best, bg)) { best = gscore[g]; bg = g; }
                }
                if (bg == NONE) break;
                if (bg < 64) kept_lo |= 1ull << bg; else kept_hi |= 1ull << (bg - 64);
            }
            for (int g = 0; g < GROUPS; ++g) {
                const bool keep = g < 64 ? (kept_lo >> g & 1) : (kept_hi >> (g - 64) & 1);
                if (!keep) continue;
                for (int i = 0; i < GS; ++i) {
                    const int e = g * GS + i;
                    if (!(l[e] != l[e])) insert(bv, bi, choice(l, bias, e), e);
                }
            }
        }
        const bool inf = m == FMOE_INF || m == -FMOE_INF;
#pragma unroll
        for (int j = 0; j < K; ++j) {
            ids[j] = bi[j] == NONE ? -1 : bi[j];
            float w = 0.f;
            if (bi[j] != NONE) {
                const float v = l[bi[j]];
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
