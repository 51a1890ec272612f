/* Matrix products of a few float32 rows with a GGUF file's own 4-bit weights, for CPUs
 * with AVX2 and FMA but no AVX-512 (AMD Zen 2/3, older Intel), where a float32 decode step
 * of a small batch is bound by reading float32 weights (4 bytes each; these read 0.625).
 *
 * Exact: GGUF's Q4_0/Q4_1 blocks dequantize as w = d * q + m in float32 (d, m float16, q
 * 0..15; Q4_0's m is -8 d), and d * q is exact in float32 (11 + 4 significant bits), so
 * fma(q, d, m) rounds once where the file's dequantization rounds once: the kernel rebuilds
 * the float32 weights the dense model holds (the same values; a zero may differ in sign when
 * d is zero), and only the order of the float32 sums of x . w differs from torch's GEMV.
 *
 * Packed once at load, per 16 output columns (a task) and group of 32 inputs, 320 bytes:
 * the 16 d then the 16 m as float16 (64 bytes), then 32 chunks of 8 bytes; chunk
 * 2 * p + h holds columns 8h..8h+7 (byte j: column 8h + j), the low nibble the weight of
 * input p of the group and the high nibble that of input p + 16 (GGUF's own nibble order).
 * One chunk widens to 8 int32 lanes (vpmovzxbd): a mask and a shift give two vectors of 8
 * columns, each at one input.
 *
 * 8-bit (GGUF Q8_0: w = d * q, d float16 per 32 inputs, q int8; d * q exact in float32),
 * for the output projection: per 16 columns and group of 32 inputs, 544 bytes: the 16 d as
 * float16, then the group's 32 inputs in order, each the 16 columns' bytes.
 *
 * Rows of x go four at a time through a task's whole depth, eight sums in registers (two
 * vectors of columns per row); a single row splits its sums in two (four chains) so the
 * FMA latency stays covered. Results are float32, the bias added after the sum.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define Q4F_COLS 16
#define Q4F_GROUP 320 /* bytes per 16 columns x 32 inputs */

/* q: (n, k) bytes 0..15; d, m: (n, k / 32) float16 bit patterns. n % 16 == 0, k % 32 == 0. */
void inferhub_q4f32_pack(const uint8_t *q, const uint16_t *d, const uint16_t *m, int64_t n,
                         int64_t k, uint8_t *packed) {
    const int64_t groups = k / 32;
    for (int64_t t = 0; t < n / Q4F_COLS; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *base = packed + (t * groups + g) * Q4F_GROUP;
            uint16_t *dm = (uint16_t *)base;
            for (int col = 0; col < Q4F_COLS; col++) {
                const int64_t row = t * Q4F_COLS + col;
                dm[col] = d[row * groups + g];
                dm[Q4F_COLS + col] = m[row * groups + g];
            }
            for (int p = 0; p < 16; p++)
                for (int h = 0; h < 2; h++) {
                    uint8_t *chunk = base + 64 + (2 * p + h) * 8;
                    for (int j = 0; j < 8; j++) {
                        const uint8_t *qr = q + (t * Q4F_COLS + 8 * h + j) * k + g * 32;
                        chunk[j] = (uint8_t)((qr[p] & 15) | (qr[p + 16] & 15) << 4);
                    }
                }
        }
}

#define Q8F_GROUP 544 /* bytes per 16 columns x 32 inputs */

/* q: (n, k) int8; d: (n, k / 32) float16 bit patterns. n % 16 == 0, k % 32 == 0. */
void inferhub_q8f32_pack(const int8_t *q, const uint16_t *d, int64_t n, int64_t k,
                         uint8_t *packed) {
    const int64_t groups = k / 32;
    for (int64_t t = 0; t < n / Q4F_COLS; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *base = packed + (t * groups + g) * Q8F_GROUP;
            uint16_t *dd = (uint16_t *)base;
            for (int col = 0; col < Q4F_COLS; col++)
                dd[col] = d[(t * Q4F_COLS + col) * groups + g];
            int8_t *qs = (int8_t *)(base + 32);
            for (int i = 0; i < 32; i++)
                for (int col = 0; col < Q4F_COLS; col++)
                    qs[i * Q4F_COLS + col] = q[(t * Q4F_COLS + col) * k + g * 32 + i];
        }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

/* One 4-bit chunk's weights as float32, fma(q, d, m): w[0], w[1] columns 0-7 and 8-15 at
 * input p (low nibbles), w[2], w[3] the same at input p + 16 (high nibbles). */
static inline __attribute__((always_inline)) void q4_rebuild(const uint8_t *chunk, __m256 d0,
                                                             __m256 d1, __m256 m0, __m256 m1,
                                                             __m256 w[4]) {
    const __m256i low = _mm256_set1_epi32(15);
    const __m256i r0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)chunk));
    const __m256i r1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(chunk + 8)));
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(r0, low)), d0, m0);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(r1, low)), d1, m1);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r0, 4)), d0, m0);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r1, 4)), d1, m1);
}

/* One input's 16 columns of 8-bit weights as float32, d * q: w[0] columns 0-7, w[1] 8-15. */
static inline __attribute__((always_inline)) void q8_rebuild(const uint8_t *row, __m256 d0,
                                                             __m256 d1, __m256 w[2]) {
    const __m256i q0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)row));
    const __m256i q1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + 8)));
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(q0), d0);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(q1), d1);
}

/* R rows of x (R <= 4) against one task's 16 columns over all k; sums into out[r][0..15]. */
static inline __attribute__((always_inline)) void q4f32_task(const uint8_t *w, int64_t groups,
                                                             const float *x, int64_t x_stride,
                                                             const int R, float *out,
                                                             int64_t out_stride) {
    __m256 acc[4][2], acc_hi[2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    acc_hi[0] = acc_hi[1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *base = w + g * Q4F_GROUP;
        _mm_prefetch((const char *)base + 4 * Q4F_GROUP, _MM_HINT_T0);
        _mm_prefetch((const char *)base + 4 * Q4F_GROUP + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)base + 4 * Q4F_GROUP + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)base + 4 * Q4F_GROUP + 192, _MM_HINT_T0);
        _mm_prefetch((const char *)base + 4 * Q4F_GROUP + 256, _MM_HINT_T0);
        const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base));
        const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base + 1));
        const __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base + 2));
        const __m256 m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base + 3));
        const float *xg = x + g * 32;
        for (int p = 0; p < 16; p++) {
            __m256 wv[4];
            q4_rebuild(base + 64 + 16 * p, d0, d1, m0, m1, wv);
            const __m256 lo0 = wv[0], lo1 = wv[1], hi0 = wv[2], hi1 = wv[3];
            if (R == 1) {
                const __m256 xl = _mm256_broadcast_ss(xg + p);
                const __m256 xh = _mm256_broadcast_ss(xg + p + 16);
                acc[0][0] = _mm256_fmadd_ps(xl, lo0, acc[0][0]);
                acc[0][1] = _mm256_fmadd_ps(xl, lo1, acc[0][1]);
                acc_hi[0] = _mm256_fmadd_ps(xh, hi0, acc_hi[0]);
                acc_hi[1] = _mm256_fmadd_ps(xh, hi1, acc_hi[1]);
            } else {
                for (int r = 0; r < R; r++) {
                    const __m256 xl = _mm256_broadcast_ss(xg + r * x_stride + p);
                    const __m256 xh = _mm256_broadcast_ss(xg + r * x_stride + p + 16);
                    acc[r][0] = _mm256_fmadd_ps(xl, lo0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(xl, lo1, acc[r][1]);
                    acc[r][0] = _mm256_fmadd_ps(xh, hi0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(xh, hi1, acc[r][1]);
                }
            }
        }
    }
    if (R == 1) {
        acc[0][0] = _mm256_add_ps(acc[0][0], acc_hi[0]);
        acc[0][1] = _mm256_add_ps(acc[0][1], acc_hi[1]);
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(out + r * out_stride, acc[r][0]);
        _mm256_storeu_ps(out + r * out_stride + 8, acc[r][1]);
    }
}

/* The 8-bit twin of q4f32_task (weights packed by inferhub_q8f32_pack). */
static inline __attribute__((always_inline)) void q8f32_task(const uint8_t *w, int64_t groups,
                                                             const float *x, int64_t x_stride,
                                                             const int R, float *out,
                                                             int64_t out_stride) {
    __m256 acc[4][2], acc_odd[2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    acc_odd[0] = acc_odd[1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *base = w + g * Q8F_GROUP;
        for (int off = 0; off < Q8F_GROUP; off += 64)
            _mm_prefetch((const char *)base + 4 * Q8F_GROUP + off, _MM_HINT_T0);
        const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base));
        const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base + 1));
        const uint8_t *qs = base + 32;
        const float *xg = x + g * 32;
        for (int i = 0; i < 32; i += 2) {
            __m256 wv[2][2];
            for (int u = 0; u < 2; u++) q8_rebuild(qs + (i + u) * Q4F_COLS, d0, d1, wv[u]);
            if (R == 1) {
                const __m256 xe = _mm256_broadcast_ss(xg + i);
                const __m256 xo = _mm256_broadcast_ss(xg + i + 1);
                acc[0][0] = _mm256_fmadd_ps(xe, wv[0][0], acc[0][0]);
                acc[0][1] = _mm256_fmadd_ps(xe, wv[0][1], acc[0][1]);
                acc_odd[0] = _mm256_fmadd_ps(xo, wv[1][0], acc_odd[0]);
                acc_odd[1] = _mm256_fmadd_ps(xo, wv[1][1], acc_odd[1]);
            } else {
                for (int r = 0; r < R; r++) {
                    const __m256 xe = _mm256_broadcast_ss(xg + r * x_stride + i);
                    const __m256 xo = _mm256_broadcast_ss(xg + r * x_stride + i + 1);
                    acc[r][0] = _mm256_fmadd_ps(xe, wv[0][0], acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(xe, wv[0][1], acc[r][1]);
                    acc[r][0] = _mm256_fmadd_ps(xo, wv[1][0], acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(xo, wv[1][1], acc[r][1]);
                }
            }
        }
    }
    if (R == 1) {
        acc[0][0] = _mm256_add_ps(acc[0][0], acc_odd[0]);
        acc[0][1] = _mm256_add_ps(acc[0][1], acc_odd[1]);
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(out + r * out_stride, acc[r][0]);
        _mm256_storeu_ps(out + r * out_stride + 8, acc[r][1]);
    }
}

typedef void (*task_fn)(const uint8_t *w, int64_t groups, const float *x, int64_t x_stride,
                        int R, float *out, int64_t out_stride);

static void q4_task_any(const uint8_t *w, int64_t groups, const float *x, int64_t x_stride,
                        int R, float *out, int64_t out_stride) {
    switch (R) {
    case 1: q4f32_task(w, groups, x, x_stride, 1, out, out_stride); break;
    case 2: q4f32_task(w, groups, x, x_stride, 2, out, out_stride); break;
    case 3: q4f32_task(w, groups, x, x_stride, 3, out, out_stride); break;
    default: q4f32_task(w, groups, x, x_stride, 4, out, out_stride); break;
    }
}

static void q8_task_any(const uint8_t *w, int64_t groups, const float *x, int64_t x_stride,
                        int R, float *out, int64_t out_stride) {
    switch (R) {
    case 1: q8f32_task(w, groups, x, x_stride, 1, out, out_stride); break;
    case 2: q8f32_task(w, groups, x, x_stride, 2, out, out_stride); break;
    case 3: q8f32_task(w, groups, x, x_stride, 3, out, out_stride); break;
    default: q8f32_task(w, groups, x, x_stride, 4, out, out_stride); break;
    }
}

/* One task's 16 columns over all k as float32, buf[k][16] (the same numbers the tasks above
 * compute with). */
static void q4_panel(const uint8_t *w, int64_t groups, float *buf) {
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *base = w + g * Q4F_GROUP;
        const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base));
        const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base + 1));
        const __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base + 2));
        const __m256 m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base + 3));
        float *b = buf + g * 32 * Q4F_COLS;
        for (int p = 0; p < 16; p++) {
            __m256 wv[4];
            q4_rebuild(base + 64 + 16 * p, d0, d1, m0, m1, wv);
            float *lo = b + p * Q4F_COLS, *hi = b + (p + 16) * Q4F_COLS;
            _mm256_storeu_ps(lo, wv[0]);
            _mm256_storeu_ps(lo + 8, wv[1]);
            _mm256_storeu_ps(hi, wv[2]);
            _mm256_storeu_ps(hi + 8, wv[3]);
        }
    }
}

static void q8_panel(const uint8_t *w, int64_t groups, float *buf) {
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *base = w + g * Q8F_GROUP;
        const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base));
        const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)base + 1));
        float *b = buf + g * 32 * Q4F_COLS;
        for (int i = 0; i < 32; i++) {
            __m256 wv[2];
            q8_rebuild(base + 32 + i * Q4F_COLS, d0, d1, wv);
            _mm256_storeu_ps(b + i * Q4F_COLS, wv[0]);
            _mm256_storeu_ps(b + i * Q4F_COLS + 8, wv[1]);
        }
    }
}

/* RB (<= 6) rows of x against a panel's 16 columns: twelve sums in registers, two weight
 * vectors loaded and RB values broadcast per input. */
static inline __attribute__((always_inline)) void panel_rows(const float *buf, int64_t k,
                                                             const float *x, int64_t x_stride,
                                                             const int RB, float *out,
                                                             int64_t out_stride) {
    __m256 acc[6][2];
    for (int r = 0; r < 6; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        const __m256 w0 = _mm256_loadu_ps(buf + i * Q4F_COLS);
        const __m256 w1 = _mm256_loadu_ps(buf + i * Q4F_COLS + 8);
        for (int r = 0; r < RB; r++) {
            const __m256 xb = _mm256_broadcast_ss(x + r * x_stride + i);
            acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < RB; r++) {
        _mm256_storeu_ps(out + r * out_stride, acc[r][0]);
        _mm256_storeu_ps(out + r * out_stride + 8, acc[r][1]);
    }
}

typedef void (*panel_fn)(const uint8_t *w, int64_t groups, float *buf);

/* From this many rows on, a task rebuilds its 16 columns once into a float32 panel and runs
 * six rows at a time over it, instead of rebuilding the weights per four rows. */
#ifndef PANEL_MIN_ROWS
#define PANEL_MIN_ROWS 5
#endif
#ifndef CHUNK_BYTES
#define CHUNK_BYTES 262144
#endif

/* Tasks of 16 columns (x 4 rows, or x a chunk of rows on a panel) over the threads (guided:
 * this VM's cores run at uneven speeds), each through the whole depth. */
static int lowbit_f32(task_fn task, panel_fn panel, int64_t group_bytes, const float *x,
                      int64_t m, int64_t k, int64_t x_stride, const uint8_t *packed, int64_t n,
                      const float *bias, float *out, int num_threads) {
    if (n % Q4F_COLS || k % 32) return -2;
    const int64_t groups = k / 32, tasks = n / Q4F_COLS;
    const int parallel = num_threads > 1 && n * k >= 65536;
    if (m < PANEL_MIN_ROWS) {
        const int64_t row_blocks = (m + 3) / 4;
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(guided)
        for (int64_t it = 0; it < tasks * row_blocks; it++) {
            const int64_t t = it / row_blocks, r0 = (it % row_blocks) * 4;
            const int R = (int)(m - r0 < 4 ? m - r0 : 4);
            float *o = out + r0 * n + t * Q4F_COLS;
            task(packed + t * groups * group_bytes, groups, x + r0 * x_stride, x_stride, R, o,
                 n);
            if (bias)
                for (int r = 0; r < R; r++)
                    for (int c = 0; c < Q4F_COLS; c++) o[r * n + c] += bias[t * Q4F_COLS + c];
        }
        return 0;
    }
    /* rows in chunks of equal size whose x stays in L2 (at most CHUNK_BYTES) while the
     * tasks sweep over it */
    int64_t most = CHUNK_BYTES / (k * (int64_t)sizeof(float)) / 6 * 6;
    if (most < 6) most = 6;
    const int64_t even = (m + most - 1) / most;
    const int64_t chunk = ((m + even - 1) / even + 5) / 6 * 6; /* <= most */
    const int64_t chunks = (m + chunk - 1) / chunk;             /* none of them empty */
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (parallel) reduction(| : failed)
    {
        float *buf = thread_scratch(0, (size_t)(k * Q4F_COLS) * sizeof(float));
        if (!buf) failed = 1;
#pragma omp for schedule(guided)
        for (int64_t it = 0; it < chunks * tasks; it++) {
            if (failed) continue;
            const int64_t c = it / tasks, t = it % tasks;
            const int64_t r_end = (c + 1) * chunk < m ? (c + 1) * chunk : m;
            panel(packed + t * groups * group_bytes, groups, buf);
            for (int64_t r0 = c * chunk; r0 < r_end; r0 += 6) {
                const float *xr = x + r0 * x_stride;
                float *o = out + r0 * n + t * Q4F_COLS;
                switch (r_end - r0 < 6 ? r_end - r0 : 6) {
                case 1: panel_rows(buf, k, xr, x_stride, 1, o, n); break;
                case 2: panel_rows(buf, k, xr, x_stride, 2, o, n); break;
                case 3: panel_rows(buf, k, xr, x_stride, 3, o, n); break;
                case 4: panel_rows(buf, k, xr, x_stride, 4, o, n); break;
                case 5: panel_rows(buf, k, xr, x_stride, 5, o, n); break;
                default: panel_rows(buf, k, xr, x_stride, 6, o, n); break;
                }
            }
            if (bias)
                for (int64_t r = c * chunk; r < r_end; r++)
                    for (int j = 0; j < Q4F_COLS; j++)
                        out[r * n + t * Q4F_COLS + j] += bias[t * Q4F_COLS + j];
        }
    }
    return failed ? -1 : 0;
}

/* out (m, n) float32 = x (m, k) float32 @ w^T (+ bias), w packed by inferhub_q8f32_pack. */
int inferhub_q8f32_linear(const float *x, int64_t m, int64_t k, int64_t x_stride,
                          const uint8_t *packed, int64_t n, const float *bias, float *out,
                          int num_threads) {
    return lowbit_f32(q8_task_any, q8_panel, Q8F_GROUP, x, m, k, x_stride, packed, n, bias,
                      out, num_threads);
}

/* out (m, n) float32 = x (m, k) float32 @ w^T (+ bias), w packed by inferhub_q4f32_pack. */
int inferhub_q4f32_linear(const float *x, int64_t m, int64_t k, int64_t x_stride,
                          const uint8_t *packed, int64_t n, const float *bias, float *out,
                          int num_threads) {
    return lowbit_f32(q4_task_any, q4_panel, Q4F_GROUP, x, m, k, x_stride, packed, n, bias,
                      out, num_threads);
}

#else /* no AVX2/FMA/F16C: the layers keep torch's kernels (q4f32_available() is false) */
int inferhub_q4f32_linear(const float *x, int64_t m, int64_t k, int64_t x_stride,
                          const uint8_t *packed, int64_t n, const float *bias, float *out,
                          int num_threads) {
    (void)x, (void)m, (void)k, (void)x_stride, (void)packed, (void)n, (void)bias, (void)out;
    (void)num_threads;
    return -1;
}
int inferhub_q8f32_linear(const float *x, int64_t m, int64_t k, int64_t x_stride,
                          const uint8_t *packed, int64_t n, const float *bias, float *out,
                          int num_threads) {
    (void)x, (void)m, (void)k, (void)x_stride, (void)packed, (void)n, (void)bias, (void)out;
    (void)num_threads;
    return -1;
}
#endif
