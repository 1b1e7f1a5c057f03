/* Matmuls over float32 or bfloat16 weights held in the runner's own panels: the projections of a model kept in
 * full precision, for batches and for the decode step (decode.c).
 *
 * A weight [N, K] is held in panels of DENSE_WIDTH output rows (32 where AVX-512 is built in, else 16), the last
 * one zero-padded. Within a panel, k runs slowest:
 *   - float32 (bits 32): the panel's DENSE_WIDTH values of one k together;
 *   - bfloat16 (bits 16): the values of two k's side by side for each row, [K / 2][DENSE_WIDTH][2], the pairs
 *     AVX-512 BF16's dot product takes (vdpbf16ps); K must be even.
 * Each panel runs a register tile over up to TILE rows of activations at a time, the whole K, so a panel's weights
 * are read from memory once per call (once per block of BLOCK_ROWS rows when there are more). bfloat16 panels take
 * the activations rounded to bfloat16 (to nearest even), as torch's bf16 linear does, and sum in float32.
 *
 * A GEMM library (oneDNN) reaches about the same speed on these sizes; the point of our own is that the decode
 * step can run every layer's products in one C call, with nothing in Python between them.
 */
#include "native.h"

#ifdef __AVX512F__
#define DENSE_WIDTH 32
#define TILE_ROWS 12
#else
#define DENSE_WIDTH PANEL
#define TILE_ROWS 6
#endif
/* k's ahead whose weights a tile asks for (8 KiB): where a step streams every weight from memory, 2 cores keep
 * more bytes in flight than the hardware prefetcher alone does (SmolLM2's products at 64 rows: ~5% faster) */
#define PREFETCH 64
#define BLOCK_ROWS 96  /* rows per block when there are more: their activations stay in the core's L2 */

int runner_dense_bf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

static inline int64_t panels_of(int64_t N) { return (N + DENSE_WIDTH - 1) / DENSE_WIDTH; }

/* Bytes the panels of an [N, K] weight take. */
int64_t runner_dense_bytes(int64_t N, int64_t K, int32_t bits) { return panels_of(N) * K * DENSE_WIDTH * bits / 8; }

/* w [N, K] row-major (float32, or bfloat16 as uint16) into panels (runner_dense_bytes of them). */
void runner_dense_pack(const void *w, int64_t N, int64_t K, int32_t bits, void *out) {
    #pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < panels_of(N); p++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < DENSE_WIDTH; j++) {
                const int64_t n = p * DENSE_WIDTH + j;
                if (bits == 32) {
                    ((float *)out)[(p * K + k) * DENSE_WIDTH + j] = n < N ? ((const float *)w)[n * K + k] : 0.0f;
                } else {
                    const int64_t at = (p * K + k / 2 * 2) * DENSE_WIDTH + 2 * j + k % 2;
                    ((uint16_t *)out)[at] = n < N ? ((const uint16_t *)w)[n * K + k] : 0;
                }
            }
}

#ifdef __AVX512F__
/* rows (<= TILE_ROWS) of x against one float32 panel: 2 x rows accumulators of 16 */
static inline __attribute__((always_inline)) void tile32(const float *x, int rows, int64_t K, int64_t ldx,
                                                         const float *w, float *out, int64_t ldo, int64_t width) {
    __m512 acc[TILE_ROWS][2];
    for (int m = 0; m < rows; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        _mm_prefetch((const char *)(w + (k + PREFETCH) * DENSE_WIDTH), _MM_HINT_T0);
        const __m512 w0 = _mm512_load_ps(w + k * DENSE_WIDTH), w1 = _mm512_load_ps(w + k * DENSE_WIDTH + 16);
        for (int m = 0; m < rows; m++) {
            const __m512 xv = _mm512_set1_ps(x[m * ldx + k]);
            acc[m][0] = _mm512_fmadd_ps(w0, xv, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(w1, xv, acc[m][1]);
        }
    }
    const __mmask16 lo = width >= 16 ? 0xFFFF : (__mmask16)((1u << width) - 1);
    const __mmask16 hi = width >= 32 ? 0xFFFF : width <= 16 ? 0 : (__mmask16)((1u << (width - 16)) - 1);
    for (int m = 0; m < rows; m++) {
        _mm512_mask_storeu_ps(out + m * ldo, lo, acc[m][0]);
        _mm512_mask_storeu_ps(out + m * ldo + 16, hi, acc[m][1]);
    }
}
#endif

#ifdef __AVX512BF16__
/* rows (<= TILE_ROWS) of bfloat16 x against one bfloat16 panel, two k's per dot product, into acc */
static inline __attribute__((always_inline)) void sums16(const uint16_t *x, int rows, int64_t K, int64_t ldx,
                                                         const uint16_t *w, __m512 acc[TILE_ROWS][2]) {
    for (int m = 0; m < rows; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) {
        _mm_prefetch((const char *)(w + (k + 2 * PREFETCH) * DENSE_WIDTH), _MM_HINT_T0);
        const __m512bh w0 = (__m512bh)_mm512_load_si512(w + k * DENSE_WIDTH);
        const __m512bh w1 = (__m512bh)_mm512_load_si512(w + k * DENSE_WIDTH + 32);
        for (int m = 0; m < rows; m++) {
            uint32_t pair;
            memcpy(&pair, x + m * ldx + k, 4);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xv);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xv);
        }
    }
}

/* ... stored in float32 */
static inline __attribute__((always_inline)) void tile16(const uint16_t *x, int rows, int64_t K, int64_t ldx,
                                                         const uint16_t *w, float *out, int64_t ldo, int64_t width) {
    __m512 acc[TILE_ROWS][2];
    sums16(x, rows, K, ldx, w, acc);
    const __mmask16 lo = width >= 16 ? 0xFFFF : (__mmask16)((1u << width) - 1);
    const __mmask16 hi = width >= 32 ? 0xFFFF : width <= 16 ? 0 : (__mmask16)((1u << (width - 16)) - 1);
    for (int m = 0; m < rows; m++) {
        _mm512_mask_storeu_ps(out + m * ldo, lo, acc[m][0]);
        _mm512_mask_storeu_ps(out + m * ldo + 16, hi, acc[m][1]);
    }
}

/* ... stored rounded to bfloat16 (to nearest even), as torch's bf16 linear gives them */
static inline __attribute__((always_inline)) void tile16h(const uint16_t *x, int rows, int64_t K, int64_t ldx,
                                                          const uint16_t *w, uint16_t *out, int64_t ldo,
                                                          int64_t width) {
    __m512 acc[TILE_ROWS][2];
    sums16(x, rows, K, ldx, w, acc);
    const __mmask16 lo = width >= 16 ? 0xFFFF : (__mmask16)((1u << width) - 1);
    const __mmask16 hi = width >= 32 ? 0xFFFF : width <= 16 ? 0 : (__mmask16)((1u << (width - 16)) - 1);
    for (int m = 0; m < rows; m++) {
        _mm256_mask_storeu_epi16(out + m * ldo, lo, (__m256i)_mm512_cvtneps_pbh(acc[m][0]));
        _mm256_mask_storeu_epi16(out + m * ldo + 16, hi, (__m256i)_mm512_cvtneps_pbh(acc[m][1]));
    }
}

/* The calling thread's activations rounded to bfloat16 (kept_buffer) */
static __thread float *halves;
static __thread int64_t halves_len;
#endif

/* rows of x against one panel, TILE_ROWS at a time; a constant row count per call keeps the tile in registers */
#define ROWS_SWITCH(fn, X, n, ...) switch (n) { \
    case 12: fn(X, 12, __VA_ARGS__); break; case 11: fn(X, 11, __VA_ARGS__); break; \
    case 10: fn(X, 10, __VA_ARGS__); break; case 9: fn(X, 9, __VA_ARGS__); break; \
    case 8: fn(X, 8, __VA_ARGS__); break; case 7: fn(X, 7, __VA_ARGS__); break; \
    case 6: fn(X, 6, __VA_ARGS__); break; case 5: fn(X, 5, __VA_ARGS__); break; \
    case 4: fn(X, 4, __VA_ARGS__); break; case 3: fn(X, 3, __VA_ARGS__); break; \
    case 2: fn(X, 2, __VA_ARGS__); break; case 1: fn(X, 1, __VA_ARGS__); break; default: break; }

static void panel_rows(const void *x, int64_t rows, int64_t K, int64_t ldx, const uint8_t *panel, int32_t bits,
                       float *out, int64_t ldo, int64_t width) {
    /* rows dealt evenly over the fewest tiles (64 rows: 11, 11, 11, 11, 10, 10, not 12 x 5 and a tile of 4,
     * whose weight loads are shared by few rows) */
    int64_t tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
    for (int64_t m = 0, n; m < rows; m += n, tiles--) {
        n = (rows - m + tiles - 1) / tiles;
#ifdef __AVX512BF16__
        if (bits == 16) {
            const uint16_t *xm = (const uint16_t *)x + m * ldx;
            ROWS_SWITCH(tile16, xm, n, K, ldx, (const uint16_t *)panel, out + m * ldo, ldo, width)
            continue;
        }
#endif
        const float *xm = (const float *)x + m * ldx;
#ifdef __AVX512F__
        ROWS_SWITCH(tile32, xm, n, K, ldx, (const float *)panel, out + m * ldo, ldo, width)
#else
        panel_many(xm, n, K, ldx, (const float *)panel, out + m * ldo, ldo, width);
#endif
    }
}

int64_t dense_width(void) { return DENSE_WIDTH; }

void dense_rows(const float *x, int64_t rows, int64_t K, int64_t ldx, const float *panel, float *out, int64_t ldo,
                int64_t width) {
    panel_rows(x, rows, K, ldx, (const uint8_t *)panel, 32, out, ldo, width);
}

int dense_into(const float *x, int64_t M, int64_t K, int64_t ldx, const void *panels, int64_t N, int32_t bits,
               float *out, int64_t ldo) {
    if (M == 0) return 0;
    const void *a = x;
    int64_t lda = ldx;
    if (bits == 16) {
#ifdef __AVX512BF16__
        /* the activations rounded to bfloat16 once, [M, K] */
        float *space = kept_buffer(&halves, &halves_len, (M * K + 1) / 2 + 16);
        if (!space) return -1;
        uint16_t *h = (uint16_t *)space;
        for (int64_t m = 0; m < M; m++) {
            int64_t k = 0;
            for (; k + 16 <= K; k += 16)
                _mm256_storeu_si256((__m256i *)(h + m * K + k),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + m * ldx + k)));
            for (; k < K; k++) {
                __m512 one = _mm512_set1_ps(x[m * ldx + k]);
                __m256i r = (__m256i)_mm512_cvtneps_pbh(one);
                h[m * K + k] = (uint16_t)_mm256_extract_epi16(r, 0);
            }
        }
        a = h;
        lda = K;
#else
        return -2;  /* not built in: the caller keeps such weights in torch's form */
#endif
    }
    const int64_t count = panels_of(N), blocks = (M + BLOCK_ROWS - 1) / BLOCK_ROWS;
    const int64_t panel_bytes = K * DENSE_WIDTH * bits / 8, row_bytes = lda * bits / 8;
    /* a block of rows at a time, its panels shared out: a thread's rows stay in its L2 while the panels stream */
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t p = 0; p < count; p++) {
            const int64_t m = b * BLOCK_ROWS, rows = M - m < BLOCK_ROWS ? M - m : BLOCK_ROWS;
            const int64_t width = N - p * DENSE_WIDTH < DENSE_WIDTH ? N - p * DENSE_WIDTH : DENSE_WIDTH;
            panel_rows((const uint8_t *)a + m * row_bytes, rows, K, lda, (const uint8_t *)panels + p * panel_bytes,
                       bits, out + m * ldo + p * DENSE_WIDTH, ldo, width);
        }
    return 0;
}

/* out[M, N] (bfloat16, row stride ldo) = x[M, K] (bfloat16, row stride ldx) @ W^T, W in bfloat16 panels: a bf16
 * model's products with neither side widened to float32 in memory. Returns 0, or -2 in a build without AVX-512
 * BF16. */
int runner_dense_halves(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *panels, int64_t N,
                        uint16_t *out, int64_t ldo) {
#ifdef __AVX512BF16__
    const int64_t count = panels_of(N), blocks = (M + BLOCK_ROWS - 1) / BLOCK_ROWS;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t p = 0; p < count; p++) {
            const int64_t m0 = b * BLOCK_ROWS, rows = M - m0 < BLOCK_ROWS ? M - m0 : BLOCK_ROWS;
            const int64_t width = N - p * DENSE_WIDTH < DENSE_WIDTH ? N - p * DENSE_WIDTH : DENSE_WIDTH;
            const uint16_t *panel = panels + p * K * DENSE_WIDTH;
            int64_t tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
            for (int64_t m = m0, n; m < m0 + rows; m += n, tiles--) {
                n = (m0 + rows - m + tiles - 1) / tiles;
                ROWS_SWITCH(tile16h, x + m * ldx, n, K, ldx, panel, out + m * ldo + p * DENSE_WIDTH, ldo, width)
            }
        }
    return 0;
#else
    (void)x; (void)M; (void)K; (void)ldx; (void)panels; (void)N; (void)out; (void)ldo;
    return -2;
#endif
}

/* The entry point for Python (runner.native.Kernels.dense). */
int runner_dense(const float *x, int64_t M, int64_t K, int64_t ldx, const void *panels, int64_t N, int32_t bits,
                 float *out, int64_t ldo) {
    return dense_into(x, M, K, ldx, panels, N, bits, out, ldo);
}
