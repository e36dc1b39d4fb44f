/*
 * abi_fp8_test.c — FLASHMOE_PRECISION_FP8 through the C ABI (include/flashmoe.h), on the CPU backend.
 *
 * 1. One layer three ways: bfloat16 expert matrices that create quantizes; E4M3 codes with block scales in the
 *    fused layout; the same in the separate layout. The codes and scales are computed here by the rule docs/fp8.md
 *    states (scale = amax / 448 in float32, code = value / scale rounded to E4M3, ties to even), so all three
 *    layers must give the same y, bit for bit: a scale read from the wrong block, expert or matrix breaks that
 *    (the blocks' magnitudes differ by up to 2^6). A shape with partial 128-blocks (H = 160, I = 96) repeats it in
 *    the separate layout, and both are compared with an FP32 layer of the dequantized weights (the activations'
 *    E4M3 rounding costs a few percent).
 * 2. The scales' argument errors (each names its field), a non-finite scale, and a version 0.4 weights struct.
 *
 * Prints one line per failed check and "N passed, M failed"; exits 1 on any failure.
 * Build: cc -std=c11 -Iinclude Tests/CABI/abi_fp8_test.c -Llib -lflashmoe -lm (see Tests/CABI/run.sh).
 */
#include "flashmoe.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "abi_support.h"

/* MARK: E4M3 (float8_e4m3fn) and the block quantization of docs/fp8.md */

/* The nearest E4M3 code to a finite float, ties to even, saturating at 448. */
static uint8_t to_e4m3(float v) {
    uint8_t sign = signbit(v) ? 0x80 : 0;
    float a = fabsf(v);
    if (a >= 448) return sign | 0x7E;
    if (a < 0.015625f) return sign | (uint8_t)nearbyintf(a * 512); /* subnormals: steps of 2^-9 */
    int e;
    frexpf(a, &e); /* a = f * 2^e, f in [0.5, 1) */
    e -= 1;        /* a = f' * 2^e, f' in [1, 2) */
    int r = (int)nearbyintf(ldexpf(a, 3 - e));
    if (r == 16) {
        r = 8;
        e += 1;
    }
    return sign | (uint8_t)((e + 7) << 3) | (uint8_t)(r - 8);
}

static float from_e4m3(uint8_t c) {
    float sign = c & 0x80 ? -1.0f : 1.0f;
    int e = (c >> 3) & 0x0F, m = c & 7;
    if (e == 0) return sign * m * 0.001953125f;
    return sign * ldexpf(8.0f + m, e - 10);
}

/* Quantizes M matrices [R, C] (float values) into codes and scales [M, ceil(R/128), ceil(C/128)]; `dequantized`
 * receives code * scale. */
static void quantize(const float *v, int M, int R, int C, uint8_t *codes, float *scales, float *dequantized) {
    int br = (R + 127) / 128, bc = (C + 127) / 128;
    for (int m = 0; m < M; m++)
        for (int bi = 0; bi < br; bi++)
            for (int bj = 0; bj < bc; bj++) {
                float amax = 0;
                for (int r = bi * 128; r < R && r < bi * 128 + 128; r++)
                    for (int c = bj * 128; c < C && c < bj * 128 + 128; c++)
                        amax = fmaxf(amax, fabsf(v[((size_t)m * R + r) * C + c]));
                float s = amax / 448.0f;
                if (!(s > 0)) s = 1;
                scales[((size_t)m * br + bi) * bc + bj] = s;
                for (int r = bi * 128; r < R && r < bi * 128 + 128; r++)
                    for (int c = bj * 128; c < C && c < bj * 128 + 128; c++) {
                        size_t i = ((size_t)m * R + r) * C + c;
                        codes[i] = to_e4m3(v[i] / s);
                        dequantized[i] = from_e4m3(codes[i]) * s;
                    }
            }
}

/* MARK: one layer, four ways */

enum { TOKENS = 29, K = 2, E = 4, IS = 64 };

typedef struct {
    int H, I;
    /* bfloat16 values as float (the layer's values) */
    float *router, *w1, *w3, *w2, *sw1, *sw3, *sw2, *x;
    uint16_t *b_router, *b_w1, *b_w3, *b_w2, *b_sw1, *b_sw3, *b_sw2, *b_x, *b_gate_up, *b_sgate_up;
    /* E4M3 codes and scales of w1, w3, w2, and of gate_up (fused) */
    uint8_t *c_w1, *c_w3, *c_w2, *c_gate_up;
    float *s_w1, *s_w3, *s_w2, *s_gate_up;
    /* code * scale */
    float *d_w1, *d_w3, *d_w2;
} fp8_layer;

static size_t blocks(int R, int C) { return (size_t)((R + 127) / 128) * ((C + 127) / 128); }

/* Random bf16 values, each 128x128 block (of each matrix) scaled by its own power of two in 2^-3 .. 2^3. */
static float *blocky(int M, int R, int C, float scale, uint16_t **bits) {
    float *v = malloc((size_t)M * R * C * sizeof(float));
    *bits = malloc((size_t)M * R * C * sizeof(uint16_t));
    int bc = (C + 127) / 128, br = (R + 127) / 128;
    float *factor = malloc((size_t)M * br * bc * sizeof(float));
    for (size_t b = 0; b < (size_t)M * br * bc; b++) factor[b] = ldexpf(1, (int)floorf(uniform(3.99f)));
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++)
            for (int c = 0; c < C; c++) {
                size_t i = ((size_t)m * R + r) * C + c;
                (*bits)[i] = to_bf16(uniform(scale) * factor[((size_t)m * br + r / 128) * bc + c / 128]);
                v[i] = from_bf16((*bits)[i]);
            }
    free(factor);
    return v;
}

static uint16_t *concat_rows16(const uint16_t *a, const uint16_t *b, int M, int R, int C) {
    uint16_t *out = malloc((size_t)M * 2 * R * C * 2);
    for (int m = 0; m < M; m++) {
        memcpy(out + (size_t)m * 2 * R * C, a + (size_t)m * R * C, (size_t)R * C * 2);
        memcpy(out + ((size_t)m * 2 + 1) * R * C, b + (size_t)m * R * C, (size_t)R * C * 2);
    }
    return out;
}

static fp8_layer make_layer(int H, int I) {
    fp8_layer L;
    memset(&L, 0, sizeof L);
    L.H = H;
    L.I = I;
    float sh = 1 / sqrtf((float)H), si = 1 / sqrtf((float)I);
    L.router = blocky(1, E, H, sh, &L.b_router);
    L.w1 = blocky(E, I, H, sh, &L.b_w1);
    L.w3 = blocky(E, I, H, sh, &L.b_w3);
    L.w2 = blocky(E, H, I, si, &L.b_w2);
    L.sw1 = blocky(1, IS, H, sh, &L.b_sw1);
    L.sw3 = blocky(1, IS, H, sh, &L.b_sw3);
    L.sw2 = blocky(1, H, IS, 1 / sqrtf((float)IS), &L.b_sw2);
    L.x = blocky(1, TOKENS, H, 1, &L.b_x);
    L.b_gate_up = concat_rows16(L.b_w1, L.b_w3, E, I, H);
    L.b_sgate_up = concat_rows16(L.b_sw1, L.b_sw3, 1, IS, H);
    size_t n1 = (size_t)E * I * H;
    L.c_w1 = malloc(n1), L.c_w3 = malloc(n1), L.c_w2 = malloc(n1);
    L.d_w1 = malloc(n1 * 4), L.d_w3 = malloc(n1 * 4), L.d_w2 = malloc(n1 * 4);
    L.s_w1 = malloc(E * blocks(I, H) * 4), L.s_w3 = malloc(E * blocks(I, H) * 4), L.s_w2 = malloc(E * blocks(H, I) * 4);
    quantize(L.w1, E, I, H, L.c_w1, L.s_w1, L.d_w1);
    quantize(L.w3, E, I, H, L.c_w3, L.s_w3, L.d_w3);
    quantize(L.w2, E, H, I, L.c_w2, L.s_w2, L.d_w2);
    if (I % 128 == 0) {
        /* The fused tensor quantized as one [2I, H] matrix per expert: with I a multiple of 128 its blocks are
         * the gate's then the up's, so its codes and scales are theirs, concatenated. */
        float *fused = malloc(2 * n1 * 4), *dq = malloc(2 * n1 * 4);
        for (int m = 0; m < E; m++) {
            memcpy(fused + (size_t)m * 2 * I * H, L.w1 + (size_t)m * I * H, (size_t)I * H * 4);
            memcpy(fused + ((size_t)m * 2 + 1) * I * H, L.w3 + (size_t)m * I * H, (size_t)I * H * 4);
        }
        L.c_gate_up = malloc(2 * n1);
        L.s_gate_up = malloc(E * blocks(2 * I, H) * 4);
        quantize(fused, E, 2 * I, H, L.c_gate_up, L.s_gate_up, dq);
        free(fused);
        free(dq);
    }
    return L;
}

static void free_layer(fp8_layer *L) {
    void *all[] = {L->router, L->w1, L->w3, L->w2, L->sw1, L->sw3, L->sw2, L->x, L->b_router, L->b_w1, L->b_w3,
                   L->b_w2, L->b_sw1, L->b_sw3, L->b_sw2, L->b_x, L->b_gate_up, L->b_sgate_up, L->c_w1, L->c_w3,
                   L->c_w2, L->c_gate_up, L->s_w1, L->s_w3, L->s_w2, L->s_gate_up, L->d_w1, L->d_w3, L->d_w2};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
}

static flashmoe_config_t config(const fp8_layer *L, int precision) {
    flashmoe_config_t c = FLASHMOE_CONFIG_INIT;
    c.hidden = L->H;
    c.intermediate = L->I;
    c.experts = E;
    c.top_k = K;
    c.shared_intermediate = IS;
    c.precision = precision;
    c.backend = FLASHMOE_BACKEND_CPU;
    c.max_tokens = TOKENS;
    return c;
}

/* The weights with the router and the shared expert in bf16 (separate shared layout when `separate`). */
static flashmoe_weights_t base_weights(const fp8_layer *L, int separate) {
    flashmoe_weights_t w = FLASHMOE_WEIGHTS_INIT;
    w.layout = separate ? FLASHMOE_LAYOUT_SEPARATE : FLASHMOE_LAYOUT_FUSED;
    w.router = L->b_router;
    w.shared_gate_up = separate ? (const void *)L->b_sw1 : (const void *)L->b_sgate_up;
    w.shared_up = separate ? L->b_sw3 : NULL;
    w.shared_down = L->b_sw2;
    return w;
}

/* y of a CPU layer created from `c` and `w` (NULL when create fails: the message is printed). */
static float *forward(flashmoe_config_t c, flashmoe_weights_t w, const void *x, const char *name) {
    flashmoe_layer_t layer = NULL;
    flashmoe_status_t st = flashmoe_layer_create(&c, &w, &layer);
    char what[256];
    snprintf(what, sizeof what, "%s: create succeeds (%s)", name, st ? flashmoe_last_error() : "");
    check(st == FLASHMOE_SUCCESS, what);
    if (st != FLASHMOE_SUCCESS) return NULL;
    float *y = malloc((size_t)TOKENS * c.hidden * 4);
    for (size_t i = 0; i < (size_t)TOKENS * c.hidden; i++) y[i] = NAN;
    st = flashmoe_layer_forward(layer, x, y, TOKENS, NULL, NULL, NULL);
    snprintf(what, sizeof what, "%s: forward succeeds (%s)", name, st ? flashmoe_last_error() : "");
    check(st == FLASHMOE_SUCCESS, what);
    flashmoe_layer_destroy(layer);
    return y;
}

static void same_bits(const float *a, const float *b, int H, const char *what) {
    check(a && b && memcmp(a, b, (size_t)TOKENS * H * 4) == 0, what);
}

static double relative(const float *a, const float *b, size_t n) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        r += (double)b[i] * b[i];
    }
    return sqrt(d / (r > 0 ? r : 1));
}

static void test_layer(int H, int I) {
    fp8_layer L = make_layer(H, I);
    char name[64], what[256];
    snprintf(name, sizeof name, "fp8 H=%d I=%d", H, I);
    flashmoe_config_t c = config(&L, FLASHMOE_PRECISION_FP8);

    /* bf16 experts, quantized by create (fused layout when I allows the fused scales' test below too). */
    flashmoe_weights_t wb = base_weights(&L, 1);
    wb.gate = L.b_w1;
    wb.up = L.b_w3;
    wb.down = L.b_w2;
    snprintf(what, sizeof what, "%s, bf16 experts", name);
    float *y_bf16 = forward(c, wb, L.b_x, what);

    /* E4M3 codes and scales, separate layout. */
    flashmoe_weights_t ws = base_weights(&L, 1);
    ws.gate = L.c_w1;
    ws.up = L.c_w3;
    ws.down = L.c_w2;
    ws.gate_scale = L.s_w1;
    ws.up_scale = L.s_w3;
    ws.down_scale = L.s_w2;
    snprintf(what, sizeof what, "%s, E4M3 separate", name);
    float *y_sep = forward(c, ws, L.b_x, what);
    snprintf(what, sizeof what, "%s: E4M3 codes and scales (separate) give the bf16 experts' y bit for bit", name);
    same_bits(y_sep, y_bf16, H, what);

    if (L.c_gate_up) {
        flashmoe_weights_t wf = base_weights(&L, 0);
        wf.gate_up = L.c_gate_up;
        wf.down = L.c_w2;
        wf.gate_up_scale = L.s_gate_up;
        wf.down_scale = L.s_w2;
        snprintf(what, sizeof what, "%s, E4M3 fused", name);
        float *y_fused = forward(c, wf, L.b_x, what);
        snprintf(what, sizeof what, "%s: E4M3 codes and scales (fused) give the bf16 experts' y bit for bit", name);
        same_bits(y_fused, y_bf16, H, what);
        free(y_fused);
    }

    /* An FP32 layer of the dequantized weights: y differs by the activations' E4M3 rounding, a few percent. */
    flashmoe_config_t c32 = config(&L, FLASHMOE_PRECISION_FP32);
    flashmoe_weights_t w32 = base_weights(&L, 1);
    w32.router = L.router;
    w32.shared_gate_up = L.sw1;
    w32.shared_up = L.sw3;
    w32.shared_down = L.sw2;
    w32.gate = L.d_w1;
    w32.up = L.d_w3;
    w32.down = L.d_w2;
    snprintf(what, sizeof what, "%s, fp32 of the dequantized weights", name);
    float *y32 = forward(c32, w32, L.x, what);
    if (y32 && y_bf16) {
        double err = relative(y_bf16, y32, (size_t)TOKENS * H);
        snprintf(what, sizeof what, "%s: y within 0.08 of fp32 on the dequantized weights (relative error %.3g)", name,
                 err);
        check(err < 0.08, what);
    }
    free(y32);
    free(y_bf16);
    free(y_sep);
    free_layer(&L);
}

/* MARK: errors */

static void create_fails(flashmoe_config_t c, flashmoe_weights_t w, const char *needle, const char *what) {
    flashmoe_layer_t layer = NULL;
    expect_error(flashmoe_layer_create(&c, &w, &layer), FLASHMOE_ERROR_INVALID_ARGUMENT, needle, what);
    if (layer) flashmoe_layer_destroy(layer);
}

static void test_errors(void) {
    fp8_layer L = make_layer(256, 128);
    flashmoe_config_t c = config(&L, FLASHMOE_PRECISION_FP8);
    flashmoe_weights_t ok = base_weights(&L, 0);
    ok.gate_up = L.c_gate_up;
    ok.down = L.c_w2;
    ok.gate_up_scale = L.s_gate_up;
    ok.down_scale = L.s_w2;

    flashmoe_weights_t w = ok;
    w.down_scale = NULL;
    create_fails(c, w, "down_scale", "fp8: gate_up_scale without down_scale");
    w = ok;
    w.gate_scale = L.s_w1;
    create_fails(c, w, "gate_scale", "fp8: gate_scale with the fused layout");
    w = ok;
    w.gate_up_scale = (const float *)((const char *)L.s_gate_up + 2);
    create_fails(c, w, "gate_up_scale", "fp8: a misaligned gate_up_scale");
    flashmoe_config_t cb = config(&L, FLASHMOE_PRECISION_BF16);
    w = ok;
    w.gate_up = L.b_gate_up;
    w.down = L.b_w2;
    create_fails(cb, w, "gate_up_scale", "bf16 layer given block scales");

    /* A NaN and an infinite scale are refused, naming the field. */
    float *bad = malloc(E * blocks(L.H, L.I) * 4);
    memcpy(bad, L.s_w2, E * blocks(L.H, L.I) * 4);
    bad[3] = NAN;
    w = ok;
    w.down_scale = bad;
    create_fails(c, w, "down_scale", "fp8: a NaN in down_scale");
    bad[3] = INFINITY;
    create_fails(c, w, "finite", "fp8: an infinite down_scale says scales must be finite");
    free(bad);

    /* Fused E4M3 with I not a multiple of 128: a scale block would hold gate and up rows. */
    fp8_layer odd = make_layer(160, 96);
    flashmoe_config_t co = config(&odd, FLASHMOE_PRECISION_FP8);
    flashmoe_weights_t wo = base_weights(&odd, 0);
    uint8_t *codes = calloc((size_t)E * 2 * 96 * 160, 1);
    float *scales = calloc((size_t)E * blocks(192, 160), 4);
    wo.gate_up = codes;
    wo.down = odd.c_w2;
    wo.gate_up_scale = scales;
    wo.down_scale = odd.s_w2;
    create_fails(co, wo, "multiple of 128", "fp8: fused E4M3 with I = 96");
    free(codes);
    free(scales);
    free_layer(&odd);

    /* A version 0.4 struct (no *_scale fields) is read up to its size; with a newer version at that size, refused. */
    flashmoe_weights_t old = base_weights(&L, 0);
    old.gate_up = L.b_gate_up;
    old.down = L.b_w2;
    old.size = offsetof(flashmoe_weights_t, gate_up_scale);
    old.version = 400;
    old.gate_up_scale = L.s_gate_up; /* past the old size: never read */
    flashmoe_layer_t layer = NULL;
    flashmoe_status_t st = flashmoe_layer_create(&cb, &old, &layer);
    char what[256];
    snprintf(what, sizeof what, "a version 0.4 weights struct creates a bf16 layer (%s)", st ? flashmoe_last_error() : "");
    check(st == FLASHMOE_SUCCESS, what);
    flashmoe_layer_destroy(layer);
    old.version = FLASHMOE_VERSION;
    create_fails(cb, old, "weights->size", "the 0.4 size with version 0.5");
    free_layer(&L);
}

int main(void) {
    test_layer(256, 128);
    test_layer(160, 96);
    test_errors();
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
