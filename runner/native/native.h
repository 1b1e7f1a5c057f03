/* What the runner's C kernels share: the panel layout's constants, the quantized matmul (qmm.c) and the dense one
 * (dense.c), which the decode step (decode.c) calls for its projections. */
#ifndef RUNNER_NATIVE_H
#define RUNNER_NATIVE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define PANEL 16  /* output rows per panel */
#define HALF 1    /* scales (and lows) are fp16 */
#define LOWS 2    /* lows are stored */

/* A buffer of at least `floats` floats, 64-byte aligned, kept in *buffer between calls and grown as needed (its
 * length in *len): allocating it per call would fault its pages in again. NULL when memory ran out. */
static inline float *kept_buffer(float **buffer, int64_t *len, int64_t floats) {
    if (*len < floats) {
        free(*buffer);
        *buffer = aligned_alloc(64, (size_t)((floats * 4 + 63) / 64 * 64));
        *len = *buffer ? floats : 0;
    }
    return *buffer;
}

/* out[M, N] (row stride ldo) = x[M, K] (row stride ldx) @ W^T, W held in panels (qmm.c describes them).
 * Returns 0, or -1 when a buffer could not be allocated. */
int qmm_into(const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *qweight, const uint8_t *scales,
             int64_t N, int32_t bits, int64_t group, int32_t flags, float *out, int64_t ldo);

/* rows of x [rows, K] (row stride ldx) against one panel of 16 output rows held in fp32 [K][16]: out's first
 * `width` columns (row stride ldo). */
void panel_many(const float *x, int64_t rows, int64_t K, int64_t ldx, const float *buf, float *out, int64_t ldo,
                int64_t width);

/* The output rows of one dense panel (dense.c): 32 with AVX-512, else 16 (PANEL). */
int64_t dense_width(void);

/* rows of x against one float32 dense panel [K][dense_width()]: out's first `width` columns (row stride ldo). */
void dense_rows(const float *x, int64_t rows, int64_t K, int64_t ldx, const float *panel, float *out, int64_t ldo,
                int64_t width);

/* out[M, N] (row stride ldo) = x[M, K] (row stride ldx) @ W^T, W held in dense panels of float32 (bits 32) or
 * bfloat16 (bits 16) (dense.c describes them). Returns 0, -1 when a buffer could not be allocated, -2 for bfloat16
 * panels in a build without AVX-512 BF16. */
int dense_into(const float *x, int64_t M, int64_t K, int64_t ldx, const void *panels, int64_t N, int32_t bits,
               float *out, int64_t ldo);

#endif
