/* Matrix products of a few bfloat16 rows with 4-bit and 8-bit weights (decode of small
 * batches on the CPU, where a step reads every weight once and does little with each).
 *
 * Both kernels keep 16 output columns in the 16 lanes of a vector, so no horizontal sum is
 * ever needed, and turn the weights into numbers with a couple of instructions per vector.
 *
 * 4-bit (GGUF Q4_0/Q4_1 groups of 32: w = d * q + m, q in 0..15). Packed once at load: for
 * every 16 output columns and 8 input columns, 64 bytes whose nibbles, put next to the byte
 * 0x43 (vpunpck{l,h}bw), are the bfloat16 numbers 128 + q, already in the order
 * VDPBF16PS reads (lane i: columns i's weights at k and k + 1). With x's bfloat16 pairs
 * broadcast, one VDPBF16PS does 32 products, exact in float32. Per group of 32 inputs,
 *     sum_k w_k x_k = d * S + (m - 128 d) * X,   S = sum (128 + q_k) x_k,  X = sum x_k,
 * so the group's S is scaled once per 16 columns. (S carries the offset 128: its float32 sum
 * loses about 2^-24 * 18 relative, far below the bfloat16 rounding of the result.)
 *
 * 8-bit (one scale per output column): 16 columns' int8 weights at each k are 16 bytes,
 * widened to int32, converted to float32 (exact) and multiplied by x_k in float32.
 *
 * Results are rounded to bfloat16 once, to nearest even, after the bias (float32) is added.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#if defined(HAVE_AVX512) && defined(__AVX512BF16__) && defined(__AVX512BW__)

#define MR 4 /* rows of x per pass over the 8-bit weights */

/* ---- 4-bit -------------------------------------------------------------------------- */

#define Q4_COLS 64     /* output columns per task: four vectors of 16 */
#define Q4_GROUP 1280  /* bytes per 64 columns x 32 inputs: d, m (fp16), 1024 of nibbles */

/* q: (n, k) bytes 0..15; w = (q - 8) * scale + zero per group of 32 inputs (scale, zero:
 * (n, k / 32) float32). Packed: for every 64 columns and 32 inputs, the 64 scales d and
 * the 64 minimums m = zero - 8 d as float16, then 16 chunks of 64 bytes (4 steps of 8
 * inputs x 4 vectors of 16 columns), so a task reads one contiguous stream. n % 64 == 0,
 * k % 32 == 0. GGUF's Q4_0/Q4_1 scales and minimums are float16 already (kept exactly). */
void inferhub_q4_pack(const uint8_t *q, const float *scale, const float *zero, int64_t n,
                      int64_t k, uint8_t *packed) {
    const int64_t groups = k / 32;
    for (int64_t t = 0; t < n / Q4_COLS; t++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *base = packed + (t * groups + g) * Q4_GROUP;
            uint16_t *dm = (uint16_t *)base;
            for (int col = 0; col < Q4_COLS; col++) {
                const int64_t row = t * Q4_COLS + col;
                const float d = scale[row * groups + g];
                dm[col] = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
                dm[Q4_COLS + col] = _cvtss_sh(zero[row * groups + g] - 8.0f * d,
                                              _MM_FROUND_TO_NEAREST_INT);
            }
            for (int kc = 0; kc < 4; kc++)
                for (int vec = 0; vec < 4; vec++) {
                    uint8_t *chunk = base + 256 + (kc * 4 + vec) * 64;
                    for (int b = 0; b < 64; b++) {
                        /* byte b -> word lane * 8 + p of vector half (low nibble) and of
                         * vector 2 + half (high nibble), after vpunpck{l,h}bw */
                        const int lane = b / 16, half = (b / 8) % 2, p = b % 8;
                        const int word = lane * 8 + p;
                        const int64_t row = t * Q4_COLS + vec * 16 + word / 2;
                        const int64_t k_lo = g * 32 + kc * 8 + 2 * half + word % 2;
                        const int64_t k_hi = k_lo + 4;
                        chunk[b] = (uint8_t)((q[row * k + k_lo] & 15) |
                                             (q[row * k + k_hi] & 15) << 4);
                    }
                }
        }
}

static inline __attribute__((always_inline)) __m512 pair(const uint16_t *x, int64_t i) {
    int32_t v;
    memcpy(&v, x + i, sizeof v);
    return _mm512_castsi512_ps(_mm512_set1_epi32(v));
}

/* One task: 64 columns against R (1 or 2) rows of x, accumulated into out[vec][row]. With
 * one row each vector keeps two sums (8 chains), with two rows one (8 chains): enough to
 * cover VDPBF16PS's latency. */
static inline __attribute__((always_inline)) void q4_task(const uint8_t *w, int64_t groups,
                                                          const uint16_t *x, int64_t x_stride,
                                                          const float *xsum, const int R,
                                                          __m512 out[4][2]) {
    const __m512i low = _mm512_set1_epi8(0x0F), exp = _mm512_set1_epi8(0x43);
    for (int v = 0; v < 4; v++) out[v][0] = out[v][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *base = w + g * Q4_GROUP;
        for (int off = 0; off < Q4_GROUP; off += 64)
            _mm_prefetch((const char *)base + 4 * Q4_GROUP + off, _MM_HINT_T0);
        /* the sums start at -128 X: S - 128 X comes out of the products */
        __m512 acc[4][2];
        for (int v = 0; v < 4; v++) {
            acc[v][0] = _mm512_set1_ps(-128.0f * xsum[g]);
            acc[v][1] = R == 1 ? _mm512_setzero_ps() : _mm512_set1_ps(-128.0f * xsum[groups + g]);
        }
        for (int kc = 0; kc < 4; kc++) {
            const int64_t k0 = g * 32 + kc * 8;
            for (int v = 0; v < 4; v++) {
                const __m512i raw = _mm512_loadu_si512(base + 256 + (kc * 4 + v) * 64);
                const __m512i lo = _mm512_and_si512(raw, low);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
                const __m512bh z0 = (__m512bh)_mm512_unpacklo_epi8(lo, exp);
                const __m512bh z1 = (__m512bh)_mm512_unpackhi_epi8(lo, exp);
                const __m512bh z2 = (__m512bh)_mm512_unpacklo_epi8(hi, exp);
                const __m512bh z3 = (__m512bh)_mm512_unpackhi_epi8(hi, exp);
                if (R == 1) {
                    acc[v][0] = _mm512_dpbf16_ps(acc[v][0], z0, (__m512bh)pair(x, k0));
                    acc[v][1] = _mm512_dpbf16_ps(acc[v][1], z1, (__m512bh)pair(x, k0 + 2));
                    acc[v][0] = _mm512_dpbf16_ps(acc[v][0], z2, (__m512bh)pair(x, k0 + 4));
                    acc[v][1] = _mm512_dpbf16_ps(acc[v][1], z3, (__m512bh)pair(x, k0 + 6));
                } else {
                    for (int r = 0; r < 2; r++) {
                        const uint16_t *xr = x + r * x_stride + k0;
                        acc[v][r] = _mm512_dpbf16_ps(acc[v][r], z0, (__m512bh)pair(xr, 0));
                        acc[v][r] = _mm512_dpbf16_ps(acc[v][r], z1, (__m512bh)pair(xr, 2));
                        acc[v][r] = _mm512_dpbf16_ps(acc[v][r], z2, (__m512bh)pair(xr, 4));
                        acc[v][r] = _mm512_dpbf16_ps(acc[v][r], z3, (__m512bh)pair(xr, 6));
                    }
                }
            }
        }
        /* sum w x = d * (S - 128 X) + m * X over the group */
        const uint16_t *dm = (const uint16_t *)base;
        for (int v = 0; v < 4; v++) {
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + v * 16)));
            const __m512 m =
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + 64 + v * 16)));
            for (int r = 0; r < R; r++) {
                const __m512 s = R == 1 ? _mm512_add_ps(acc[v][0], acc[v][1]) : acc[v][r];
                out[v][r] = _mm512_fmadd_ps(s, d, out[v][r]);
                out[v][r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[r * groups + g]), out[v][r]);
            }
        }
    }
}

/* out (m, n) bf16 = x (m, k) bf16 @ w^T (+ bias), w packed by inferhub_q4_pack. */
int inferhub_q4_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                            const uint8_t *packed, int64_t n, const uint16_t *bias,
                            uint16_t *out, int num_threads) {
    if (k % 32 || n % Q4_COLS || m <= 0 || k / 32 > 1024) return -2;
    const int64_t groups = k / 32, tasks = n / Q4_COLS;
    float xsum[2 * 1024];
    for (int64_t r0 = 0; r0 < m; r0 += 2) {
        const int rows = m - r0 < 2 ? 1 : 2;
        for (int r = 0; r < rows; r++)
            for (int64_t g = 0; g < groups; g++) {
                const uint16_t *xr = x + (r0 + r) * x_stride;
                const __m512 s = _mm512_add_ps(load16(xr, g * 32, 1), load16(xr, g * 32 + 16, 1));
                xsum[r * groups + g] = _mm512_reduce_add_ps(s);
            }
        const uint16_t *xr = x + r0 * x_stride;
        const int parallel = num_threads > 1 && n * k >= (1 << 16);
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            __m512 acc[4][2];
            if (rows == 1)
                q4_task(packed + t * groups * Q4_GROUP, groups, xr, x_stride, xsum, 1, acc);
            else
                q4_task(packed + t * groups * Q4_GROUP, groups, xr, x_stride, xsum, 2, acc);
            for (int v = 0; v < 4; v++) {
                const int64_t col = t * Q4_COLS + v * 16;
                const __m512 b = bias ? load16(bias, col, 1) : _mm512_setzero_ps();
                for (int r = 0; r < rows; r++)
                    store16(out + (r0 + r) * n, col, _mm512_add_ps(acc[v][r], b), 1);
            }
        }
    }
    return 0;
}

/* ---- 8-bit -------------------------------------------------------------------------- */

/* q: (n, k) int8 row-major -> packed (n / 16, k, 16). n % 16 == 0. */
void inferhub_q8_pack(const int8_t *q, int64_t n, int64_t k, int8_t *packed) {
    for (int64_t rb = 0; rb < n / 16; rb++)
        for (int64_t j = 0; j < k; j++)
            for (int i = 0; i < 16; i++) packed[(rb * k + j) * 16 + i] = q[(rb * 16 + i) * k + j];
}

/* out (m, n) bf16 = x (m, k) bf16 @ (q * scale)^T (+ bias); scale (n,) float32. */
int inferhub_q8_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                            const int8_t *packed, const float *scale, int64_t n,
                            const uint16_t *bias, uint16_t *out, int num_threads) {
    if (n % 16 || m <= 0) return -2;
    const int64_t blocks = n / 16;
    float *xf = thread_scratch(0, (size_t)(MR * k) * sizeof(float));
    if (!xf) return -1;
    for (int64_t r0 = 0; r0 < m; r0 += MR) {
        const int mr = (int)(m - r0 < MR ? m - r0 : MR);
        for (int r = 0; r < mr; r++)
            for (int64_t j = 0; j < k; j++) xf[r * k + j] = bf16_to_f32(x[(r0 + r) * x_stride + j]);
        const int parallel = num_threads > 1 && n * k >= (1 << 16);
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
        for (int64_t rb = 0; rb < blocks; rb++) {
            const int8_t *w = packed + rb * k * 16;
            __m512 acc[MR][2];
            for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
            int64_t j = 0;
            for (; j + 1 < k; j += 2) {
                /* two rows of 16 columns: the stream is 16 * k bytes per task, pages apart
                 * for the hardware's prefetcher; fetch 2 KB ahead */
                if ((j & 3) == 0) _mm_prefetch((const char *)(w + j * 16) + 2048, _MM_HINT_T0);
                const __m512 w0 = _mm512_cvtepi32_ps(
                    _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j * 16))));
                const __m512 w1 = _mm512_cvtepi32_ps(
                    _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j * 16 + 16))));
                for (int r = 0; r < MR; r++) {
                    if (r >= mr) break;
                    acc[r][0] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xf[r * k + j]), acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xf[r * k + j + 1]), acc[r][1]);
                }
            }
            if (j < k) {
                const __m512 w0 = _mm512_cvtepi32_ps(
                    _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + j * 16))));
                for (int r = 0; r < mr; r++)
                    acc[r][0] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xf[r * k + j]), acc[r][0]);
            }
            const __m512 s = _mm512_loadu_ps(scale + rb * 16);
            const __m512 b = bias ? load16(bias, rb * 16, 1) : _mm512_setzero_ps();
            for (int r = 0; r < mr; r++) {
                const __m512 y = _mm512_mul_ps(_mm512_add_ps(acc[r][0], acc[r][1]), s);
                store16(out + (r0 + r) * n, rb * 16, _mm512_add_ps(y, b), 1);
            }
        }
    }
    return 0;
}

#else /* no AVX512-BF16: the layers keep torch's kernels */
void inferhub_q4_pack(const uint8_t *q, const float *scale, const float *zero, int64_t n,
                      int64_t k, uint8_t *packed) {
    (void)q, (void)scale, (void)zero, (void)n, (void)k, (void)packed;
}
int inferhub_q4_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                            const uint8_t *packed, int64_t n, const uint16_t *bias,
                            uint16_t *out, int num_threads) {
    (void)x, (void)m, (void)k, (void)x_stride, (void)packed, (void)n, (void)bias, (void)out,
        (void)num_threads;
    return -3;
}
void inferhub_q8_pack(const int8_t *q, int64_t n, int64_t k, int8_t *packed) {
    (void)q, (void)n, (void)k, (void)packed;
}
int inferhub_q8_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                            const int8_t *packed, const float *scale, int64_t n,
                            const uint16_t *bias, uint16_t *out, int num_threads) {
    (void)x, (void)m, (void)k, (void)x_stride, (void)packed, (void)scale, (void)n, (void)bias,
        (void)out, (void)num_threads;
    return -3;
}
#endif
