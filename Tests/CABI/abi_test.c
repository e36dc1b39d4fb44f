/*
 * abi_test.c — the C ABI (include/flashmoe.h) from plain C, on the CPU backend.
 *
 * 1. Layers against a naive double-precision reference written here from the header's and README's definitions
 *    (gate, top-k with ties to the lower index, renormalise, SwiGLU / relu, combine, shared expert):
 *    a gated softmax layer with a gated shared expert (fused and separate layouts, FP32 and BF16) and a plain
 *    sigmoid layer with groups, selection bias, biases and scaling.
 * 2. Every argument error: its status code, and that the message names the argument or field.
 * 3. Handles, info, status strings, version and the per-thread last error.
 * 4. Expert-parallel groups: flashmoe_expert_range, every argument error of flashmoe_group_create, and groups of
 *    ranks on threads meeting through a C all-gather (a barrier and a shared table): duplicate ranks, another
 *    config, a rank failing its own checks and a failing all-gather end every rank with the same kind of error;
 *    without a GPU a valid group ends on every rank with FLASHMOE_ERROR_CUDA naming the ranks without a driver.
 *
 * Prints one line per failed check and "N passed, M failed"; exits 1 on any failure.
 * Build: cc -std=c11 -Iinclude Tests/CABI/abi_test.c -Llib -lflashmoe -lm -lpthread (see Tests/CABI/run.sh).
 */
#define _POSIX_C_SOURCE 200809L /* pthread_barrier_t */
#include "flashmoe.h"
#include "abi_support.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* MARK: the naive reference */

typedef struct {
    int H, I, E, k, gated, act_silu, bias, sigmoid, renorm, groups, kept, has_sel_bias, IS, shared_gated;
    float scaling;
    /* weights, float32 (already rounded to bf16 for bf16 runs) */
    const float *router, *sel_bias, *w1, *w3, *w2, *b1, *b2, *sw1, *sw3, *sw2, *sgate;
    int round_bf16; /* round the FFN's hidden activations to bf16 (as the library stores them in bf16) */
} ref_layer;

static double dot(const float *a, const float *b, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

static double activation(const ref_layer *L, double v) {
    return L->act_silu ? v / (1 + exp(-v)) : (v > 0 ? v : 0);
}

static double round_hidden(const ref_layer *L, double v) { return L->round_bf16 ? from_bf16(to_bf16((float)v)) : v; }

/* One FFN (W1/W3 [R, H], W2 [H, R]) on row x, added to out[H] times `scale`. */
static void ffn(const ref_layer *L, const float *x, const float *w1, const float *w3, const float *w2, const float *b1,
                const float *b2, int R, double scale, double *out) {
    double *a = malloc((size_t)R * sizeof(double));
    for (int r = 0; r < R; r++) {
        double g = dot(x, w1 + (size_t)r * L->H, L->H) + (b1 ? b1[r] : 0);
        a[r] = L->gated ? activation(L, g) * dot(x, w3 + (size_t)r * L->H, L->H) : activation(L, g);
        a[r] = round_hidden(L, a[r]);
    }
    for (int h = 0; h < L->H; h++) {
        double o = b2 ? b2[h] : 0;
        for (int r = 0; r < R; r++) o += a[r] * (double)w2[(size_t)h * R + r];
        out[h] += scale * o;
    }
    free(a);
}

/* The best not-yet-taken index of score[0..n) among allowed ones, ties to the lower index; -1 if none. */
static int arg_max(const double *score, const int *taken, int n) {
    int best = -1;
    for (int e = 0; e < n; e++)
        if (!taken[e] && (best < 0 || score[e] > score[best])) best = e;
    return best;
}

/* Routing of one token: ids[k], weights[k]. */
static void route(const ref_layer *L, const float *x, int *ids, double *w) {
    int E = L->E;
    double *logit = malloc(E * sizeof(double)), *score = malloc(E * sizeof(double));
    double *choice = malloc(E * sizeof(double));
    int *taken = calloc(E, sizeof(int));
    for (int e = 0; e < E; e++) logit[e] = dot(x, L->router + (size_t)e * L->H, L->H);
    if (!L->sigmoid) {
        double m = logit[0], sum = 0;
        for (int e = 1; e < E; e++) m = logit[e] > m ? logit[e] : m;
        for (int e = 0; e < E; e++) sum += exp(logit[e] - m);
        for (int e = 0; e < E; e++) {
            score[e] = exp(logit[e] - m) / sum;
            choice[e] = logit[e];
        }
    } else {
        for (int e = 0; e < E; e++) {
            score[e] = 1 / (1 + exp(-logit[e]));
            choice[e] = score[e] + (L->has_sel_bias ? L->sel_bias[e] : 0);
        }
        if (L->groups > 1) {
            int size = E / L->groups;
            double gscore[64];
            int gtaken[64] = {0};
            for (int g = 0; g < L->groups; g++) {
                double best = -INFINITY, second = -INFINITY;
                for (int e = g * size; e < (g + 1) * size; e++) {
                    if (choice[e] > best) {
                        second = best;
                        best = choice[e];
                    } else if (choice[e] > second) {
                        second = choice[e];
                    }
                }
                gscore[g] = best + second;
            }
            for (int j = 0; j < L->kept; j++) gtaken[arg_max(gscore, gtaken, L->groups)] = 1;
            for (int g = 0; g < L->groups; g++)
                if (!gtaken[g])
                    for (int e = g * size; e < (g + 1) * size; e++) taken[e] = 1; /* not a candidate */
        }
    }
    double sum = 0;
    for (int j = 0; j < L->k; j++) {
        int e = arg_max(choice, taken, E);
        taken[e] = 1;
        ids[j] = e;
        w[j] = score[e];
        sum += w[j];
    }
    for (int j = 0; j < L->k; j++) {
        if (L->renorm) w[j] /= L->sigmoid ? sum + 1e-20 : sum;
        w[j] *= L->scaling;
    }
    free(logit);
    free(score);
    free(choice);
    free(taken);
}

/* y[S, H], ids[S, k], weights[S, k] of the reference. */
static void reference(const ref_layer *L, const float *x, int S, double *y, int *ids, double *w) {
    size_t H = L->H, I = L->I;
    for (int t = 0; t < S; t++) {
        const float *xt = x + t * H;
        double *yt = y + t * H;
        memset(yt, 0, H * sizeof(double));
        route(L, xt, ids + t * L->k, w + t * L->k);
        for (int j = 0; j < L->k; j++) {
            size_t e = ids[t * L->k + j];
            ffn(L, xt, L->w1 + e * I * H, L->gated ? L->w3 + e * I * H : NULL, L->w2 + e * H * I,
                L->bias ? L->b1 + e * I : NULL, L->bias ? L->b2 + e * H : NULL, L->I, w[t * L->k + j], yt);
        }
        if (L->IS > 0) {
            double gate = L->shared_gated ? 1 / (1 + exp(-dot(xt, L->sgate, L->H))) : 1;
            ffn(L, xt, L->sw1, L->sw3, L->sw2, NULL, NULL, L->IS, gate, yt);
        }
    }
}

/* ‖a − b‖ / ‖b‖ */
static double relative_error(const float *a, const double *b, size_t n) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        d += (a[i] - b[i]) * (a[i] - b[i]);
        r += b[i] * b[i];
    }
    return sqrt(d / (r > 0 ? r : 1));
}

/* MARK: layer tests */

enum { S = 37 };

/* Runs `layer` on x and compares y, ids and weights with the reference. */
static void compare_forward(flashmoe_layer_t layer, const ref_layer *L, const void *x, const float *x_ref,
                            double tolerance, const char *name) {
    char what[256];
    float *y = malloc((size_t)S * L->H * sizeof(float));
    int32_t *ids = malloc((size_t)S * L->k * sizeof(int32_t));
    float *w = malloc((size_t)S * L->k * sizeof(float));
    double *y_ref = malloc((size_t)S * L->H * sizeof(double)), *w_ref = malloc((size_t)S * L->k * sizeof(double));
    int *ids_ref = malloc((size_t)S * L->k * sizeof(int));
    for (size_t i = 0; i < (size_t)S * L->H; i++) y[i] = NAN;

    flashmoe_status_t st = flashmoe_layer_forward(layer, x, y, S, ids, w, NULL);
    snprintf(what, sizeof what, "%s: forward succeeds (%s)", name, flashmoe_last_error());
    check(st == FLASHMOE_SUCCESS, what);
    reference(L, x_ref, S, y_ref, ids_ref, w_ref);

    double err = relative_error(y, y_ref, (size_t)S * L->H);
    snprintf(what, sizeof what, "%s: y within %g of the reference (relative error %.3g)", name, tolerance, err);
    check(err < tolerance, what);
    int id_mismatch = 0;
    double w_err = 0;
    for (int i = 0; i < S * L->k; i++) {
        id_mismatch += ids[i] != ids_ref[i];
        w_err = fmax(w_err, fabs(w[i] - w_ref[i]));
    }
    snprintf(what, sizeof what, "%s: top-k ids equal the reference's (%d of %d differ)", name, id_mismatch, S * L->k);
    check(id_mismatch == 0, what);
    snprintf(what, sizeof what, "%s: top-k weights within %g (max difference %.3g)", name, tolerance, w_err);
    check(w_err < tolerance, what);

    /* y alone (no routing outputs) gives the same bits. */
    float *y2 = malloc((size_t)S * L->H * sizeof(float));
    st = flashmoe_layer_forward(layer, x, y2, S, NULL, NULL, NULL);
    snprintf(what, sizeof what, "%s: forward without ids/weights gives the same y", name);
    check(st == FLASHMOE_SUCCESS && memcmp(y, y2, (size_t)S * L->H * sizeof(float)) == 0, what);

    free(y);
    free(y2);
    free(ids);
    free(w);
    free(y_ref);
    free(w_ref);
    free(ids_ref);
}

/* H, I, E, k and the shared expert's I of the gated layer. */
enum { GH = 48, GI = 40, GE = 8, GK = 2, GIS = 24 };

typedef struct {
    float *router, *w1, *w3, *w2, *sw1, *sw3, *sw2, *sgate, *x;
} gated_weights;

static gated_weights make_gated(void) {
    gated_weights g;
    float sh = 1 / sqrtf(GH), si = 1 / sqrtf(GI), ss = 1 / sqrtf(GIS);
    g.router = random_array(GE * GH, sh);
    g.w1 = random_array(GE * GI * GH, sh);
    g.w3 = random_array(GE * GI * GH, sh);
    g.w2 = random_array(GE * GH * GI, si);
    g.sw1 = random_array(GIS * GH, sh);
    g.sw3 = random_array(GIS * GH, sh);
    g.sw2 = random_array(GH * GIS, ss);
    g.sgate = random_array(GH, sh);
    g.x = random_array(S * GH, 1);
    /* Two tokens with exact ties: zero input gives equal logits, so the lowest expert ids must win. */
    memset(g.x + 3 * GH, 0, GH * sizeof(float));
    return g;
}

static void free_gated(gated_weights *g) {
    float *all[] = {g->router, g->w1, g->w3, g->w2, g->sw1, g->sw3, g->sw2, g->sgate, g->x};
    for (int i = 0; i < 9; i++) free(all[i]);
}

/* [M, 2R, C]: per matrix its R gate rows then its R up rows. */
static float *fuse_rows(const float *gate, const float *up, int M, int R, int C) {
    float *out = malloc((size_t)M * 2 * R * C * sizeof(float));
    for (int m = 0; m < M; m++) {
        memcpy(out + (size_t)m * 2 * R * C, gate + (size_t)m * R * C, (size_t)R * C * sizeof(float));
        memcpy(out + ((size_t)m * 2 + 1) * R * C, up + (size_t)m * R * C, (size_t)R * C * sizeof(float));
    }
    return out;
}

/* The gated layer's weights in the fused layout; *packed receives the two fused arrays to free. */
static flashmoe_weights_t gated_fused_weights(const gated_weights *g, float *packed[2]) {
    packed[0] = fuse_rows(g->w1, g->w3, GE, GI, GH);
    packed[1] = fuse_rows(g->sw1, g->sw3, 1, GIS, GH);
    flashmoe_weights_t w = FLASHMOE_WEIGHTS_INIT;
    w.layout = FLASHMOE_LAYOUT_FUSED;
    w.router = g->router;
    w.gate_up = packed[0];
    w.down = g->w2;
    w.shared_gate_up = packed[1];
    w.shared_down = g->sw2;
    w.shared_gate = g->sgate;
    return w;
}

/* A CPU layer of shape H, I, E, k in FP32; the other fields as FLASHMOE_CONFIG_INIT sets them. */
static flashmoe_config_t cpu_config(int H, int I, int E, int k, int64_t max_tokens) {
    flashmoe_config_t c = FLASHMOE_CONFIG_INIT;
    c.hidden = H;
    c.intermediate = I;
    c.experts = E;
    c.top_k = k;
    c.precision = FLASHMOE_PRECISION_FP32;
    c.backend = FLASHMOE_BACKEND_CPU;
    c.max_tokens = max_tokens;
    return c;
}

static flashmoe_config_t gated_config(void) {
    flashmoe_config_t c = cpu_config(GH, GI, GE, GK, 64);
    c.ffn = FLASHMOE_FFN_GATED;
    c.activation = FLASHMOE_ACT_SILU;
    c.router = FLASHMOE_ROUTER_SOFTMAX;
    c.renormalize = 1;
    c.shared_intermediate = GIS;
    c.shared_gated = 1;
    return c;
}

static ref_layer gated_reference(const gated_weights *g) {
    ref_layer L = {GH, GI, GE, GK, 1, 1, 0, 0, 1, 1, 1, 0, GIS, 1, 1.0f, g->router, NULL, g->w1, g->w3, g->w2,
                   NULL, NULL, g->sw1, g->sw3, g->sw2, g->sgate, 0};
    return L;
}

static void test_gated_softmax(void) {
    gated_weights g = make_gated();
    ref_layer L = gated_reference(&g);
    flashmoe_config_t c = gated_config();

    /* Fused layout. */
    float *packed[2];
    flashmoe_weights_t w = gated_fused_weights(&g, packed);
    flashmoe_layer_t fused = NULL;
    flashmoe_status_t st = flashmoe_layer_create(&c, &w, &fused);
    check(st == FLASHMOE_SUCCESS && fused != NULL, "gated softmax (fused layout): create succeeds");
    if (st != FLASHMOE_SUCCESS) printf("  %s\n", flashmoe_last_error());
    else compare_forward(fused, &L, g.x, g.x, 1e-5, "gated softmax fp32, fused layout");

    /* Separate layout: the same layer, the same bits. */
    flashmoe_weights_t ws = FLASHMOE_WEIGHTS_INIT;
    ws.layout = FLASHMOE_LAYOUT_SEPARATE;
    ws.router = g.router;
    ws.gate = g.w1;
    ws.up = g.w3;
    ws.down = g.w2;
    ws.shared_gate_up = g.sw1;
    ws.shared_up = g.sw3;
    ws.shared_down = g.sw2;
    ws.shared_gate = g.sgate;
    flashmoe_layer_t separate = NULL;
    st = flashmoe_layer_create(&c, &ws, &separate);
    check(st == FLASHMOE_SUCCESS, "gated softmax (separate layout): create succeeds");
    if (st == FLASHMOE_SUCCESS && fused) {
        float *y1 = malloc(S * GH * sizeof(float)), *y2 = malloc(S * GH * sizeof(float));
        flashmoe_layer_forward(fused, g.x, y1, S, NULL, NULL, NULL);
        st = flashmoe_layer_forward(separate, g.x, y2, S, NULL, NULL, NULL);
        check(st == FLASHMOE_SUCCESS && memcmp(y1, y2, S * GH * sizeof(float)) == 0,
              "gated softmax: separate layout gives the fused layout's bits");
        free(y1);
        free(y2);
    }

    /* Info. */
    if (fused) {
        flashmoe_layer_info_t info;
        memset(&info, 0xff, sizeof info);
        info.size = sizeof info;
        st = flashmoe_layer_info(fused, &info);
        check(st == FLASHMOE_SUCCESS && info.max_tokens == 64 && info.backend == FLASHMOE_BACKEND_CPU &&
                  info.weight_bytes >= (int64_t)(GE * (3 * GI * GH + GH) * 4) && info.workspace_bytes == 0,
              "info: max_tokens, backend and weight bytes of a CPU layer");
    }

    /* S = 0 with NULL x and y is a valid no-op. */
    if (fused) {
        st = flashmoe_layer_forward(fused, NULL, NULL, 0, NULL, NULL, NULL);
        check(st == FLASHMOE_SUCCESS, "forward with tokens = 0 and NULL x, y succeeds");
    }

    /* BF16: weights and x rounded to bf16; the reference runs on the rounded values and rounds the hidden
     * activations as the library stores them. */
    {
        size_t n_gu = (size_t)GE * 2 * GI * GH, n_w2 = (size_t)GE * GH * GI, n_sgu = 2 * GIS * GH;
        uint16_t *b_router = malloc(GE * GH * 2), *b_gate_up = malloc(n_gu * 2), *b_w2 = malloc(n_w2 * 2);
        uint16_t *b_sgu = malloc(n_sgu * 2), *b_sw2 = malloc(GH * GIS * 2), *b_sgate = malloc(GH * 2);
        uint16_t *b_x = malloc(S * GH * 2);
        /* Round the float copies in place, then store their bits. */
        float *arrays[] = {g.router, g.w1, g.w3, g.w2, g.sw1, g.sw3, g.sw2, g.sgate, g.x};
        size_t counts[] = {GE * GH, (size_t)GE * GI * GH, (size_t)GE * GI * GH, n_w2, GIS * GH, GIS * GH,
                           GH * GIS, GH, S * GH};
        for (int a = 0; a < 9; a++)
            for (size_t i = 0; i < counts[a]; i++) arrays[a][i] = from_bf16(to_bf16(arrays[a][i]));
        float *gu = fuse_rows(g.w1, g.w3, GE, GI, GH), *sgu = fuse_rows(g.sw1, g.sw3, 1, GIS, GH);
        for (size_t i = 0; i < GE * GH; i++) b_router[i] = to_bf16(g.router[i]);
        for (size_t i = 0; i < n_gu; i++) b_gate_up[i] = to_bf16(gu[i]);
        for (size_t i = 0; i < n_w2; i++) b_w2[i] = to_bf16(g.w2[i]);
        for (size_t i = 0; i < n_sgu; i++) b_sgu[i] = to_bf16(sgu[i]);
        for (size_t i = 0; i < GH * GIS; i++) b_sw2[i] = to_bf16(g.sw2[i]);
        for (size_t i = 0; i < GH; i++) b_sgate[i] = to_bf16(g.sgate[i]);
        for (size_t i = 0; i < S * GH; i++) b_x[i] = to_bf16(g.x[i]);
        flashmoe_config_t cb = gated_config();
        cb.precision = FLASHMOE_PRECISION_BF16;
        flashmoe_weights_t wb = FLASHMOE_WEIGHTS_INIT;
        wb.router = b_router;
        wb.gate_up = b_gate_up;
        wb.down = b_w2;
        wb.shared_gate_up = b_sgu;
        wb.shared_down = b_sw2;
        wb.shared_gate = b_sgate;
        flashmoe_layer_t bf = NULL;
        st = flashmoe_layer_create(&cb, &wb, &bf);
        check(st == FLASHMOE_SUCCESS, "gated softmax bf16: create succeeds");
        if (st != FLASHMOE_SUCCESS) printf("  %s\n", flashmoe_last_error());
        ref_layer Lb = gated_reference(&g);
        Lb.round_bf16 = 1;
        if (bf) compare_forward(bf, &Lb, b_x, g.x, 1e-4, "gated softmax bf16");
        flashmoe_layer_destroy(bf);
        free(gu);
        free(sgu);
        free(b_router);
        free(b_gate_up);
        free(b_w2);
        free(b_sgu);
        free(b_sw2);
        free(b_sgate);
        free(b_x);
    }

    check(flashmoe_layer_destroy(fused) == FLASHMOE_SUCCESS, "destroy a live layer");
    check(flashmoe_layer_destroy(separate) == FLASHMOE_SUCCESS, "destroy a second live layer");
    expect_error(flashmoe_layer_destroy(fused), FLASHMOE_ERROR_INVALID_ARGUMENT, "layer", "destroy twice");
    float y[GH];
    expect_error(flashmoe_layer_forward(fused, g.x, y, 1, NULL, NULL, NULL), FLASHMOE_ERROR_INVALID_ARGUMENT, "layer",
                 "forward on a destroyed layer");
    free(packed[0]);
    free(packed[1]);
    free_gated(&g);
}

/* The plain sigmoid layer: relu FFN with biases, 4 groups keeping 2, selection bias, no renormalisation... */
enum { PH = 32, PI = 24, PE = 16, PK = 3 };

static void test_plain_sigmoid(int renormalize) {
    float sh = 1 / sqrtf(PH), si = 1 / sqrtf(PI);
    float *router = random_array(PE * PH, sh), *w1 = random_array(PE * PI * PH, sh), *w2 = random_array(PE * PH * PI, si);
    float *b1 = random_array(PE * PI, sh), *b2 = random_array(PE * PH, si), *sel = random_array(PE, 0.1f);
    float *x = random_array(S * PH, 1);
    flashmoe_config_t c = cpu_config(PH, PI, PE, PK, S);
    c.ffn = FLASHMOE_FFN_PLAIN;
    c.activation = FLASHMOE_ACT_RELU;
    c.bias = 1;
    c.router = FLASHMOE_ROUTER_SIGMOID;
    c.renormalize = renormalize;
    c.groups = 4;
    c.groups_kept = 2;
    c.selection_bias = 1;
    c.scaling = 2.5f;
    flashmoe_weights_t w = FLASHMOE_WEIGHTS_INIT;
    w.router = router;
    w.selection_bias = sel;
    w.gate_up = w1;
    w.down = w2;
    w.b1 = b1;
    w.b2 = b2;
    flashmoe_layer_t layer = NULL;
    flashmoe_status_t st = flashmoe_layer_create(&c, &w, &layer);
    check(st == FLASHMOE_SUCCESS, "plain sigmoid: create succeeds");
    if (st != FLASHMOE_SUCCESS) printf("  %s\n", flashmoe_last_error());
    ref_layer L = {PH, PI, PE, PK, 0, 0, 1, 1, renormalize, 4, 2, 1, 0, 0, 2.5f, router, sel, w1, NULL, w2,
                   b1, b2, NULL, NULL, NULL, NULL, 0};
    if (layer)
        compare_forward(layer, &L, x, x, 1e-5,
                        renormalize ? "plain sigmoid, groups, renormalised" : "plain sigmoid, groups, not renormalised");
    /* The separate layout with plain W1 as `gate` gives the same bits. */
    flashmoe_weights_t ws = w;
    ws.layout = FLASHMOE_LAYOUT_SEPARATE;
    ws.gate_up = NULL;
    ws.gate = w1;
    flashmoe_layer_t layer2 = NULL;
    st = flashmoe_layer_create(&c, &ws, &layer2);
    if (st == FLASHMOE_SUCCESS && layer) {
        float *y1 = malloc(S * PH * 4), *y2 = malloc(S * PH * 4);
        flashmoe_layer_forward(layer, x, y1, S, NULL, NULL, NULL);
        flashmoe_layer_forward(layer2, x, y2, S, NULL, NULL, NULL);
        check(memcmp(y1, y2, S * PH * 4) == 0, "plain sigmoid: separate layout (gate = W1) gives the same bits");
        free(y1);
        free(y2);
    } else {
        check(0, "plain sigmoid: separate layout create succeeds");
    }
    flashmoe_layer_destroy(layer);
    flashmoe_layer_destroy(layer2);
    float *all[] = {router, w1, w2, b1, b2, sel, x};
    for (int i = 0; i < 7; i++) free(all[i]);
}

/* MARK: argument errors */

/* A valid small gated layer's config and weights (zeros are fine for argument checks). */
static float zeros[4 * 8 * 2 * 8 * 2];

static flashmoe_config_t small_config(void) { return cpu_config(8, 8, 4, 2, 4); }

static flashmoe_weights_t small_weights(void) {
    flashmoe_weights_t w = FLASHMOE_WEIGHTS_INIT;
    w.router = zeros;
    w.gate_up = zeros;
    w.down = zeros;
    return w;
}

/* create with config c and weights w must fail with INVALID_ARGUMENT naming `needle`, and leave *layer NULL. */
static void create_fails(flashmoe_config_t c, flashmoe_weights_t w, const char *needle, const char *what) {
    flashmoe_layer_t layer = (flashmoe_layer_t)(uintptr_t)0x1234;
    expect_error(flashmoe_layer_create(&c, &w, &layer), FLASHMOE_ERROR_INVALID_ARGUMENT, needle, what);
    check(layer == NULL, "a failed create writes NULL to *layer");
}

#define CONFIG_FAILS(field_assignment, needle)                                                                     \
    do {                                                                                                           \
        flashmoe_config_t c = small_config();                                                                     \
        c.field_assignment;                                                                                        \
        create_fails(c, small_weights(), needle, "create with config." #field_assignment);                      \
    } while (0)

#define WEIGHTS_FAILS(config_change, field_assignment, needle)                                                     \
    do {                                                                                                           \
        flashmoe_config_t c = small_config();                                                                     \
        c.config_change;                                                                                           \
        flashmoe_weights_t w = small_weights();                                                                   \
        w.field_assignment;                                                                                        \
        create_fails(c, w, needle, "create with weights." #field_assignment " (config." #config_change ")");    \
    } while (0)

static void test_create_errors(void) {
    flashmoe_config_t c = small_config();
    flashmoe_weights_t w = small_weights();
    flashmoe_layer_t layer = NULL;
    const flashmoe_status_t invalid = FLASHMOE_ERROR_INVALID_ARGUMENT;

    check(flashmoe_layer_create(&c, &w, &layer) == FLASHMOE_SUCCESS, "the small layer of the error tests is valid");
    flashmoe_layer_destroy(layer);

    expect_error(flashmoe_layer_create(NULL, &w, &layer), invalid, "config", "create with config NULL");
    expect_error(flashmoe_layer_create(&c, NULL, &layer), invalid, "weights", "create with weights NULL");
    expect_error(flashmoe_layer_create(&c, &w, NULL), invalid, "layer", "create with layer NULL");
    {
        /* A config at an odd address. */
        static _Alignas(16) unsigned char raw[sizeof(flashmoe_config_t) + 16];
        memcpy(raw + 4, &c, sizeof c);
        expect_error(flashmoe_layer_create((const flashmoe_config_t *)(raw + 4), &w, &layer), invalid, "misaligned",
                     "create with a misaligned config");
    }

    CONFIG_FAILS(size = 8, "config->size");
    CONFIG_FAILS(size = sizeof(flashmoe_config_t) + 8, "config->size");
    CONFIG_FAILS(magic = 0, "config->magic");
    CONFIG_FAILS(version = 10000, "config->version");
    CONFIG_FAILS(hidden = 0, "config->hidden");
    CONFIG_FAILS(intermediate = -1, "config->intermediate");
    CONFIG_FAILS(experts = 0, "config->experts");
    CONFIG_FAILS(top_k = 0, "config->top_k");
    CONFIG_FAILS(top_k = 5, "config->top_k");
    CONFIG_FAILS(ffn = 2, "config->ffn");
    CONFIG_FAILS(activation = 4, "config->activation");
    CONFIG_FAILS(bias = 2, "config->bias");
    CONFIG_FAILS(bias = 1, "config->bias"); /* gated FFN: no biases */
    CONFIG_FAILS(router = 2, "config->router");
    CONFIG_FAILS(renormalize = -1, "config->renormalize");
    CONFIG_FAILS(groups = 0, "config->groups");
    CONFIG_FAILS(groups = 3, "config->groups");
    CONFIG_FAILS(groups = 2, "config->groups"); /* softmax router */
    CONFIG_FAILS(groups_kept = 2, "config->groups_kept");
    CONFIG_FAILS(selection_bias = 1, "config->selection_bias"); /* softmax router */
    CONFIG_FAILS(scaling = NAN, "config->scaling");
    CONFIG_FAILS(scaling = INFINITY, "config->scaling");
    CONFIG_FAILS(shared_intermediate = -2, "config->shared_intermediate");
    CONFIG_FAILS(shared_gated = 1, "config->shared_gated");
    CONFIG_FAILS(capacity_factor = -1, "config->capacity_factor");
    CONFIG_FAILS(capacity_factor = NAN, "config->capacity_factor");
    CONFIG_FAILS(precision = 5, "config->precision");
    CONFIG_FAILS(backend = 2, "config->backend");
    CONFIG_FAILS(device = -1, "config->device");
    CONFIG_FAILS(output = 2, "config->output");
    CONFIG_FAILS(max_tokens = 0, "config->max_tokens");
    CONFIG_FAILS(max_tokens = -5, "config->max_tokens");
    CONFIG_FAILS(max_tokens = INT64_MAX, "config->max_tokens");
    CONFIG_FAILS(flags = 0x80, "config->flags");
    CONFIG_FAILS(flags = FLASHMOE_FLAG_INJECT_FAULT, "config->flags"); /* CPU backend: no kernel */
    {
        flashmoe_config_t huge = small_config();
        huge.hidden = 1 << 30;
        huge.intermediate = 1 << 30;
        huge.experts = 1 << 20;
        create_fails(huge, small_weights(), "too large", "create with E, I, H too large to address");
    }
    {
        /* Valid, but more than any machine's memory for the CPU backend's copies: refused before allocating. */
        flashmoe_config_t big = small_config();
        big.hidden = 1 << 16;
        big.intermediate = 1 << 16;
        big.experts = 64;
        flashmoe_layer_t none = NULL;
        expect_error(flashmoe_layer_create(&big, &w, &none), FLASHMOE_ERROR_OUT_OF_MEMORY, "MiB",
                     "create a CPU layer larger than this machine's memory");
    }

    {
        flashmoe_weights_t bad = small_weights();
        bad.size = 4;
        create_fails(small_config(), bad, "weights->size", "create with weights.size = 4");
        bad = small_weights();
        bad.version = 99999;
        create_fails(small_config(), bad, "weights->version", "create with weights.version = 99999");
    }
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, layout = 7, "weights->layout");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, router = NULL, "weights->router");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, gate_up = NULL, "weights->gate_up");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, down = NULL, "weights->down");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, gate = zeros, "weights->gate");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, up = zeros, "weights->up");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, b1 = zeros, "weights->b1");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, b2 = zeros, "weights->b2");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, selection_bias = zeros, "weights->selection_bias");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, shared_gate_up = zeros, "weights->shared_gate_up");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, shared_down = zeros, "weights->shared_down");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, shared_up = zeros, "weights->shared_up");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, shared_gate = zeros, "weights->shared_gate");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, router = (const char *)zeros + 2, "weights->router");
    WEIGHTS_FAILS(ffn = FLASHMOE_FFN_GATED, down = (const char *)zeros + 1, "weights->down");
    /* The separate layout needs gate and up, and no gate_up. */
    {
        flashmoe_config_t cs = small_config();
        flashmoe_weights_t ws = small_weights();
        ws.layout = FLASHMOE_LAYOUT_SEPARATE;
        create_fails(cs, ws, "weights->gate_up", "create: separate layout with gate_up given");
        ws.gate_up = NULL;
        create_fails(cs, ws, "weights->gate", "create: separate layout without gate");
        ws.gate = zeros;
        create_fails(cs, ws, "weights->up", "create: separate gated layout without up");
        cs.ffn = FLASHMOE_FFN_PLAIN;
        ws.up = zeros;
        create_fails(cs, ws, "weights->up", "create: separate plain layout with up given");
    }
    /* Needed pointers that are missing. */
    {
        flashmoe_config_t cs = small_config();
        cs.router = FLASHMOE_ROUTER_SIGMOID;
        cs.selection_bias = 1;
        create_fails(cs, small_weights(), "weights->selection_bias", "create: sigmoid router without selection_bias");
        cs = small_config();
        cs.ffn = FLASHMOE_FFN_PLAIN;
        cs.bias = 1;
        create_fails(cs, small_weights(), "weights->b1", "create: plain FFN with bias but no b1");
        cs = small_config();
        cs.shared_intermediate = 8;
        create_fails(cs, small_weights(), "weights->shared_gate_up", "create: shared expert without weights");
        flashmoe_weights_t ws = small_weights();
        ws.shared_gate_up = zeros;
        create_fails(cs, ws, "weights->shared_down", "create: shared expert without shared_down");
        cs.shared_gated = 1;
        ws.shared_down = zeros;
        create_fails(cs, ws, "weights->shared_gate", "create: gated shared expert without shared_gate");
        /* BF16 weights need 2-byte alignment. */
        cs = small_config();
        cs.precision = FLASHMOE_PRECISION_BF16;
        ws = small_weights();
        ws.gate_up = (const char *)zeros + 1;
        create_fails(cs, ws, "weights->gate_up", "create: bf16 gate_up at an odd address");
    }
}

static void test_forward_errors(void) {
    flashmoe_config_t c = small_config();
    flashmoe_weights_t w = small_weights();
    flashmoe_layer_t layer = NULL;
    const flashmoe_status_t invalid = FLASHMOE_ERROR_INVALID_ARGUMENT;
    if (flashmoe_layer_create(&c, &w, &layer) != FLASHMOE_SUCCESS) {
        check(0, "forward errors: create the small layer");
        return;
    }
    static float x[4 * 8 + 1], y[4 * 8 + 1], tw[4 * 2 + 1];
    static int32_t ids[4 * 2 + 1];
    char stream_object[8];

    expect_error(flashmoe_layer_forward(NULL, x, y, 1, NULL, NULL, NULL), invalid, "layer", "forward with layer NULL");
    expect_error(flashmoe_layer_forward((flashmoe_layer_t)(void *)stream_object, x, y, 1, NULL, NULL, NULL), invalid,
                 "layer", "forward with a made-up handle");
    expect_error(flashmoe_layer_forward(layer, x, y, -1, NULL, NULL, NULL), invalid, "tokens", "forward with tokens -1");
    expect_error(flashmoe_layer_forward(layer, x, y, 5, NULL, NULL, NULL), invalid, "tokens",
                 "forward with tokens > max_tokens");
    expect_error(flashmoe_layer_forward(layer, NULL, y, 1, NULL, NULL, NULL), invalid, "x", "forward with x NULL");
    expect_error(flashmoe_layer_forward(layer, x, NULL, 1, NULL, NULL, NULL), invalid, "y", "forward with y NULL");
    expect_error(flashmoe_layer_forward(layer, (char *)x + 1, y, 1, NULL, NULL, NULL), invalid, "x",
                 "forward with x misaligned");
    expect_error(flashmoe_layer_forward(layer, x, (char *)y + 2, 1, NULL, NULL, NULL), invalid, "y",
                 "forward with y misaligned");
    expect_error(flashmoe_layer_forward(layer, x, y, 1, (int32_t *)((char *)ids + 1), NULL, NULL), invalid, "topk_ids",
                 "forward with topk_ids misaligned");
    expect_error(flashmoe_layer_forward(layer, x, y, 1, NULL, (float *)((char *)tw + 3), NULL), invalid,
                 "topk_weights", "forward with topk_weights misaligned");
    expect_error(flashmoe_layer_forward(layer, x, y, 1, NULL, NULL, stream_object), invalid, "stream",
                 "forward on a CPU layer with a stream");
    check(flashmoe_layer_forward(layer, x, y, 4, ids, tw, NULL) == FLASHMOE_SUCCESS, "forward with max_tokens tokens");

    expect_error(flashmoe_layer_check(NULL, 0, NULL), invalid, "layer", "check with layer NULL");
    expect_error(flashmoe_layer_check(layer, 1, stream_object), invalid, "stream", "check on a CPU layer with a stream");
    check(flashmoe_layer_check(layer, 1, NULL) == FLASHMOE_SUCCESS, "check on a CPU layer");

    flashmoe_layer_info_t info;
    info.size = 8;
    expect_error(flashmoe_layer_info(layer, &info), invalid, "info->size", "info with a wrong size");
    expect_error(flashmoe_layer_info(layer, NULL), invalid, "info", "info with info NULL");
    expect_error(flashmoe_layer_info(NULL, &info), invalid, "layer", "info with layer NULL");

    check(flashmoe_layer_destroy(NULL) == FLASHMOE_SUCCESS, "destroy NULL is a no-op");
    flashmoe_layer_destroy(layer);
}

/* MARK: one layer used from several threads at once (calls are serialised inside) */

typedef struct {
    flashmoe_layer_t layer;
    const float *x;
    float y[S * GH];
    int failures;
} thread_job;

static void *forward_many(void *arg) {
    thread_job *job = arg;
    for (int i = 0; i < 10; i++) job->failures += flashmoe_layer_forward(job->layer, job->x, job->y, S, NULL, NULL, NULL) != 0;
    return NULL;
}

static void test_threads(void) {
    gated_weights g = make_gated();
    float *packed[2];
    flashmoe_config_t c = gated_config();
    flashmoe_weights_t w = gated_fused_weights(&g, packed);
    flashmoe_layer_t layer = NULL;
    if (flashmoe_layer_create(&c, &w, &layer) != FLASHMOE_SUCCESS) {
        check(0, "threads: create");
        return;
    }
    static thread_job jobs[4];
    pthread_t threads[4];
    for (int t = 0; t < 4; t++) {
        jobs[t].layer = layer;
        jobs[t].x = g.x;
        jobs[t].failures = 0;
        pthread_create(&threads[t], NULL, forward_many, &jobs[t]);
    }
    int failures = 0, same = 1;
    for (int t = 0; t < 4; t++) {
        pthread_join(threads[t], NULL);
        failures += jobs[t].failures;
        same &= memcmp(jobs[t].y, jobs[0].y, sizeof jobs[0].y) == 0;
    }
    check(failures == 0 && same, "4 threads × 10 forwards on one layer: all succeed with the same y");
    flashmoe_layer_destroy(layer);
    free(packed[0]);
    free(packed[1]);
    free_gated(&g);
}

/* MARK: status strings, version, per-thread errors, GPU backend without a GPU */

static void *other_thread(void *arg) {
    *(int *)arg = strcmp(flashmoe_last_error(), "") == 0;
    return NULL;
}

static void test_misc(void) {
    check(flashmoe_version() == FLASHMOE_VERSION, "flashmoe_version() equals the header's FLASHMOE_VERSION");
    int distinct = 1;
    for (int a = 0; a < FLASHMOE_NUM_STATUS; a++)
        for (int b = 0; b < a; b++)
            distinct &= strcmp(flashmoe_status_string((flashmoe_status_t)a), flashmoe_status_string((flashmoe_status_t)b)) != 0;
    check(distinct, "status strings are distinct");
    check(strcmp(flashmoe_status_string(FLASHMOE_SUCCESS), "success") == 0, "status string of SUCCESS");
    check(strcmp(flashmoe_status_string((flashmoe_status_t)99), "unknown status") == 0, "status string of code 99");

    /* This thread has a message; another thread has none. */
    flashmoe_layer_create(NULL, NULL, NULL);
    check(strlen(flashmoe_last_error()) > 0, "a failure leaves a message");
    int empty = 0;
    pthread_t t;
    pthread_create(&t, NULL, other_thread, &empty);
    pthread_join(t, NULL);
    check(empty, "the last error is per thread (another thread's is \"\")");

    /* GPU layers check their config and weight pointers before touching the driver, so these fail the same way
     * with or without a GPU. */
    {
        flashmoe_config_t cg = small_config();
        cg.backend = FLASHMOE_BACKEND_CUDA;
        flashmoe_weights_t wg = small_weights();
        wg.router = NULL;
        create_fails(cg, wg, "weights->router", "create a GPU layer without a router");
        wg = small_weights();
        wg.gate = zeros;
        create_fails(cg, wg, "weights->gate", "create a GPU layer with gate given in the fused layout");
        cg.device = -3;
        create_fails(cg, small_weights(), "config->device", "create a GPU layer on device -3");
    }

    /* The GPU backend on a machine without a usable GPU: a CUDA (or unsupported) status, never a crash. */
    flashmoe_config_t c = small_config();
    c.backend = FLASHMOE_BACKEND_CUDA;
    flashmoe_weights_t w = small_weights();
    flashmoe_layer_t layer = NULL;
    flashmoe_status_t st = flashmoe_layer_create(&c, &w, &layer);
    if (st == FLASHMOE_SUCCESS) {
        printf("note: a GPU is usable here; the GPU backend is checked by Tests/CABI/gpu_abi_check.py\n");
        flashmoe_layer_destroy(layer);
    } else {
        check((st == FLASHMOE_ERROR_CUDA || st == FLASHMOE_ERROR_UNSUPPORTED) && layer == NULL &&
                  strlen(flashmoe_last_error()) > 0,
              "GPU backend without a GPU: CUDA or UNSUPPORTED status and a message");
    }
}


/* MARK: expert-parallel groups */

/* Whether a GPU layer can be created here. */
static int gpu_usable(void) {
    flashmoe_config_t c = small_config();
    c.backend = FLASHMOE_BACKEND_CUDA;
    flashmoe_weights_t w = small_weights();
    flashmoe_layer_t layer = NULL;
    if (flashmoe_layer_create(&c, &w, &layer) != FLASHMOE_SUCCESS) return 0;
    flashmoe_layer_destroy(layer);
    return 1;
}

static void test_expert_range(void) {
    int32_t first = -1, count = -1, ok = 1, next = 0;
    /* E = 10 over 4 ranks: 3, 3, 2, 2 (the first E mod R ranks one larger), contiguous. */
    const int32_t want[4] = {3, 3, 2, 2};
    for (int r = 0; r < 4; r++) {
        ok &= flashmoe_expert_range(10, 4, r, &first, &count) == FLASHMOE_SUCCESS && first == next && count == want[r];
        next += count;
    }
    check(ok && next == 10, "flashmoe_expert_range: 10 experts over 4 ranks are [0,3) [3,6) [6,8) [8,10)");
    expect_error(flashmoe_expert_range(4, 5, 0, &first, &count), FLASHMOE_ERROR_INVALID_ARGUMENT, "world_size",
                 "expert_range with more ranks than experts");
    expect_error(flashmoe_expert_range(4, 2, 2, &first, &count), FLASHMOE_ERROR_INVALID_ARGUMENT, "rank",
                 "expert_range with rank = world_size");
    expect_error(flashmoe_expert_range(4, 0, 0, &first, &count), FLASHMOE_ERROR_INVALID_ARGUMENT, "world_size",
                 "expert_range with world_size 0");
    expect_error(flashmoe_expert_range(4, 2, 0, NULL, &count), FLASHMOE_ERROR_INVALID_ARGUMENT, "first",
                 "expert_range with first NULL");
}

/* An all-gather between threads: each step, every thread writes its block at its position of a shared table,
 * waits for all, copies the table out and waits again (so no thread overwrites a block another still reads). */
#define GATHER_MAX_RANKS 4
#define GATHER_MAX_BYTES 65536
typedef struct {
    pthread_barrier_t barrier;
    unsigned char table[GATHER_MAX_RANKS * GATHER_MAX_BYTES];
    int world;
    int fail; /* the all-gather reports failure */
} gather_world;

typedef struct {
    gather_world *world;
    int position;                 /* where this thread's block goes (its true rank) */
    int rank;                     /* the rank it tells the library */
    flashmoe_config_t config;
    flashmoe_weights_t weights;
    flashmoe_status_t status;
    char message[1024];
    flashmoe_group_t group;
} group_thread;

static int thread_allgather(void *ctx, const void *send, size_t bytes, void *recv) {
    group_thread *t = ctx;
    gather_world *w = t->world;
    if (w->fail || bytes == 0 || bytes > GATHER_MAX_BYTES) return 1;
    memcpy(w->table + (size_t)t->position * bytes, send, bytes);
    pthread_barrier_wait(&w->barrier);
    memcpy(recv, w->table, bytes * (size_t)w->world);
    pthread_barrier_wait(&w->barrier);
    return 0;
}

static void *group_create_thread(void *arg) {
    group_thread *t = arg;
    flashmoe_group_config_t g = FLASHMOE_GROUP_CONFIG_INIT;
    g.world_size = t->world->world;
    g.rank = t->rank;
    g.allgather = thread_allgather;
    g.ctx = t;
    t->group = NULL;
    t->status = flashmoe_group_create(&t->config, &t->weights, &g, &t->group);
    snprintf(t->message, sizeof t->message, "%s", flashmoe_last_error());
    if (t->status == FLASHMOE_SUCCESS) flashmoe_group_destroy(t->group);
    return NULL;
}

/* Runs `world` ranks on threads (thread i at position i, told rank ranks[i]), each with the config and weights
 * preset in its entry of `threads`, or `base` and `weights` where none is. */
static void run_group(group_thread *threads, int world, const int *ranks, int fail, flashmoe_config_t base,
                      flashmoe_weights_t weights) {
    static gather_world w;
    memset(&w, 0, sizeof w);
    w.world = world;
    w.fail = fail;
    pthread_barrier_init(&w.barrier, NULL, (unsigned)world);
    pthread_t tid[GATHER_MAX_RANKS];
    for (int i = 0; i < world; i++) {
        threads[i].world = &w;
        threads[i].position = i;
        threads[i].rank = ranks[i];
        if (threads[i].config.size == 0) threads[i].config = base;
        if (threads[i].weights.size == 0) threads[i].weights = weights;
        pthread_create(&tid[i], NULL, group_create_thread, &threads[i]);
    }
    for (int i = 0; i < world; i++) pthread_join(tid[i], NULL);
    pthread_barrier_destroy(&w.barrier);
}

/* Every thread of `threads` ended with `status` and a message containing `needle`. */
static void expect_all(group_thread *threads, int world, flashmoe_status_t status, const char *needle,
                       const char *what) {
    for (int i = 0; i < world; i++) {
        int ok = threads[i].status == status && strstr(threads[i].message, needle) != NULL && threads[i].group == NULL;
        check(ok, what);
        if (!ok)
            printf("  rank %d: status %d, expected %d; message \"%s\" should contain \"%s\"\n", i,
                   (int)threads[i].status, (int)status, threads[i].message, needle);
    }
}

static int loopback_allgather(void *ctx, const void *send, size_t bytes, void *recv) {
    (void)ctx;
    memcpy(recv, send, bytes);
    return 0;
}

static void test_group_errors(void) {
    flashmoe_config_t c = small_config();
    c.backend = FLASHMOE_BACKEND_CUDA;
    flashmoe_weights_t w = small_weights();
    flashmoe_group_config_t g = FLASHMOE_GROUP_CONFIG_INIT;
    g.world_size = 2;
    g.rank = 0;
    g.allgather = loopback_allgather;
    flashmoe_group_t group = (flashmoe_group_t)(uintptr_t)0x1234;

    /* Checks of the group config: no all-gather call is made. */
    expect_error(flashmoe_group_create(&c, &w, &g, NULL), FLASHMOE_ERROR_INVALID_ARGUMENT, "group",
                 "group_create with group NULL");
    expect_error(flashmoe_group_create(&c, &w, NULL, &group), FLASHMOE_ERROR_INVALID_ARGUMENT, "group_config",
                 "group_create with group_config NULL");
    check(group == NULL, "a failed group_create writes NULL to *group");
    flashmoe_group_config_t bad = g;
    bad.size = 8;
    expect_error(flashmoe_group_create(&c, &w, &bad, &group), FLASHMOE_ERROR_INVALID_ARGUMENT, "group_config->size",
                 "group_create with a wrong group_config->size");
    bad = g;
    bad.world_size = 0;
    expect_error(flashmoe_group_create(&c, &w, &bad, &group), FLASHMOE_ERROR_INVALID_ARGUMENT,
                 "group_config->world_size", "group_create with world_size 0");
    bad = g;
    bad.rank = 2;
    expect_error(flashmoe_group_create(&c, &w, &bad, &group), FLASHMOE_ERROR_INVALID_ARGUMENT, "group_config->rank",
                 "group_create with rank = world_size");
    bad = g;
    bad.rank = -1;
    expect_error(flashmoe_group_create(&c, &w, &bad, &group), FLASHMOE_ERROR_INVALID_ARGUMENT, "group_config->rank",
                 "group_create with rank -1");
    bad = g;
    bad.allgather = NULL;
    expect_error(flashmoe_group_create(&c, &w, &bad, &group), FLASHMOE_ERROR_INVALID_ARGUMENT,
                 "group_config->allgather", "group_create without an all-gather");
    bad = g;
    bad.weights = 7;
    expect_error(flashmoe_group_create(&c, &w, &bad, &group), FLASHMOE_ERROR_INVALID_ARGUMENT,
                 "group_config->weights", "group_create with weights = 7");

    /* A rank's own checks, on a group of one (its all-gather copies its block): the config, E < ranks, the CPU
     * backend, the weights. The rank takes part in one more step to say why, then fails. */
    flashmoe_group_config_t one = g;
    one.world_size = 1;
    flashmoe_config_t cc = c;
    cc.top_k = 9;
    expect_error(flashmoe_group_create(&cc, &w, &one, &group), FLASHMOE_ERROR_INVALID_ARGUMENT, "config->top_k",
                 "group_create with top_k > experts");
    flashmoe_group_config_t five = g;
    five.world_size = 5;
    expect_error(flashmoe_group_create(&c, &w, &five, &group), FLASHMOE_ERROR_INVALID_ARGUMENT, "config->experts",
                 "group_create with 5 ranks for 4 experts");
    cc = c;
    cc.backend = FLASHMOE_BACKEND_CPU;
    expect_error(flashmoe_group_create(&cc, &w, &one, &group), FLASHMOE_ERROR_UNSUPPORTED, "FLASHMOE_BACKEND_CUDA",
                 "group_create on the CPU backend");
    flashmoe_weights_t ww = w;
    ww.down = NULL;
    expect_error(flashmoe_group_create(&c, &ww, &one, &group), FLASHMOE_ERROR_INVALID_ARGUMENT, "weights->down",
                 "group_create without down");
    check(group == NULL, "failed group_creates leave *group NULL");

    /* FLASHMOE_FLAG_STORAGE_RETURNS keeps 16-bit expert rows: an fp32 layer refuses it, a bf16 one takes it. */
    cc = small_config();
    cc.flags = FLASHMOE_FLAG_STORAGE_RETURNS;
    create_fails(cc, small_weights(), "FLASHMOE_FLAG_STORAGE_RETURNS", "create an fp32 layer with storage rows");
    cc.precision = FLASHMOE_PRECISION_BF16;
    {
        flashmoe_layer_t rows = NULL;
        flashmoe_weights_t zw = small_weights();
        flashmoe_status_t st = flashmoe_layer_create(&cc, &zw, &rows);
        check(st == FLASHMOE_SUCCESS && rows != NULL, "create a bf16 layer with storage rows");
        if (st != FLASHMOE_SUCCESS) printf("  %s\n", flashmoe_last_error());
        flashmoe_layer_destroy(rows);
    }

    /* The calls on handles. */
    expect_error(flashmoe_group_forward(NULL, NULL, NULL, 0, NULL, NULL, NULL, NULL), FLASHMOE_ERROR_INVALID_ARGUMENT,
                 "group is NULL", "group_forward on NULL");
    expect_error(flashmoe_group_forward((flashmoe_group_t)(uintptr_t)0x1230, NULL, NULL, 0, NULL, NULL, NULL, NULL),
                 FLASHMOE_ERROR_INVALID_ARGUMENT, "not a live handle", "group_forward on a made-up handle");
    expect_error(flashmoe_group_check(NULL, 0, NULL), FLASHMOE_ERROR_INVALID_ARGUMENT, "group", "group_check on NULL");
    flashmoe_group_info_t info;
    info.size = sizeof info;
    expect_error(flashmoe_group_info(NULL, &info), FLASHMOE_ERROR_INVALID_ARGUMENT, "group", "group_info on NULL");
    check(flashmoe_group_destroy(NULL) == FLASHMOE_SUCCESS, "group_destroy(NULL) is a no-op");
    expect_error(flashmoe_group_destroy((flashmoe_group_t)(uintptr_t)0x1230), FLASHMOE_ERROR_INVALID_ARGUMENT,
                 "not a live handle", "group_destroy on a made-up handle");
}

/* Ranks on threads. Host arrays stand in for device weights: without a GPU nothing reads them. */
static void test_group_ranks(int gpu) {
    if (gpu) {
        printf("note: a GPU is usable here; groups on threads are checked without one (and on the GPU by "
               "scripts/gpu-dist-python)\n");
        return;
    }
    flashmoe_config_t c = small_config();
    c.backend = FLASHMOE_BACKEND_CUDA;
    flashmoe_weights_t w = small_weights();
    group_thread t[GATHER_MAX_RANKS];
    const int ranks[3] = {0, 1, 2};

    memset(t, 0, sizeof t);
    run_group(t, 3, ranks, 0, c, w);
    expect_all(t, 3, FLASHMOE_ERROR_CUDA, "ranks 0, 1, 2 of the group have no usable CUDA driver",
               "3 ranks without a GPU: every rank reports the ranks without a driver");

    memset(t, 0, sizeof t);
    t[2].config = c;
    t[2].config.top_k = 1;
    run_group(t, 3, ranks, 0, c, w);
    expect_all(t, 3, FLASHMOE_ERROR_INVALID_ARGUMENT, "rank 2's layer differs",
               "a rank with another config: every rank names it");

    memset(t, 0, sizeof t);
    const int twice[3] = {0, 0, 2};
    run_group(t, 3, twice, 0, c, w);
    expect_all(t, 3, FLASHMOE_ERROR_INVALID_ARGUMENT, "were all given rank 0",
               "two processes given rank 0: every rank names them");

    memset(t, 0, sizeof t);
    t[1].weights = w;
    t[1].weights.router = NULL;
    run_group(t, 3, ranks, 0, c, w);
    check(t[1].status == FLASHMOE_ERROR_INVALID_ARGUMENT && strstr(t[1].message, "weights->router") != NULL,
          "the rank without a router names weights->router");
    for (int i = 0; i < 3; i += 2) {
        int ok = t[i].status == FLASHMOE_ERROR_GROUP && strstr(t[i].message, "rank 1 gave up") != NULL &&
                 strstr(t[i].message, "weights->router") != NULL;
        check(ok, "the other ranks fail at once with FLASHMOE_ERROR_GROUP and rank 1's reason");
        if (!ok) printf("  rank %d: status %d, message \"%s\"\n", i, (int)t[i].status, t[i].message);
    }

    memset(t, 0, sizeof t);
    run_group(t, 2, ranks, 1, c, w);
    expect_all(t, 2, FLASHMOE_ERROR_GROUP, "all-gather returned 1", "a failing all-gather: FLASHMOE_ERROR_GROUP");
}

int main(void) {
    check(strcmp(flashmoe_last_error(), "") == 0, "no message before the first failure");
    test_misc();
    test_gated_softmax();
    test_plain_sigmoid(1);
    test_plain_sigmoid(0);
    test_create_errors();
    test_forward_errors();
    test_threads();
    test_expert_range();
    test_group_errors();
    test_group_ranks(gpu_usable());
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
