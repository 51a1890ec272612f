/* Residual add + RMSNorm, rotary embedding, SiLU-and-multiply and the KV cache write for the
 * CPU, with the rounding of the torch code they replace (layers/norm.py, rotary.py,
 * activation.py), so that swapping them in does not change the tokens: in bfloat16 every
 * elementwise product and sum is rounded to bfloat16 as torch rounds it; the norm itself is
 * computed in float32.
 *
 * A small batch of tokens costs a handful of microseconds here, against about 50 us for the
 * eight torch operations an RMSNorm is made of. dtype: 0 = float32, 1 = bfloat16.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

/* the value torch stores for `f` in this dtype */
static inline float round_to(float f, int dtype) {
    return dtype == 1 ? bf16_to_f32(f32_to_bf16(f)) : f;
}

static inline float load(const void *p, int64_t i, int dtype) {
    return dtype == 1 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float v, int dtype) {
    if (dtype == 1)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

#ifdef HAVE_AVX512
/* One row of inferhub_add_rms_norm in bfloat16, 16 elements at a time. */
static inline void add_rms_norm_bf16(const void *x, const void *residual, const void *weight,
                                     void *out, void *res_out, int64_t r, int64_t hidden,
                                     int64_t x_stride, float eps) {
    float row[hidden];
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < hidden; i += 16) {
        __m512 v = load16(x, r * x_stride + i, 1);
        if (residual) {
            v = round16(_mm512_add_ps(v, load16(residual, r * hidden + i, 1)), 1);
            store16(res_out, r * hidden + i, v, 1);
        }
        _mm512_storeu_ps(row + i, v);
        ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)hidden + eps));
    for (int64_t i = 0; i < hidden; i += 16) {
        const __m512 n = round16(_mm512_mul_ps(_mm512_loadu_ps(row + i), inv), 1);
        store16(out, r * hidden + i, _mm512_mul_ps(load16(weight, i, 1), n), 1);
    }
}

/* One token of inferhub_rotary_inplace in bfloat16, head_dim / 2 a multiple of 16. */
static inline void rotary_bf16(void *qk, const float *cs, const float *sn, int64_t base0,
                               int64_t heads, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; i += 16) {
        const __m512 c = round16(_mm512_loadu_ps(cs + i), 1), s = round16(_mm512_loadu_ps(sn + i), 1);
        const __m512 ns = _mm512_sub_ps(_mm512_setzero_ps(), s);
        for (int64_t h = 0; h < heads; h++) {
            const int64_t base = base0 + h * head_dim + i;
            const __m512 x1 = load16(qk, base, 1), x2 = load16(qk, base + half, 1);
            const __m512 a1 = round16(_mm512_mul_ps(x1, c), 1), b1 = round16(_mm512_mul_ps(x2, ns), 1);
            const __m512 a2 = round16(_mm512_mul_ps(x2, c), 1), b2 = round16(_mm512_mul_ps(x1, s), 1);
            store16(qk, base, _mm512_add_ps(a1, b1), 1);
            store16(qk, base + half, _mm512_add_ps(a2, b2), 1);
        }
    }
}
#endif

/* out = weight * norm(x + residual), res_out = x + residual (if residual is given).
 * x and residual rows are `x_stride` / `hidden` elements apart; out and res_out are
 * contiguous (rows, hidden). */
int inferhub_add_rms_norm(const void *x, const void *residual, const void *weight, void *out,
                          void *res_out, int64_t rows, int64_t hidden, int64_t x_stride,
                          float eps, int dtype, int num_threads) {
    const int parallel = num_threads > 1 && rows * hidden >= (1 << 14);
#ifdef HAVE_AVX512
    if (dtype == 1 && hidden % 16 == 0) {
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
        for (int64_t r = 0; r < rows; r++) add_rms_norm_bf16(x, residual, weight, out, res_out, r, hidden, x_stride, eps);
        return 0;
    }
#endif
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float row[hidden];
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < hidden; i++) {
            float v = load(x, r * x_stride + i, dtype);
            if (residual) v = round_to(v + load(residual, r * hidden + i, dtype), dtype);
            row[i] = v;
            ss += v * v;
        }
        if (residual)
            for (int64_t i = 0; i < hidden; i++) store(res_out, r * hidden + i, row[i], dtype);
        const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
#pragma omp simd
        for (int64_t i = 0; i < hidden; i++) {
            const float n = round_to(row[i] * inv, dtype);
            store(out, r * hidden + i, load(weight, i, dtype) * n, dtype);
        }
    }
    return 0;
}

/* Rotate the first `heads` heads of each token in place ("rotate half" layout):
 * x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, with cos/sin rows (max_pos, head_dim / 2) in
 * float32 rounded to the dtype first, as the torch path does. Tokens are `token_stride`
 * elements apart; heads are contiguous within a token. */
int inferhub_rotary_inplace(void *qk, const int64_t *positions, const float *cos_cache,
                            const float *sin_cache, int64_t tokens, int64_t heads,
                            int64_t head_dim, int64_t token_stride, int dtype,
                            int num_threads) {
    const int64_t half = head_dim / 2;
    const int parallel = num_threads > 1 && tokens * heads * head_dim >= (1 << 14);
#ifdef HAVE_AVX512
    if (dtype == 1 && half % 16 == 0) {
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
        for (int64_t t = 0; t < tokens; t++)
            rotary_bf16(qk, cos_cache + positions[t] * half, sin_cache + positions[t] * half,
                        t * token_stride, heads, head_dim);
        return 0;
    }
#endif
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *cs = cos_cache + positions[t] * half;
        const float *sn = sin_cache + positions[t] * half;
        float c[half], s[half];
        for (int64_t i = 0; i < half; i++) {
            c[i] = round_to(cs[i], dtype);
            s[i] = round_to(sn[i], dtype);
        }
        for (int64_t h = 0; h < heads; h++) {
            const int64_t base = t * token_stride + h * head_dim;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float x1 = load(qk, base + i, dtype);
                const float x2 = load(qk, base + half + i, dtype);
                const float a1 = round_to(x1 * c[i], dtype), b1 = round_to(-x2 * s[i], dtype);
                const float a2 = round_to(x2 * c[i], dtype), b2 = round_to(x1 * s[i], dtype);
                store(qk, base + i, a1 + b1, dtype);
                store(qk, base + half + i, a2 + b2, dtype);
            }
        }
    }
    return 0;
}

/* out = silu(gate) * up for gate_up rows [gate | up] of 2 * inter elements; out (rows, inter)
 * contiguous. silu is rounded to the dtype before the product, as torch's two operations do. */
int inferhub_silu_and_mul(const void *gate_up, void *out, int64_t rows, int64_t inter,
                          int dtype, int num_threads) {
    const int parallel = num_threads > 1 && rows * inter >= (1 << 16);
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t g0 = r * 2 * inter, u0 = g0 + inter, o0 = r * inter;
        int64_t i = 0;
#ifdef HAVE_AVX512
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= inter; i += 16) {
            const __m512 g = load16(gate_up, g0 + i, dtype);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 s = round16(_mm512_div_ps(g, _mm512_add_ps(one, e)), dtype);
            store16(out, o0 + i, _mm512_mul_ps(s, load16(gate_up, u0 + i, dtype)), dtype);
        }
#elif defined(HAVE_AVX2)
        if (dtype == 0) { /* float32 (CPUs without AVX-512 run float32 models) */
            const float *gu = (const float *)gate_up;
            float *o = (float *)out;
            const __m256 one = _mm256_set1_ps(1.0f);
            for (; i + 8 <= inter; i += 8) {
                const __m256 g = _mm256_loadu_ps(gu + g0 + i);
                const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
                const __m256 sv = _mm256_div_ps(g, _mm256_add_ps(one, e));
                _mm256_storeu_ps(o + o0 + i, _mm256_mul_ps(sv, _mm256_loadu_ps(gu + u0 + i)));
            }
        }
#endif
        for (; i < inter; i++) {
            const float g = load(gate_up, g0 + i, dtype);
            const float s = round_to(g / (1.0f + expf(-g)), dtype);
            store(out, o0 + i, s * load(gate_up, u0 + i, dtype), dtype);
        }
    }
    return 0;
}

/* Copy each token's key and value rows (width = kv heads * head_dim elements, tokens
 * k_stride / v_stride apart) into its cache slot. */
int inferhub_write_kv(const void *k, const void *v, void *k_cache, void *v_cache,
                      const int64_t *slots, int64_t tokens, int64_t width, int64_t k_stride,
                      int64_t v_stride, int dtype) {
    const size_t elem = dtype == 1 ? 2 : 4, bytes = (size_t)width * elem;
    for (int64_t t = 0; t < tokens; t++) {
        memcpy((char *)k_cache + (size_t)slots[t] * bytes, (const char *)k + t * k_stride * elem,
               bytes);
        memcpy((char *)v_cache + (size_t)slots[t] * bytes, (const char *)v + t * v_stride * elem,
               bytes);
    }
    return 0;
}

/* out[r] = index of the largest value of row r, the first one on ties; a row holding NaN
 * gives its first NaN (torch's max(dim) treats NaN as the largest). Rows are `stride`
 * elements apart. */
int inferhub_argmax_rows(const void *x, int64_t rows, int64_t cols, int64_t stride, int dtype,
                         int64_t *out, int num_threads) {
    const int parallel = num_threads > 1 && rows * cols >= (1 << 16);
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t base = r * stride;
        float best = -INFINITY;
        int nan = 0;
        int64_t i = 0;
#ifdef HAVE_AVX512
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        __mmask16 unordered = 0;
        for (; i + 16 <= cols; i += 16) {
            const __m512 v = load16(x, base + i, dtype);
            unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            vmax = _mm512_max_ps(vmax, v);
        }
        nan = unordered != 0;
        best = _mm512_reduce_max_ps(vmax);
#endif
        for (; i < cols; i++) {
            const float v = load(x, base + i, dtype);
            if (v != v) nan = 1;
            if (v > best) best = v;
        }
        int64_t idx = 0, j = 0;
#ifdef HAVE_AVX512
        const __m512 vbest = _mm512_set1_ps(best);
        for (; j + 16 <= cols; j += 16) {
            const __m512 v = load16(x, base + j, dtype);
            const __mmask16 hit = nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)
                                      : _mm512_cmp_ps_mask(v, vbest, _CMP_EQ_OQ);
            if (hit) break;
        }
#endif
        for (; j < cols; j++) {
            const float v = load(x, base + j, dtype);
            if (nan ? v != v : v == best) {
                idx = j;
                break;
            }
        }
        out[r] = idx;
    }
    return 0;
}
