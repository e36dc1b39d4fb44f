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

constexpr int NONE = 0x7fffffff;

// Total order used by every top-k: larger value first, then lower index; NONE loses to everything.
FMOE_DEVICE bool better(float v, int i, float bv, int bi) {
    if (i == NONE) return false;
    if (bi == NONE) return true;
    return v > bv || (v == bv && i < bi);
}

// Warp-wide arg-max of (value, index) with a payload; every lane ends with the winner.
FMOE_DEVICE void warp_argmax(float &v, int &i, float &payload) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, off);
        const int oi = __shfl_xor_sync(0xffffffffu, i, off);
        const float op = __shfl_xor_sync(0xffffffffu, payload, off);
        if (better(ov, oi, v, i)) { v = ov; i = oi; payload = op; }
    }
}

FMOE_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}
FMOE_DEVICE float warp_max(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

template <int E, int K, int SCORING, int GROUPS, int GROUPS_KEPT, bool RENORM> struct Router {
    static constexpr int EPL = (E + 31) / 32;  // experts per lane: lane owns e = lane + 32·q
    static constexpr int GS = E / GROUPS;      // experts per group
    static constexpr int SCRATCH_FLOATS = GROUPS > 1 ? E + GROUPS : 0;

    // Routes one token. `logits` is the token's row [E]; `bias` the selection bias or null; `scratch` is this
    // warp's shared memory (SCRATCH_FLOATS). Every lane returns the same ids/weights.
    static FMOE_DEVICE void route(const float *logits, const float *bias, float *scratch, int (&ids)[K],
                                  float (&weights)[K]) {
        const int lane = threadIdx.x & 31;
        float score[EPL], wsrc[EPL];
        u32 eligible = 0;
#pragma unroll
        for (int q = 0; q < EPL; ++q) {
            const int e = lane + 32 * q;
            const float l = e < E ? logits[e] : 0.f;
            score[q] = l;
            if (e < E && !(l != l)) eligible |= 1u << q;
        }
        if (SCORING == 0) {
            // Softmax over eligible experts; selection is by logit (same order as by probability, no underflow ties).
            float m = -FMOE_INF;
            bool any = false;
#pragma unroll
            for (int q = 0; q < EPL; ++q)
                if (eligible >> q & 1) { m = fmaxf(m, score[q]); any = true; }
            m = warp_max(m);
            any = __any_sync(0xffffffffu, any);
            if (any && (m == FMOE_INF || m == -FMOE_INF)) {
                float cnt = 0.f;
#pragma unroll
                for (int q = 0; q < EPL; ++q) cnt += (eligible >> q & 1) && score[q] == m ? 1.f : 0.f;
                cnt = warp_sum(cnt);
#pragma unroll
                for (int q = 0; q < EPL; ++q) wsrc[q] = (eligible >> q & 1) && score[q] == m ? 1.f / cnt : 0.f;
            } else {
                float sum = 0.f;
#pragma unroll
                for (int q = 0; q < EPL; ++q) {
                    wsrc[q] = (eligible >> q & 1) ? expf(score[q] - m) : 0.f;
                    sum += wsrc[q];
                }
                sum = warp_sum(sum);
#pragma unroll
                for (int q = 0; q < EPL; ++q) wsrc[q] = wsrc[q] / sum;
            }
        } else {
#pragma unroll
            for (int q = 0; q < EPL; ++q) {
                const int e = lane + 32 * q;
                const float s = 1.f / (1.f + expf(-score[q]));
                wsrc[q] = s;
                score[q] = bias != nullptr && e < E ? s + bias[e] : s;
            }
            if (GROUPS > 1) eligible = select_groups(score, eligible, scratch);
        }
        // k rounds of arg-max over eligible experts not chosen yet.
        u32 chosen = 0;
#pragma unroll
        for (int j = 0; j < K; ++j) {
            float bv = 0.f, bw = 0.f;
            int bi = NONE;
#pragma unroll
            for (int q = 0; q < EPL; ++q) {
                const int e = lane + 32 * q;
                if ((eligible >> q & 1) && !(chosen >> q & 1) && better(score[q], e, bv, bi)) {
                    bv = score[q]; bi = e; bw = wsrc[q];
                }
            }
            warp_argmax(bv, bi, bw);
            if (bi != NONE && (bi & 31) == lane) chosen |= 1u << (bi >> 5);
            ids[j] = bi == NONE ? -1 : bi;
            weights[j] = bi == NONE ? 0.f : bw;
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

    // Group-limited selection: keeps the GROUPS_KEPT best groups; returns the eligibility mask restricted to them.
    static FMOE_DEVICE u32 select_groups(const float (&score)[EPL], u32 eligible, float *scratch) {
        const int lane = threadIdx.x & 31;
        float *choice = scratch, *gscore = scratch + E;
#pragma unroll
        for (int q = 0; q < EPL; ++q) {
            const int e = lane + 32 * q;
            if (e < E) choice[e] = (eligible >> q & 1) ? score[q] : __int_as_float(0x7fffffff);
        }
        __syncwarp();
        for (int g = lane; g < GROUPS; g += 32) {
            float t1 = -FMOE_INF, t2 = -FMOE_INF;
            int n = 0;
            for (int i = 0; i < GS; ++i) {
                const float c = choice[g * GS + i];
                if (c != c) continue;
                ++n;
                if (c > t1) { t2 = t1; t1 = c; } else if (c > t2) { t2 = c; }
            }
            gscore[g] = n == 0 ? -FMOE_INF : (n == 1 ? t1 : t1 + t2);
        }
        __syncwarp();
        // Keep GROUPS_KEPT groups: rounds of arg-max over group scores (every lane computes the same mask).
        unsigned long long kept_lo = 0, kept_hi = 0;  // up to 128 groups
        for (int r = 0; r < GROUPS_KEPT; ++r) {
            float bv = 0.f, dummy = 0.f;
            int bi = NONE;
            for (int g = lane; g < GROUPS; g += 32) {
                const bool done = g < 64 ? (kept_lo >> g & 1) : (kept_hi >> (g - 64) & 1);
                if (!done && better(gscore[g], g, bv, bi)) { bv = gscore[g]; bi = g; }
            }
            warp_argmax(bv, bi, dummy);
            if (bi == NONE) break;
            if (bi < 64) kept_lo |= 1ull << bi; else kept_hi |= 1ull << (bi - 64);
        }
#pragma unroll
        for (int q = 0; q < EPL; ++q) {
            const int g = (lane + 32 * q) / GS;
            const bool keep = g < 64 ? (kept_lo >> g & 1) : (kept_hi >> (g - 64) & 1);
            if (!keep) eligible &= ~(1u << q);
        }
        __syncwarp();
        return eligible;
    }
};

}  // namespace fmoe

namespace fmoe {

// The same rules with one thread per token: sequential passes over the token's logits (read from global memory,
// where the gate wrote them), a running top-k kept sorted by the `better` order. Sums run in expert order, like the
// oracle's. Used by the gate phase: a tile's 128 tokens route in parallel instead of 16 per warp in turn.
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
