/* One decode step of a decoder layer for M rows of one new token each, its projections kept quantized (qmm.c) or
 * in float32 or bfloat16 panels (dense.c): what Python would dispatch as ~60 small operations per layer, in one
 * call. The activations are float32 throughout; a bfloat16 model's cache is read and written in bfloat16.
 *
 * The layer is Llama's shape: RMSNorm, grouped-query attention with rotary embeddings (Hugging Face's
 * rotate-half form, over the first `rotated` dims of each head), a SiLU-gated MLP, residuals around both. Qwen2's
 * q/k/v biases and Qwen3's per-head q/k norms are switches. The arithmetic follows runner.zoo.parts step by step
 * in fp32, so the tokens are the Python path's (to fp32 rounding).
 *
 * Attention reads the layer's cache in place, [rows, kv_heads, capacity, head_dim]: this token's keys and values
 * are written at `column`, then each row attends to columns 0..column its mask allows, and, for the rows that
 * continue a shared prefix, to that prefix's keys first (one softmax over both, as runner.infer.attention does).
 */
#include "native.h"
#include <math.h>

typedef struct {
    const uint8_t *qweight;
    const uint8_t *scales;
    const float *bias;  /* NULL: none */
    int64_t rows, columns, group;
    int32_t bits, flags;                  /* bits 32 or 16: dense panels of float32 or bfloat16 (qweight) */
} QLinear;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;                     /* the norms' epsilon; attention's score scale */
    const float *input_norm, *post_norm;  /* [hidden] */
    const float *q_norm, *k_norm;         /* [head_dim]: per-head norms (Qwen3), or NULL */
    QLinear q, k, v, o, gate, up, down;
} QLayer;

typedef struct {
    int64_t rows;                            /* M */
    const float *cos, *sin;                  /* [M or 1, rotated]: the rotary tables at each row's position */
    int64_t rope_stride, rotated;            /* the tables' row stride (0: one row for all); dims rotated */
    void *keys, *values;                     /* the layer's cache, [>= M, kv_heads, capacity, head_dim] */
    int64_t capacity, column;                /* this token's column; attention reads columns 0..column */
    const uint8_t *mask;                     /* [M, column + 1]: 1 where a row may attend; NULL: everywhere */
    const void *prefix_keys, *prefix_values;   /* a shared prefix, [kv_heads, *, head_dim] by prefix_stride */
    int64_t prefix_length, prefix_stride;    /* its columns; values from one kv head to the next */
    const uint8_t *prefix_rows;              /* [M]: 1 where the row continues the prefix */
    int64_t cache_bits;                      /* 32: the cache and prefix are float32; 16: bfloat16 */
} QStep;

/* The calling thread's work space for a step's activations (kept_buffer) */
static __thread float *work;
static __thread int64_t work_len;

#ifdef __AVX2__
/* the sum of a vector's 8 lanes */
static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#endif

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    s = hsum8(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float a, const float *x, float *y, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 av = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#elif defined(__AVX2__)
    __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* ---- exp over arrays ----------------------------------------------------------------------------------------
 * expf costs ~20 cycles a call: over a step's SiLU (rows x intermediate) and softmax (rows x heads x columns) that
 * was a fifth of a 64-row step. The vector form is Cephes' expf (a degree-6 polynomial after reducing by ln 2),
 * within 2 ulp of expf; below -87.3 it is 0 (exp(-inf), a masked score, included), and NaN stays NaN. */

#ifdef __AVX2__
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
    const __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, x));  /* x second: NaN passes through */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
    return _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
}
#endif

/* x[i] = exp(x[i] - shift) for n values; their sum */
static float exp_shifted(float *x, int64_t n, float shift) {
    int64_t i = 0;
    float total = 0.0f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    const __m256 s = _mm256_set1_ps(shift);
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    total = hsum8(acc);
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i] - shift);
        total += x[i];
    }
    return total;
}

/* gate[i] = silu(gate[i]) * up[i] for n values */
static void silu_times(float *gate, const float *up, int64_t n) {
    int64_t i = 0;
#ifdef __AVX2__
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp8(_mm256_sub_ps(zero, g));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* ---- a cache column in float32 or bfloat16 ------------------------------------------------------------------ */

static inline float from_bf16(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* rounded to nearest even, NaN kept a quiet NaN: as torch's .to(torch.bfloat16) */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#ifdef __AVX512F__
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif

#ifdef __AVX2__
static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

/* q . a column of n values, float32 or bfloat16 (bf16) */
static inline float dot_column(const float *q, const void *c, int64_t n, int bf16) {
    if (!bf16) return dot(q, (const float *)c, n);
    const uint16_t *h = (const uint16_t *)c;
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), load16_bf16(h + i), acc);
    s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8_bf16(h + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8_bf16(h + i + 8), acc1);
    }
    s = hsum8(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += q[i] * from_bf16(h[i]);
    return s;
}

/* y += a * a column of n values, float32 or bfloat16 (bf16) */
static inline void axpy_column(float a, const void *c, float *y, int64_t n, int bf16) {
    if (!bf16) {
        axpy(a, (const float *)c, y, n);
        return;
    }
    const uint16_t *h = (const uint16_t *)c;
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 av = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, load16_bf16(h + i), _mm512_loadu_ps(y + i)));
#elif defined(__AVX2__)
    __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8_bf16(h + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * from_bf16(h[i]);
}

/* a column of n values written to the cache, float32 or bfloat16 (bf16) */
static inline void store_column(void *c, const float *x, int64_t n, int bf16) {
    if (!bf16) {
        memcpy(c, x, (size_t)n * sizeof(float));
        return;
    }
    for (int64_t i = 0; i < n; i++) ((uint16_t *)c)[i] = to_bf16(x[i]);
}

/* out = weight * (x * rsqrt(mean(x^2) + eps)), as runner.zoo.parts.RMSNorm in fp32 */
static void rms_norm(const float *x, const float *weight, float *out, int64_t n, float eps) {
    const float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * r);
}

static int linear(const QLinear *l, const float *x, int64_t M, float *out) {
    const int failed = l->bits == 32 || l->bits == 16
        ? dense_into(x, M, l->columns, l->columns, l->qweight, l->rows, l->bits, out, l->rows)
        : qmm_into(x, M, l->columns, l->columns, l->qweight, l->scales, l->rows, l->bits, l->group, l->flags, out,
                   l->rows);
    if (failed) return -1;
    if (l->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < l->rows; j++) out[m * l->rows + j] += l->bias[j];
    return 0;
}

/* x * cos + rotate_half(x) * sin over the first `rotated` dims, in place */
static void rotate(float *x, const float *cos, const float *sin, int64_t rotated) {
    const int64_t half = rotated / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + (-b) * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* One row's query heads of one kv head g (heads / kv_heads of them, together: each key and value column is read
 * once for all of them, from L1) against its cache and the prefix, into y [R, D]. scores: [R, P + S] floats. */
static void attend_group(const QLayer *L, const QStep *s, int64_t m, int64_t g, const float *q, float *y,
                         float *scores) {
    const int64_t D = L->head_dim, R = L->heads / L->kv_heads, S = s->column + 1;
    const int64_t P = s->prefix_keys && s->prefix_rows[m] ? s->prefix_length : 0, W = P + S;
    const int bf16 = s->cache_bits == 16;
    const int64_t width = bf16 ? 2 : 4, at = (m * L->kv_heads + g) * s->capacity * D * width;
    const uint8_t *keys = (const uint8_t *)s->keys + at, *values = (const uint8_t *)s->values + at;
    const uint8_t *prefix_keys = (const uint8_t *)s->prefix_keys + g * s->prefix_stride * width;
    const uint8_t *prefix_values = (const uint8_t *)s->prefix_values + g * s->prefix_stride * width;
    const uint8_t *mask = s->mask ? s->mask + m * S : NULL;
    for (int64_t j = 0; j < W; j++) {
        const int own = j >= P;
        if (own && mask && !mask[j - P]) {
            for (int64_t r = 0; r < R; r++) scores[r * W + j] = -INFINITY;
            continue;
        }
        const uint8_t *key = own ? keys + (j - P) * D * width : prefix_keys + j * D * width;
        for (int64_t r = 0; r < R; r++) scores[r * W + j] = dot_column(q + r * D, key, D, bf16) * L->scale;
    }
    memset(y, 0, (size_t)(R * D) * sizeof(float));
    float weight[R];  /* each head's 1 / its softmax's total; 0: a freed row that sees nothing (never used) */
    for (int64_t r = 0; r < R; r++) {
        float top = -INFINITY;
        for (int64_t j = 0; j < W; j++) top = scores[r * W + j] > top ? scores[r * W + j] : top;
        weight[r] = top == -INFINITY ? 0.0f : 1.0f / exp_shifted(scores + r * W, W, top);
    }
    for (int64_t j = 0; j < W; j++) {
        if (j >= P && mask && !mask[j - P]) continue;  /* masked for every head */
        const uint8_t *value = j >= P ? values + (j - P) * D * width : prefix_values + j * D * width;
        for (int64_t r = 0; r < R; r++)
            if (weight[r] != 0.0f) axpy_column(scores[r * W + j] * weight[r], value, y + r * D, D, bf16);
    }
}

/* x [M, hidden] (updated in place: the layer's output). Returns 0, or -1 when memory ran out. */
int runner_decode_layer(const QLayer *L, const QStep *s, float *x) {
    const int64_t M = s->rows, H = L->hidden, D = L->head_dim, heads = L->heads, kv = L->kv_heads;
    const int64_t qw = heads * D, kw = kv * D, I = L->intermediate;
    float *base = kept_buffer(&work, &work_len, M * (2 * H + 2 * qw + 2 * kw + 2 * I));
    if (!base) return -1;
    float *h = base, *q = h + M * H, *k = q + M * qw, *v = k + M * kw, *y = v + M * kw, *out = y + M * qw;
    float *gate = out + M * H, *up = gate + M * I;

    /* attention */
    for (int64_t m = 0; m < M; m++) rms_norm(x + m * H, L->input_norm, h + m * H, H, L->eps);
    if (linear(&L->q, h, M, q) || linear(&L->k, h, M, k) || linear(&L->v, h, M, v)) return -1;
    for (int64_t m = 0; m < M; m++) {
        const float *cos = s->cos + m * s->rope_stride, *sin = s->sin + m * s->rope_stride;
        for (int64_t i = 0; i < heads; i++) {
            float *qh = q + m * qw + i * D;
            if (L->q_norm) rms_norm(qh, L->q_norm, qh, D, L->eps);
            rotate(qh, cos, sin, s->rotated);
        }
        for (int64_t i = 0; i < kv; i++) {
            float *kh = k + m * kw + i * D;
            if (L->k_norm) rms_norm(kh, L->k_norm, kh, D, L->eps);
            rotate(kh, cos, sin, s->rotated);
            const int64_t at = ((m * kv + i) * s->capacity + s->column) * D * (s->cache_bits / 8);
            store_column((uint8_t *)s->keys + at, kh, D, s->cache_bits == 16);
            store_column((uint8_t *)s->values + at, v + m * kw + i * D, D, s->cache_bits == 16);
        }
    }
    const int64_t width = s->column + 1 + (s->prefix_keys ? s->prefix_length : 0), R = heads / kv;
    int failed = 0;
    #pragma omp parallel
    {
        float *scores = malloc((size_t)(R * width) * sizeof(float));
        if (!scores) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < M * kv; item++) {
            if (!scores) continue;
            const int64_t m = item / kv, g = item % kv;
            attend_group(L, s, m, g, q + m * qw + g * R * D, y + m * qw + g * R * D, scores);
        }
        free(scores);
    }
    if (failed || linear(&L->o, y, M, out)) return -1;
    for (int64_t j = 0; j < M * H; j++) x[j] += out[j];

    /* the gated MLP */
    for (int64_t m = 0; m < M; m++) rms_norm(x + m * H, L->post_norm, h + m * H, H, L->eps);
    if (linear(&L->gate, h, M, gate) || linear(&L->up, h, M, up)) return -1;
    #pragma omp parallel for schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++) silu_times(gate + m * I, up + m * I, I);
    if (linear(&L->down, gate, M, out)) return -1;
    for (int64_t j = 0; j < M * H; j++) x[j] += out[j];
    return 0;
}

/* Several layers' decode steps in turn over the same x: layers[i] with steps[i]. Returns 0, or -1 when memory ran
 * out. */
int runner_decode_layers(const QLayer *const *layers, const QStep *steps, int64_t n, float *x) {
    for (int64_t i = 0; i < n; i++)
        if (runner_decode_layer(layers[i], steps + i, x)) return -1;
    return 0;
}
