/* Matmuls over weights kept quantized in panels.
 *
 * A weight [N, K] is held in panels of 16 output rows. Within a panel, k runs slowest and the 16 rows fastest, so
 * one k's 16 values are one small load:
 *   - 4 bits: 8 bytes per k; row j (0..7) in the low nibble of byte j, row j + 8 in its high nibble;
 *   - 8 bits: 16 signed bytes per k, row j in byte j.
 * Values mean q * scale + low, with one scale and one low per row and group of `group` k's: per panel and group,
 * 16 scales then 16 lows, fp32 or fp16 (flag HALF); without flag LOWS the lows are zero and not stored. The 4-bit
 * values are unsigned (0..15), the 8-bit ones signed.
 *
 * Up to 3 rows of activations (decode of few sequences) stream the weights once, and must do so at memory speed:
 * widening every value to fp32 costs more instructions than the bytes take to arrive. So the activations are
 * rounded to int16 per 16 k's, and the values meet them in exact 16-bit multiply-adds (panel_few below). More rows
 * dequantize a panel once into a per-thread buffer and run a 6 x 16 register tile over it in fp32, so the
 * unpacking is shared by every row.
 *
 * Built on first use by runner.native (gcc -O3, -mavx2 -mfma -mf16c where the CPU has them); the portable build
 * is the same arithmetic in plain loops.
 */
#include "native.h"
#include <float.h>
#include <math.h>

#define TILE 6

static inline int64_t bytes_per_k(int bits) { return bits == 4 ? 8 : 16; }
static inline int64_t scale_bytes(int flags) { return PANEL * (flags & LOWS ? 2 : 1) * (flags & HALF ? 2 : 4); }

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) bits = sign | 0x7F800000 | (man << 13);               /* inf, nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);         /* normal */
    else if (!man) bits = sign;                                            /* zero */
    else {                                                                 /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* one panel and group's 16 scales and 16 lows as fp32 */
static inline void scales_plain(const uint8_t *s, int flags, float sc[PANEL], float lo[PANEL]) {
    for (int j = 0; j < PANEL; j++) {
        if (flags & HALF) {
            uint16_t a, b = 0;
            memcpy(&a, s + 2 * j, 2);
            if (flags & LOWS) memcpy(&b, s + 2 * (PANEL + j), 2);  /* none stored: the next group's scales */
            sc[j] = half_to_float(a);
            lo[j] = half_to_float(b);
        } else {
            memcpy(sc + j, s + 4 * j, 4);
            if (flags & LOWS) memcpy(lo + j, s + 4 * (PANEL + j), 4);
            else lo[j] = 0.0f;
        }
    }
}

/* Each thread's dequantized panel (kept_buffer) */
static __thread float *scratch;
static __thread int64_t scratch_len;
/* The calling thread's rounded activations (kept_buffer) */
static __thread float *rounded;
static __thread int64_t rounded_len;

/* ---- widening one k's 16 values to fp32 ------------------------------------------------------------------- */

/* One k's 16 values as integers, and as fp32 (portable build) */
static inline void values_int(const uint8_t *w, int bits, int32_t *out16) {
    if (bits == 4) {
        for (int j = 0; j < 8; j++) {
            out16[j] = w[j] & 0x0F;
            out16[j + 8] = w[j] >> 4;
        }
    } else {
        for (int j = 0; j < 16; j++) out16[j] = (int8_t)w[j];
    }
}

static inline void values(const uint8_t *w, int bits, float *out16) {
    int32_t q[PANEL];
    values_int(w, bits, q);
    for (int j = 0; j < PANEL; j++) out16[j] = (float)q[j];
}

#ifdef __AVX2__
static inline void scales_avx2(const uint8_t *s, int flags, __m256 *s0, __m256 *s1, __m256 *l0, __m256 *l1) {
    if (flags & HALF) {
        const __m128i *h = (const __m128i *)s;
        *s0 = _mm256_cvtph_ps(_mm_loadu_si128(h));
        *s1 = _mm256_cvtph_ps(_mm_loadu_si128(h + 1));
        *l0 = flags & LOWS ? _mm256_cvtph_ps(_mm_loadu_si128(h + 2)) : _mm256_setzero_ps();
        *l1 = flags & LOWS ? _mm256_cvtph_ps(_mm_loadu_si128(h + 3)) : _mm256_setzero_ps();
    } else {
        const float *f = (const float *)s;
        *s0 = _mm256_loadu_ps(f);
        *s1 = _mm256_loadu_ps(f + 8);
        *l0 = flags & LOWS ? _mm256_loadu_ps(f + 16) : _mm256_setzero_ps();
        *l1 = flags & LOWS ? _mm256_loadu_ps(f + 24) : _mm256_setzero_ps();
    }
}

static inline void values_avx2(const uint8_t *w, int bits, __m256 *lo, __m256 *hi) {
    if (bits == 4) {
        __m128i v = _mm_loadl_epi64((const __m128i *)w);
        __m128i mask = _mm_set1_epi8(0x0F);
        *lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, mask)));
        *hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), mask)));
    } else {
        __m128i v = _mm_loadu_si128((const __m128i *)w);
        *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
    }
}
#endif

/* ---- one panel, few rows: integer products against activations rounded to int16 -------------------------- */

/* Each row of activations is rounded per block of XB k's to int16 against the block's largest magnitude
 * (x ~ xq * sx, a relative step of 2^-16 of the block's range: 256 times finer than bf16's). A value then meets its
 * activation in one 16-bit multiply-add: two k's of 16 rows are two 16-lane vectors (pairs of k's side by side),
 * which multiply into 8 rows' sums each, exactly, in int32. Each block's sums are scaled once by its sx, each
 * group's once by the weights' scales, and the lows meet the group's sum of rounded activations: the result is
 * the rounded activations' product with the weights, to fp32 rounding. */
#define XB 16

static void round_rows(const float *x, int64_t M, int64_t K, int64_t ldx, int16_t *xq, float *sx) {
    const int64_t blocks = K / XB;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < blocks; b++) {
            const float *v = x + m * ldx + b * XB;
            int16_t *q = xq + m * K + b * XB;
            float amax = 0.0f;
            int finite = 1;
#ifdef __AVX2__
            const __m256 sign = _mm256_set1_ps(-0.0f), most = _mm256_set1_ps(FLT_MAX);
            __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
            __m256 a0 = _mm256_andnot_ps(sign, v0), a1 = _mm256_andnot_ps(sign, v1);
            /* NaN or Inf anywhere in the block (max_ps would drop a NaN, depending on its lane) */
            finite = !_mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(a0, most, _CMP_NLE_UQ),
                                                      _mm256_cmp_ps(a1, most, _CMP_NLE_UQ)));
            __m256 big = _mm256_max_ps(a0, a1);
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(big), _mm256_extractf128_ps(big, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            amax = _mm_cvtss_f32(h);
#else
            for (int k = 0; k < XB; k++) {
                finite &= fabsf(v[k]) <= FLT_MAX;
                amax = fabsf(v[k]) > amax ? fabsf(v[k]) : amax;
            }
#endif
            /* a block of non-finite values gives NaN (its zeros times a NaN scale), as fp32 would; a block too
             * small for 32767 / amax to be finite counts as zeros (an error under 1e-30 per value) */
            const int zeros = !finite || !(amax > 1e-30f);
            const float inv = zeros ? 0.0f : 32767.0f / amax;
#ifdef __AVX2__
            const __m256 iv = _mm256_set1_ps(inv);
            __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, iv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, iv));
            /* packs works within 128-bit lanes: put the 16 values back in order */
            __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8);
            if (zeros) p = _mm256_setzero_si256();
            _mm256_storeu_si256((__m256i *)q, p);
#else
            for (int k = 0; k < XB; k++) {
                const float t = zeros ? 0.0f : nearbyintf(v[k] * inv);
                q[k] = (int16_t)(t > 32767.0f ? 32767.0f : t < -32767.0f ? -32767.0f : t);
            }
#endif
            sx[m * blocks + b] = !finite ? NAN : zeros ? 0.0f : amax / 32767.0f;
        }
}

/* out[m][0..16) = the panel's 16 outputs for row m (m < rows <= 3), from rounded activations xq [rows, K] with
 * block scales sx [rows, K / XB] and fp32 sums per group `sums` [rows, K / group]. */
static inline __attribute__((always_inline)) void panel_few(const int16_t *xq, const float *sx, const int rows,
                                                           int64_t K, const uint8_t *w, const uint8_t *sl,
                                                           int bits, int flags, int64_t group, const float *sums,
                                                           float out[][PANEL]) {
    const int64_t groups = K / group, blocks = K / XB, step = bytes_per_k(bits), sstep = scale_bytes(flags);
#ifdef __AVX2__
    const __m128i pairs = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    __m256 r[3][2];
    for (int m = 0; m < 3; m++) r[m][0] = r[m][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256 f[3][2];
        for (int m = 0; m < 3; m++) f[m][0] = f[m][1] = _mm256_setzero_ps();
        for (int64_t b = g * group / XB; b < (g + 1) * group / XB; b++) {
            __m256i a[3][2];
            for (int m = 0; m < 3; m++) a[m][0] = a[m][1] = _mm256_setzero_si256();
            for (int64_t k = b * XB; k < (b + 1) * XB; k += 2) {
                /* lo: (row j, k), (row j, k + 1) for rows 0..7 as 16 int16; hi: rows 8..15 */
                __m256i lo, hi;
                if (bits == 4) {
                    __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(w + k * 8)), pairs);
                    lo = _mm256_cvtepu8_epi16(_mm_and_si128(v, nibble));
                    hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), nibble));
                } else {
                    __m128i v0 = _mm_loadu_si128((const __m128i *)(w + k * 16));
                    __m128i v1 = _mm_loadu_si128((const __m128i *)(w + k * 16 + 16));
                    lo = _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(v0, v1));
                    hi = _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(v0, v1));
                }
                for (int m = 0; m < 3; m++) {
                    if (m >= rows) break;
                    int32_t both;
                    memcpy(&both, xq + m * K + k, 4);
                    const __m256i xv = _mm256_set1_epi32(both);
                    a[m][0] = _mm256_add_epi32(a[m][0], _mm256_madd_epi16(lo, xv));
                    a[m][1] = _mm256_add_epi32(a[m][1], _mm256_madd_epi16(hi, xv));
                }
            }
            for (int m = 0; m < 3; m++) {
                if (m >= rows) break;
                const __m256 s = _mm256_broadcast_ss(sx + m * blocks + b);
                f[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[m][0]), s, f[m][0]);
                f[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[m][1]), s, f[m][1]);
            }
        }
        __m256 s0, s1, l0, l1;
        scales_avx2(sl + g * sstep, flags, &s0, &s1, &l0, &l1);
        for (int m = 0; m < 3; m++) {
            if (m >= rows) break;
            const __m256 sum = _mm256_broadcast_ss(sums + m * groups + g);
            r[m][0] = _mm256_fmadd_ps(f[m][0], s0, _mm256_fmadd_ps(l0, sum, r[m][0]));
            r[m][1] = _mm256_fmadd_ps(f[m][1], s1, _mm256_fmadd_ps(l1, sum, r[m][1]));
        }
    }
    for (int m = 0; m < rows; m++) {
        _mm256_storeu_ps(out[m], r[m][0]);
        _mm256_storeu_ps(out[m] + 8, r[m][1]);
    }
#else
    int32_t v[PANEL];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < PANEL; j++) out[m][j] = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        float f[3][PANEL] = {{0}};
        for (int64_t b = g * group / XB; b < (g + 1) * group / XB; b++) {
            int32_t a[3][PANEL] = {{0}};
            for (int64_t k = b * XB; k < (b + 1) * XB; k++) {
                values_int(w + k * step, bits, v);
                for (int m = 0; m < rows; m++)
                    for (int j = 0; j < PANEL; j++) a[m][j] += v[j] * xq[m * K + k];
            }
            for (int m = 0; m < rows; m++)
                for (int j = 0; j < PANEL; j++) f[m][j] += (float)a[m][j] * sx[m * blocks + b];
        }
        float sc[PANEL], lo[PANEL];
        scales_plain(sl + g * sstep, flags, sc, lo);
        for (int m = 0; m < rows; m++)
            for (int j = 0; j < PANEL; j++) out[m][j] += f[m][j] * sc[j] + lo[j] * sums[m * groups + g];
    }
#endif
}

/* ---- one panel, many rows: dequantized once, then a register tile per 6 rows ------------------------------ */

/* a panel's K x 16 values as fp32 into buf, `stride` floats from one k to the next */
static void dequantize_panel(const uint8_t *w, const uint8_t *sl, int bits, int flags, int64_t K, int64_t group,
                             float *buf, int64_t stride) {
    const int64_t step = bytes_per_k(bits), sstep = scale_bytes(flags);
    for (int64_t g = 0; g < K / group; g++) {
#ifdef __AVX2__
        __m256 s0, s1, l0, l1;
        scales_avx2(sl + g * sstep, flags, &s0, &s1, &l0, &l1);
        for (int64_t k = g * group; k < (g + 1) * group; k++) {
            __m256 lo, hi;
            values_avx2(w + k * step, bits, &lo, &hi);
            _mm256_store_ps(buf + k * stride, _mm256_fmadd_ps(lo, s0, l0));
            _mm256_store_ps(buf + k * stride + 8, _mm256_fmadd_ps(hi, s1, l1));
        }
#else
        float v[PANEL], sc[PANEL], lo[PANEL];
        scales_plain(sl + g * sstep, flags, sc, lo);
        for (int64_t k = g * group; k < (g + 1) * group; k++) {
            values(w + k * step, bits, v);
            for (int j = 0; j < PANEL; j++) buf[k * stride + j] = v[j] * sc[j] + lo[j];
        }
#endif
    }
}

/* rows (<= TILE) of x against a dequantized panel; constant `rows` lets the compiler keep the tile in registers */
static inline __attribute__((always_inline)) void tile(const float *x, int rows, int64_t K, int64_t ldx,
                                                       const float *buf, float *out, int64_t ldo, int64_t width) {
#ifdef __AVX2__
    __m256 acc[TILE][2];
    for (int m = 0; m < rows; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 w0 = _mm256_load_ps(buf + k * PANEL), w1 = _mm256_load_ps(buf + k * PANEL + 8);
        for (int m = 0; m < rows; m++) {
            __m256 xv = _mm256_broadcast_ss(x + m * ldx + k);
            acc[m][0] = _mm256_fmadd_ps(w0, xv, acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(w1, xv, acc[m][1]);
        }
    }
    for (int m = 0; m < rows; m++) {
        if (width == PANEL) {
            _mm256_storeu_ps(out + m * ldo, acc[m][0]);
            _mm256_storeu_ps(out + m * ldo + 8, acc[m][1]);
        } else {
            float t[PANEL];
            _mm256_storeu_ps(t, acc[m][0]);
            _mm256_storeu_ps(t + 8, acc[m][1]);
            memcpy(out + m * ldo, t, (size_t)width * sizeof(float));
        }
    }
#else
    for (int m = 0; m < rows; m++) {
        float acc[PANEL] = {0};
        for (int64_t k = 0; k < K; k++) {
            const float xv = x[m * ldx + k];
            for (int j = 0; j < PANEL; j++) acc[j] += buf[k * PANEL + j] * xv;
        }
        memcpy(out + m * ldo, acc, (size_t)width * sizeof(float));
    }
#endif
}

void panel_many(const float *x, int64_t rows, int64_t K, int64_t ldx, const float *buf, float *out,
                       int64_t ldo, int64_t width) {
    int64_t m = 0;
    for (; m + TILE <= rows; m += TILE) tile(x + m * ldx, TILE, K, ldx, buf, out + m * ldo, ldo, width);
    switch (rows - m) {
        case 5: tile(x + m * ldx, 5, K, ldx, buf, out + m * ldo, ldo, width); break;
        case 4: tile(x + m * ldx, 4, K, ldx, buf, out + m * ldo, ldo, width); break;
        case 3: tile(x + m * ldx, 3, K, ldx, buf, out + m * ldo, ldo, width); break;
        case 2: tile(x + m * ldx, 2, K, ldx, buf, out + m * ldo, ldo, width); break;
        case 1: tile(x + m * ldx, 1, K, ldx, buf, out + m * ldo, ldo, width); break;
        default: break;
    }
}

/* ---- the entry point ------------------------------------------------------------------------------------- */

#define FEW 3  /* up to this many rows, against int16 activations (panel_few); beyond, a panel is dequantized once */

int qmm_into(const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *qweight, const uint8_t *scales,
             int64_t N, int32_t bits, int64_t group, int32_t flags, float *out, int64_t ldo) {
    if (M == 0) return 0;
    const int64_t panels = (N + PANEL - 1) / PANEL, groups = K / group;
    const int64_t panel_bytes = K * bytes_per_k(bits), panel_scales = groups * scale_bytes(flags);
    int failed = 0;
    if (M <= FEW && group % XB == 0) {
        /* per row: K int16 values, K / XB block scales, K / group sums (a buffer kept per calling thread) */
        const int64_t blocks = K / XB;
        float *space = kept_buffer(&rounded, &rounded_len, M * (K / 2 + blocks + groups));
        if (!space) return -1;
        int16_t *xq = (int16_t *)space;
        float *sx = space + M * K / 2, *sums = sx + M * blocks;
        round_rows(x, M, K, ldx, xq, sx);
        for (int64_t m = 0; m < M; m++)  /* the lows meet the rounded activations too: the product is theirs */
            for (int64_t g = 0; g < groups; g++) {
                float t = 0.0f;
                for (int64_t b = g * group / XB; b < (g + 1) * group / XB; b++) {
                    int32_t n = 0;
                    for (int64_t k = b * XB; k < (b + 1) * XB; k++) n += xq[m * K + k];
                    t += (float)n * sx[m * blocks + b];
                }
                sums[m * groups + g] = t;
            }
        #pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            float res[FEW][PANEL];
            const uint8_t *w = qweight + p * panel_bytes;
            const uint8_t *sl = scales + p * panel_scales;
            /* a constant row count per call, so each row's sums stay in registers */
            if (M == 1) panel_few(xq, sx, 1, K, w, sl, bits, flags, group, sums, res);
            else if (M == 2) panel_few(xq, sx, 2, K, w, sl, bits, flags, group, sums, res);
            else panel_few(xq, sx, 3, K, w, sl, bits, flags, group, sums, res);
            const int64_t width = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
            for (int64_t m = 0; m < M; m++) memcpy(out + m * ldo + p * PANEL, res[m], (size_t)width * 4);
        }
        return 0;
    }
    /* DENSE panels of 16 rows dequantized side by side, so the rows run dense.c's register tile over them (with
     * AVX-512: 32 rows, twice the AVX2 tile's width) */
    const int64_t together = dense_width() / PANEL, wide = PANEL * together;
    #pragma omp parallel
    {
        float *buf = kept_buffer(&scratch, &scratch_len, K * wide);
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < (panels + together - 1) / together; p++) {
            if (!buf) continue;
            for (int64_t i = 0; i < together; i++) {
                const int64_t q = p * together + i;
                if (q < panels)
                    dequantize_panel(qweight + q * panel_bytes, scales + q * panel_scales, bits, flags, K, group,
                                     buf + i * PANEL, wide);
                else
                    for (int64_t k = 0; k < K; k++) memset(buf + k * wide + i * PANEL, 0, PANEL * sizeof(float));
            }
            const int64_t width = N - p * wide < wide ? N - p * wide : wide;
            dense_rows(x, M, K, ldx, buf, out + p * wide, ldo, width);
        }
    }
    return failed ? -1 : 0;
}

/* The entry point for Python (runner.native.Kernels.qmm). */
int runner_qmm(const float *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *qweight, const uint8_t *scales,
               int64_t N, int32_t bits, int64_t group, int32_t flags, float *out, int64_t ldo) {
    return qmm_into(x, M, K, ldx, qweight, scales, N, bits, group, flags, out, ldo);
}

/* The build's own check: 1 where the AVX2 path was compiled in. */
int runner_native_avx2(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}
