/*
 * abi_support.h — what the C ABI tests share (Tests/CABI/abi_test.c, Tests/CABI/abi_fp8_test.c): the pass/fail
 * count, checks of a call's status and message, a seeded generator, and bfloat16 rounding.
 */
#ifndef ABI_SUPPORT_H
#define ABI_SUPPORT_H

#include "flashmoe.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int passed, failed;

static inline void check(int ok, const char *what) {
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL: %s\n", what);
    }
}

/* A call must fail with `expected` and a message that contains `needle` (the argument's name). */
static inline void expect_error(flashmoe_status_t got, flashmoe_status_t expected, const char *needle, const char *what) {
    const char *message = flashmoe_last_error();
    int ok = got == expected && strstr(message, needle) != NULL;
    if (ok) {
        passed++;
    } else {
        failed++;
        printf("FAIL: %s: status %d (%s), expected %d; message \"%s\" should name \"%s\"\n", what, (int)got,
               flashmoe_status_string(got), (int)expected, message, needle);
    }
}

/* MARK: random values and bf16 */

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static inline float uniform(float scale) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    double u = (double)(rng_state >> 11) / 9007199254740992.0; /* [0, 1) */
    return (float)((2.0 * u - 1.0) * scale);
}

static inline float *random_array(size_t n, float scale) {
    float *a = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) a[i] = uniform(scale);
    return a;
}

/* float -> bfloat16 bits, round to nearest even (finite inputs only here). */
static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#endif /* ABI_SUPPORT_H */
