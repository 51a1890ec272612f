/* Decode attention over the paged KV cache, for the CPU.
 *
 * One query token per sequence attends to its whole context, read in place from the cache
 * through the sequence's block table (no gathered copy of the context). Work items are
 * (sequence, kv head) pairs spread over OpenMP threads; the query heads that share a kv head
 * (GQA) are processed together so each key and value row is read once. Arithmetic in float32.
 *
 * Layouts (all contiguous):
 *   q:             (num_seqs, num_heads, head_dim), sequences q_stride elements apart
 *   out:           (num_seqs, num_heads, head_dim), contiguous
 *   k/v cache:     (num_slots, num_kv_heads, head_dim); slot = block * block_size + offset
 *   block_tables:  (num_seqs, max_blocks) int32
 *   context_lens:  (num_seqs,) int32, each in [1, max_blocks * block_size]
 * dtype: 0 = float32, 1 = bfloat16 (for q, caches and out alike).
 *
 * bfloat16 with head_dim a multiple of 32 (every model we serve) takes attend_bf16, the
 * others attend_avx512; CPUs without AVX-512 (AMD Zen 2/3) take attend_avx2 (head_dim a
 * multiple of 8), and the rest the portable attend_one. A 64-sequence decode step of SmolLM2
 * (192 positions each, 30 layers' caches, scattered blocks) took 0.9-1.2 ms per layer with
 * attend_avx512 and 0.67-0.78 ms with attend_bf16 (same runs, docs/benchmarks.md).
 * attend_bf16 finishes 16 positions' dot products with one transposed reduction instead of 16
 * horizontal sums, keeps its p . v sums in registers instead of a float32 row stored and
 * reloaded per position, and prefetches the rows the block table scatters.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

static inline void load_row(const void *src, int64_t index, int64_t n, int dtype, float *dst) {
    if (dtype == 1) {
        const uint16_t *s = (const uint16_t *)src + index;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)src + index, (size_t)n * sizeof(float));
    }
}

static inline void store_row(void *dst, int64_t index, int64_t n, int dtype, const float *src) {
    if (dtype == 1) {
        uint16_t *d = (uint16_t *)dst + index;
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)dst + index, src, (size_t)n * sizeof(float));
    }
}

/* Element offsets of the cache rows of positions [0, ctx), through the block table. */
static inline void row_offsets(const int32_t *table, int64_t ctx, int64_t block_size,
                               int64_t row_stride, int64_t *rows) {
    for (int64_t t0 = 0, bi = 0; t0 < ctx; t0 += block_size, bi++) {
        const int64_t base = (int64_t)table[bi] * block_size;
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        for (int64_t j = 0; j < n; j++) rows[t0 + j] = (base + j) * row_stride;
    }
}

#ifdef HAVE_AVX512
/* Softmax numerators of s[0:n] in place; returns 1 / their sum. */
static inline float softmax512(float *s, int64_t n) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(s + t));
    float m = _mm512_reduce_max_ps(vm);
    for (; t < n; t++) m = s[t] > m ? s[t] : m;
    const __m512 vmax = _mm512_set1_ps(m);
    __m512 vsum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), vmax));
        _mm512_storeu_ps(s + t, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    if (t < n) {
        const __mmask16 k = (__mmask16)((1u << (n - t)) - 1u);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + t), vmax));
        _mm512_mask_storeu_ps(s + t, k, e);
        vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(k, e));
    }
    return 1.0f / _mm512_reduce_add_ps(vsum);
}

#define MAX_CHUNKS 16 /* head_dim up to 256 */

/* Ask for a block's rows ahead of use (its kv heads [kh0, kh0 + nkh)): a block table jumps
 * between blocks, which the hardware prefetcher cannot guess. */
static inline void prefetch_block(const void *cache, int64_t first_slot, int64_t block_size,
                                  int64_t row_stride, int64_t offset, int64_t width, int dtype) {
    const int64_t elem = dtype == 1 ? 2 : 4;
    const char *p = (const char *)cache + (first_slot * row_stride + offset) * elem;
    for (int64_t j = 0; j < block_size; j++, p += row_stride * elem)
        for (int64_t off = 0; off < width * elem; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

/* Like attend_one, for kv heads [kh0, kh0 + nkh) of one sequence at once, head_dim % 16 == 0,
 * with AVX-512. Taking several kv heads walks each cache row whole and in order (the rows of
 * one kv head alone are strided, which DRAM streaming handles poorly). */
static inline __attribute__((always_inline)) void attend_avx512(
    const void *q, const void *k_cache, const void *v_cache, const int32_t *table, int64_t ctx,
    int64_t q_seq, void *out, int64_t seq_head0, int64_t kh0, int64_t nkh, int64_t group,
    int64_t head_dim,
    int64_t block_size, int64_t row_stride, int64_t max_ctx, float scale, int dtype, float *qf,
    float *acc, float *scores, float *inv_sum) {
    const int64_t nc = head_dim / 16;
    const int64_t nh = nkh * group; /* query heads handled here */
    const int64_t head0 = seq_head0 + kh0 * group;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t h = 0; h < nh; h++)
        for (int64_t c = 0; c < nc; c++)
            _mm512_storeu_ps(qf + (h * nc + c) * 16,
                             _mm512_mul_ps(load16(q, q_seq + (kh0 * group + h) * head_dim + c * 16,
                                                  dtype),
                                           vscale));
    const int64_t nblocks = (ctx + block_size - 1) / block_size;
    for (int64_t bi = 0; bi < nblocks; bi++) {
        const int64_t base = (int64_t)table[bi] * block_size;
        const int64_t t0 = bi * block_size;
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        if (bi + 1 < nblocks)
            prefetch_block(k_cache, (int64_t)table[bi + 1] * block_size, block_size, row_stride,
                           kh0 * head_dim, nkh * head_dim, dtype);
        for (int64_t j = 0; j < n; j++) {
            for (int64_t kv = 0; kv < nkh; kv++) {
                const int64_t at = (base + j) * row_stride + (kh0 + kv) * head_dim;
                __m512 k[MAX_CHUNKS];
                for (int64_t c = 0; c < nc; c++) k[c] = load16(k_cache, at + c * 16, dtype);
                for (int64_t g = 0; g < group; g++) {
                    const float *qh = qf + (kv * group + g) * nc * 16;
                    __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qh), k[0]);
                    for (int64_t c = 1; c < nc; c++)
                        a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + c * 16), k[c], a);
                    scores[(kv * group + g) * max_ctx + t0 + j] = _mm512_reduce_add_ps(a);
                }
            }
        }
    }
    for (int64_t h = 0; h < nh; h++) inv_sum[h] = softmax512(scores + h * max_ctx, ctx);
    for (int64_t i = 0; i < nh * nc; i++) _mm512_storeu_ps(acc + i * 16, _mm512_setzero_ps());
    for (int64_t bi = 0; bi < nblocks; bi++) {
        const int64_t base = (int64_t)table[bi] * block_size;
        const int64_t t0 = bi * block_size;
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        if (bi + 1 < nblocks)
            prefetch_block(v_cache, (int64_t)table[bi + 1] * block_size, block_size, row_stride,
                           kh0 * head_dim, nkh * head_dim, dtype);
        for (int64_t j = 0; j < n; j++) {
            for (int64_t kv = 0; kv < nkh; kv++) {
                const int64_t at = (base + j) * row_stride + (kh0 + kv) * head_dim;
                __m512 v[MAX_CHUNKS];
                for (int64_t c = 0; c < nc; c++) v[c] = load16(v_cache, at + c * 16, dtype);
                for (int64_t g = 0; g < group; g++) {
                    const int64_t h = kv * group + g;
                    const __m512 p = _mm512_set1_ps(scores[h * max_ctx + t0 + j]);
                    float *ah = acc + h * nc * 16;
                    for (int64_t c = 0; c < nc; c++)
                        _mm512_storeu_ps(ah + c * 16,
                                         _mm512_fmadd_ps(p, v[c], _mm512_loadu_ps(ah + c * 16)));
                }
            }
        }
    }
    for (int64_t h = 0; h < nh; h++) {
        float *ah = acc + h * head_dim;
        const __m512 r = _mm512_set1_ps(inv_sum[h]);
        for (int64_t c = 0; c < nc; c++)
            _mm512_storeu_ps(ah + c * 16, _mm512_mul_ps(_mm512_loadu_ps(ah + c * 16), r));
        store_row(out, (head0 + h) * head_dim, head_dim, dtype, ah);
    }
}
#endif

#if defined(HAVE_AVX512) && defined(__AVX512BF16__)
#define HAVE_BF16_DOT 1
/* Lane j of the result is the sum of the 16 lanes of v[j] (a transposed reduction: 45
 * shuffles and adds for 16 sums instead of 16 horizontal reductions). */
static inline __attribute__((always_inline)) __m512 reduce16(const __m512 *v) {
    __m512 w[8], x[4];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88),
                                   _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
    const __m512 z = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88),
                                   _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y, z, 0x88), _mm512_shuffle_f32x4(y, z, 0xDD));
}

#define CHUNK 16 /* context positions handled together */
#define MAX_NQ 8  /* head_dim up to 256, in pieces of 32 */

/* The cache lines of `bytes` from p, towards L1 (hint _MM_HINT_T0) or L2 (_MM_HINT_T1). */
#define prefetch_row(p, bytes, hint)                                                       \
    for (int64_t o_ = 0; o_ < (bytes); o_ += 64) _mm_prefetch((const char *)(p) + o_, hint)


/* Like attend_avx512, for bfloat16 with head_dim = 32 * NQ: q . k with bf16 dot products
 * (exact products, float32 sums; subnormals count as zero) over 16 positions at a time, finished by one transposed
 * reduction; p . v in float32 with each bf16 row split into its even and odd elements (two
 * instructions instead of a widening conversion). */
static inline __attribute__((always_inline)) void attend_bf16(
    const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table,
    int64_t ctx, int64_t q_seq, uint16_t *out, int64_t seq_head0, int64_t kh0, int64_t nkh,
    int64_t group, const int64_t NQ, int64_t block_size, int64_t row_stride, int64_t max_ctx,
    float scale, float *scores, float *inv_sum, int64_t *rows) {
    const int64_t head_dim = 32 * NQ;
    const int64_t nh = nkh * group;
    const __m512 vscale = _mm512_set1_ps(scale);
    const __m512i odd_mask = _mm512_set1_epi32((int)0xFFFF0000u);
    row_offsets(table, ctx, block_size, row_stride, rows);
    const int64_t row_bytes = nkh * head_dim * 2;
    for (int64_t j = 0; j < CHUNK && j < ctx; j++)
        prefetch_row(k_cache + rows[j] + kh0 * head_dim, row_bytes, _MM_HINT_T0);
    for (int64_t t0 = 0; t0 < ctx; t0 += CHUNK) {
        const int64_t m = ctx - t0 < CHUNK ? ctx - t0 : CHUNK;
        const __mmask16 keep = (__mmask16)(m == CHUNK ? 0xFFFFu : (1u << m) - 1u);
        /* positions past the context repeat the first row (their sums are never stored) */
        const uint16_t *krow[CHUNK];
        for (int64_t j = 0; j < CHUNK; j++) krow[j] = k_cache + rows[t0 + (j < m ? j : 0)];
        const int64_t next_end = t0 + 2 * CHUNK < ctx ? t0 + 2 * CHUNK : ctx;
        for (int64_t kv = 0; kv < nkh; kv++) {
            const int64_t off = (kh0 + kv) * head_dim;
            for (int64_t g = 0; g < group; g++) {
                const int64_t h = kv * group + g;
                /* the block table scatters rows, which the hardware prefetcher cannot follow:
                 * ask for the next chunk's keys and this chunk's values (used after the
                 * softmax), each head a share of the rows (in one burst per chunk, 200
                 * prefetches for SmolLM2, they held the loads up: a decode step of 64
                 * sequences was 1.06x slower, interleaved A/B) */
                for (int64_t j = h * CHUNK / nh; j < (h + 1) * CHUNK / nh; j++) {
                    if (t0 + CHUNK + j < next_end)
                        prefetch_row(k_cache + rows[t0 + CHUNK + j] + kh0 * head_dim,
                                     row_bytes, _MM_HINT_T0);
                    if (j < m)
                        prefetch_row(v_cache + rows[t0 + j] + kh0 * head_dim, row_bytes,
                                     _MM_HINT_T1);
                }
                __m512bh qb[MAX_NQ];
#pragma GCC unroll 8
                for (int64_t c = 0; c < NQ; c++)
                    qb[c] = (__m512bh)_mm512_loadu_si512(q + q_seq + (kh0 * group + h) * head_dim + 32 * c);
                __m512 v[CHUNK];
#pragma GCC unroll 16
                for (int64_t j = 0; j < CHUNK; j++) {
                    __m512 a = _mm512_setzero_ps();
#pragma GCC unroll 8
                    for (int64_t c = 0; c < NQ; c++)
                        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(krow[j] + off + 32 * c), qb[c]);
                    v[j] = a;
                }
                _mm512_mask_storeu_ps(scores + h * max_ctx + t0, keep,
                                      _mm512_mul_ps(reduce16(v), vscale));
            }
        }
    }
    for (int64_t h = 0; h < nh; h++) inv_sum[h] = softmax512(scores + h * max_ctx, ctx);
    for (int64_t kv = 0; kv < nkh; kv++) {
        const int64_t off = (kh0 + kv) * head_dim;
        for (int64_t g = 0; g < group; g++) {
            const int64_t h = kv * group + g;
            const float *p = scores + h * max_ctx;
            /* two sets of sums (even and odd positions): twice the independent FMA chains */
            __m512 even[2][MAX_NQ], odd[2][MAX_NQ];
#pragma GCC unroll 8
            for (int64_t c = 0; c < NQ; c++)
                even[0][c] = odd[0][c] = even[1][c] = odd[1][c] = _mm512_setzero_ps();
            int64_t t = 0;
            for (; t + 2 <= ctx; t += 2) {
#pragma GCC unroll 2
                for (int u = 0; u < 2; u++) {
                    const uint16_t *row = v_cache + rows[t + u] + off;
                    const __m512 pt = _mm512_set1_ps(p[t + u]);
#pragma GCC unroll 8
                    for (int64_t c = 0; c < NQ; c++) {
                        const __m512i x = _mm512_loadu_si512(row + 32 * c);
                        even[u][c] = _mm512_fmadd_ps(
                            pt, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), even[u][c]);
                        odd[u][c] = _mm512_fmadd_ps(
                            pt, _mm512_castsi512_ps(_mm512_and_si512(x, odd_mask)), odd[u][c]);
                    }
                }
            }
            if (t < ctx) {
                const uint16_t *row = v_cache + rows[t] + off;
                const __m512 pt = _mm512_set1_ps(p[t]);
#pragma GCC unroll 8
                for (int64_t c = 0; c < NQ; c++) {
                    const __m512i x = _mm512_loadu_si512(row + 32 * c);
                    even[0][c] = _mm512_fmadd_ps(
                        pt, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), even[0][c]);
                    odd[0][c] = _mm512_fmadd_ps(
                        pt, _mm512_castsi512_ps(_mm512_and_si512(x, odd_mask)), odd[0][c]);
                }
            }
            const __m512 r = _mm512_set1_ps(inv_sum[h]);
            const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            uint16_t *o = out + (seq_head0 + kh0 * group + h) * head_dim;
#pragma GCC unroll 8
            for (int64_t c = 0; c < NQ; c++) {
                const __m512 e = _mm512_mul_ps(_mm512_add_ps(even[0][c], even[1][c]), r);
                const __m512 d = _mm512_mul_ps(_mm512_add_ps(odd[0][c], odd[1][c]), r);
                store16(o, 32 * c, _mm512_permutex2var_ps(e, lo, d), 1);
                store16(o, 32 * c + 16, _mm512_permutex2var_ps(e, hi, d), 1);
            }
        }
    }
}
#endif

#if !defined(HAVE_AVX512) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2_ATTN 1
#define MAX_C8 32 /* head_dim up to 256, in pieces of 8 */

/* 8 values of a row at element `index` as float32 lanes (dtype 1: bfloat16). */
static inline __attribute__((always_inline)) __m256 load8(const void *src, int64_t index,
                                                          int dtype) {
    if (dtype == 1) {
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + index));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)src + index);
}

/* Lane j of the result is the sum of the 8 lanes of a[j] (a transposed reduction). */
static inline __attribute__((always_inline)) __m256 reduce8(const __m256 *a) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
}

#define prefetch_row8(p, bytes)                                                            \
    for (int64_t o_ = 0; o_ < (bytes); o_ += 64) _mm_prefetch((const char *)(p) + o_, _MM_HINT_T0)

/* Like attend_avx512 with AVX2 (CPUs without AVX-512), head_dim = 8 * NC, float32 or
 * bfloat16 caches: kv heads [kh0, kh0 + nkh) of one sequence, each cache row walked whole;
 * q . k over 8 positions at a time finished by one transposed reduction; p . v with the
 * sums of 16 positions kept in registers; rows asked for 16 positions ahead. */
static inline __attribute__((always_inline)) void attend_avx2(
    const void *q, const void *k_cache, const void *v_cache, const int32_t *table, int64_t ctx,
    int64_t q_seq, void *out, int64_t seq_head0, int64_t kh0, int64_t nkh, int64_t group,
    const int64_t NC, int64_t block_size, int64_t row_stride, int64_t max_ctx, float scale,
    const int dtype, float *qf, float *acc, float *scores, float *inv_sum, int64_t *rows) {
    const int64_t head_dim = 8 * NC, nh = nkh * group;
    const int64_t elem = dtype == 1 ? 2 : 4, row_bytes = nkh * head_dim * elem;
    const __m256 vscale = _mm256_set1_ps(scale);
    for (int64_t h = 0; h < nh; h++)
        for (int64_t c = 0; c < NC; c++)
            _mm256_storeu_ps(qf + h * head_dim + c * 8,
                             _mm256_mul_ps(load8(q, q_seq + (kh0 * group + h) * head_dim + c * 8,
                                                 dtype),
                                           vscale));
    row_offsets(table, ctx, block_size, row_stride, rows);
    const char *kc = (const char *)k_cache, *vc = (const char *)v_cache;
    for (int64_t j = 0; j < 16 && j < ctx; j++)
        prefetch_row8(kc + (rows[j] + kh0 * head_dim) * elem, row_bytes);
    for (int64_t t0 = 0; t0 < ctx; t0 += 8) {
        const int64_t m = ctx - t0 < 8 ? ctx - t0 : 8;
        for (int64_t j = t0 + 16; j < t0 + 16 + m && j < ctx; j++)
            prefetch_row8(kc + (rows[j] + kh0 * head_dim) * elem, row_bytes);
        for (int64_t kv = 0; kv < nkh; kv++)
            for (int64_t g = 0; g < group; g++) {
                const int64_t h = kv * group + g;
                const float *qh = qf + h * head_dim;
                __m256 a[8];
                for (int64_t p = 0; p < m; p++) {
                    const int64_t at = rows[t0 + p] + (kh0 + kv) * head_dim;
                    __m256 s = _mm256_mul_ps(_mm256_loadu_ps(qh), load8(k_cache, at, dtype));
                    for (int64_t c = 1; c < NC; c++)
                        s = _mm256_fmadd_ps(_mm256_loadu_ps(qh + c * 8),
                                            load8(k_cache, at + c * 8, dtype), s);
                    a[p] = s;
                }
                if (m == 8) {
                    _mm256_storeu_ps(scores + h * max_ctx + t0, reduce8(a));
                } else {
                    for (int64_t p = 0; p < m; p++) scores[h * max_ctx + t0 + p] = hsum8(a[p]);
                }
            }
    }
    for (int64_t h = 0; h < nh; h++) {
        float *s = scores + h * max_ctx;
        __m256 vm = _mm256_set1_ps(-INFINITY);
        int64_t t = 0;
        for (; t + 8 <= ctx; t += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + t));
        float mx = -INFINITY;
        float lanes[8];
        _mm256_storeu_ps(lanes, vm);
        for (int i = 0; i < 8; i++) mx = lanes[i] > mx ? lanes[i] : mx;
        for (int64_t u = t; u < ctx; u++) mx = s[u] > mx ? s[u] : mx;
        const __m256 vmax = _mm256_set1_ps(mx);
        __m256 vsum = _mm256_setzero_ps();
        for (t = 0; t + 8 <= ctx; t += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmax));
            _mm256_storeu_ps(s + t, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum8(vsum);
        if (t < ctx) {
            float tail[8] = {0};
            for (int64_t u = t; u < ctx; u++) tail[u - t] = s[u] - mx;
            const __m256 e = exp256(_mm256_loadu_ps(tail));
            _mm256_storeu_ps(tail, e);
            for (int64_t u = t; u < ctx; u++) {
                s[u] = tail[u - t];
                sum += tail[u - t];
            }
        }
        inv_sum[h] = 1.0f / sum;
    }
    for (int64_t i = 0; i < nh * head_dim; i++) acc[i] = 0.0f;
    for (int64_t j = 0; j < 16 && j < ctx; j++)
        prefetch_row8(vc + (rows[j] + kh0 * head_dim) * elem, row_bytes);
    for (int64_t t0 = 0; t0 < ctx; t0 += 16) {
        const int64_t m = ctx - t0 < 16 ? ctx - t0 : 16;
        for (int64_t j = t0 + 16; j < t0 + 16 + m && j < ctx; j++)
            prefetch_row8(vc + (rows[j] + kh0 * head_dim) * elem, row_bytes);
        for (int64_t kv = 0; kv < nkh; kv++)
            for (int64_t g = 0; g < group; g++) {
                const int64_t h = kv * group + g;
                float *ah = acc + h * head_dim;
                __m256 r[MAX_C8];
                for (int64_t c = 0; c < NC; c++) r[c] = _mm256_loadu_ps(ah + c * 8);
                for (int64_t p = 0; p < m; p++) {
                    const __m256 pb = _mm256_set1_ps(scores[h * max_ctx + t0 + p]);
                    const int64_t at = rows[t0 + p] + (kh0 + kv) * head_dim;
                    for (int64_t c = 0; c < NC; c++)
                        r[c] = _mm256_fmadd_ps(pb, load8(v_cache, at + c * 8, dtype), r[c]);
                }
                for (int64_t c = 0; c < NC; c++) _mm256_storeu_ps(ah + c * 8, r[c]);
            }
    }
    for (int64_t h = 0; h < nh; h++) {
        float *ah = acc + h * head_dim;
        const __m256 r = _mm256_set1_ps(inv_sum[h]);
        for (int64_t c = 0; c < NC; c++)
            _mm256_storeu_ps(ah + c * 8, _mm256_mul_ps(_mm256_loadu_ps(ah + c * 8), r));
        store_row(out, (seq_head0 + kh0 * group + h) * head_dim, head_dim, dtype, ah);
    }
}
#endif

/* One (sequence, kv head) item. Inlined into a float32 and a bfloat16 copy so that the row
 * conversions specialise and vectorise. */
static inline __attribute__((always_inline)) void attend_one(
    const void *q, const void *k_cache, const void *v_cache, const int32_t *table, int64_t ctx,
    int64_t q_seq, void *out, int64_t head0, int64_t kh, int64_t group, int64_t head_dim,
    int64_t block_size,
    int64_t row_stride, int64_t max_ctx, float scale, int dtype, float *qf, float *acc,
    float *row, float *scores, float *inv_sum) {
    for (int64_t g = 0; g < group; g++) {
        float *qg = qf + g * head_dim;
        load_row(q, q_seq + (kh * group + g) * head_dim, head_dim, dtype, qg);
        for (int64_t d = 0; d < head_dim; d++) qg[d] *= scale;
    }
    const int64_t nblocks = (ctx + block_size - 1) / block_size;
    /* scores = q . k for every context position, block by block */
    for (int64_t bi = 0; bi < nblocks; bi++) {
        const int64_t base = (int64_t)table[bi] * block_size;
        const int64_t t0 = bi * block_size;
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        for (int64_t j = 0; j < n; j++) {
            load_row(k_cache, (base + j) * row_stride + kh * head_dim, head_dim, dtype, row);
            for (int64_t g = 0; g < group; g++) {
                const float *qg = qf + g * head_dim;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < head_dim; d++) s += qg[d] * row[d];
                scores[g * max_ctx + t0 + j] = s;
            }
        }
    }
    /* softmax per query head (unnormalised; divided at the end) */
    for (int64_t g = 0; g < group; g++) {
        float *sg = scores + g * max_ctx;
        float m = sg[0];
        for (int64_t t = 1; t < ctx; t++) m = sg[t] > m ? sg[t] : m;
        float sum = 0.0f;
        for (int64_t t = 0; t < ctx; t++) {
            sg[t] = expf(sg[t] - m);
            sum += sg[t];
        }
        inv_sum[g] = 1.0f / sum;
    }
    memset(acc, 0, (size_t)(group * head_dim) * sizeof(float));
    for (int64_t bi = 0; bi < nblocks; bi++) {
        const int64_t base = (int64_t)table[bi] * block_size;
        const int64_t t0 = bi * block_size;
        const int64_t n = ctx - t0 < block_size ? ctx - t0 : block_size;
        for (int64_t j = 0; j < n; j++) {
            load_row(v_cache, (base + j) * row_stride + kh * head_dim, head_dim, dtype, row);
            for (int64_t g = 0; g < group; g++) {
                const float p = scores[g * max_ctx + t0 + j];
                float *ag = acc + g * head_dim;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; d++) ag[d] += p * row[d];
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *ag = acc + g * head_dim;
        for (int64_t d = 0; d < head_dim; d++) ag[d] *= inv_sum[g];
        store_row(out, (head0 + g) * head_dim, head_dim, dtype, ag);
    }
}

int inferhub_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                                    const int32_t *block_tables, const int32_t *context_lens,
                                    void *out, int64_t q_stride, int64_t num_seqs,
                                    int64_t num_heads,
                                    int64_t num_kv_heads, int64_t head_dim, int64_t max_blocks,
                                    int64_t block_size, float scale, int dtype, int num_threads) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t max_ctx = max_blocks * block_size;
    const int64_t row_stride = num_kv_heads * head_dim; /* elements between two slots */
    int failed = 0;
    int64_t total = 0;
    for (int64_t b = 0; b < num_seqs; b++) total += context_lens[b];
    /* A parallel region costs microseconds: only worth it when there is real work. */
    const int parallel = num_threads > 1 && total * num_kv_heads >= 2048;
    /* One work item per sequence reads each cache row whole and in order (the rows of one kv
     * head alone are strided, which memory streams poorly: 38 vs 12 us for a 150-token
     * context); only when there are too few sequences to keep the threads busy, one item
     * per (sequence, kv head). */
    const int64_t split = parallel && num_seqs < 4 * (int64_t)num_threads ? num_kv_heads : 1;
    const int64_t per_item = num_kv_heads / split; /* kv heads per work item */
    const int64_t items = num_seqs * split;
    const int64_t item_heads = per_item * group;

#pragma omp parallel num_threads(num_threads) if (parallel) reduction(| : failed)
    {
        float *qf = malloc((size_t)(item_heads * head_dim) * sizeof(float));
        float *acc = malloc((size_t)(item_heads * head_dim) * sizeof(float));
        float *row = malloc((size_t)head_dim * sizeof(float));
        float *scores = malloc((size_t)(item_heads * max_ctx) * sizeof(float));
        float *inv_sum = malloc((size_t)item_heads * sizeof(float));
        int64_t *rows = malloc((size_t)max_ctx * sizeof(int64_t));
        if (!qf || !acc || !row || !scores || !inv_sum || !rows) failed = 1;
        /* guided: the faster thread takes more items (see amx_gemm.c) */
#pragma omp for schedule(guided)
        for (int64_t it = 0; it < items; it++) {
            if (failed) continue;
            const int64_t b = it / split, kh0 = (it % split) * per_item;
            const int32_t *table = block_tables + b * max_blocks;
            const int64_t ctx = context_lens[b];
#ifdef HAVE_BF16_DOT
            if (dtype == 1 && head_dim % 32 == 0 && head_dim <= 32 * MAX_NQ) {
                const uint16_t *qq = q, *kc = k_cache, *vc = v_cache;
                if (head_dim == 64)
                    attend_bf16(qq, kc, vc, table, ctx, b * q_stride, out, b * num_heads, kh0,
                                per_item, group, 2, block_size, row_stride, max_ctx, scale,
                                scores, inv_sum, rows);
                else if (head_dim == 128)
                    attend_bf16(qq, kc, vc, table, ctx, b * q_stride, out, b * num_heads, kh0,
                                per_item, group, 4, block_size, row_stride, max_ctx, scale,
                                scores, inv_sum, rows);
                else
                    attend_bf16(qq, kc, vc, table, ctx, b * q_stride, out, b * num_heads, kh0,
                                per_item, group, head_dim / 32, block_size, row_stride, max_ctx,
                                scale, scores, inv_sum, rows);
                continue;
            }
#endif
#ifdef HAVE_AVX2_ATTN
            if (head_dim % 8 == 0 && head_dim <= 8 * MAX_C8) {
                const int64_t h0 = b * num_heads;
                if (dtype == 1 && head_dim == 64)
                    attend_avx2(q, k_cache, v_cache, table, ctx, b * q_stride, out, h0, kh0,
                                per_item, group, 8, block_size, row_stride, max_ctx, scale, 1,
                                qf, acc, scores, inv_sum, rows);
                else if (dtype == 1)
                    attend_avx2(q, k_cache, v_cache, table, ctx, b * q_stride, out, h0, kh0,
                                per_item, group, head_dim / 8, block_size, row_stride, max_ctx,
                                scale, 1, qf, acc, scores, inv_sum, rows);
                else if (head_dim == 64)
                    attend_avx2(q, k_cache, v_cache, table, ctx, b * q_stride, out, h0, kh0,
                                per_item, group, 8, block_size, row_stride, max_ctx, scale, 0,
                                qf, acc, scores, inv_sum, rows);
                else
                    attend_avx2(q, k_cache, v_cache, table, ctx, b * q_stride, out, h0, kh0,
                                per_item, group, head_dim / 8, block_size, row_stride, max_ctx,
                                scale, 0, qf, acc, scores, inv_sum, rows);
                continue;
            }
#endif
#ifdef HAVE_AVX512
            if (head_dim % 16 == 0 && head_dim <= 16 * MAX_CHUNKS) {
                if (dtype == 1)
                    attend_avx512(q, k_cache, v_cache, table, ctx, b * q_stride, out,
                                  b * num_heads, kh0, per_item, group, head_dim, block_size,
                                  row_stride, max_ctx, scale, 1, qf, acc, scores, inv_sum);
                else
                    attend_avx512(q, k_cache, v_cache, table, ctx, b * q_stride, out,
                                  b * num_heads, kh0, per_item, group, head_dim, block_size,
                                  row_stride, max_ctx, scale, 0, qf, acc, scores, inv_sum);
                continue;
            }
#endif
            for (int64_t kh = kh0; kh < kh0 + per_item; kh++) {
                const int64_t head0 = b * num_heads + kh * group;
                if (dtype == 1)
                    attend_one(q, k_cache, v_cache, table, ctx, b * q_stride, out, head0, kh,
                               group, head_dim, block_size, row_stride, max_ctx, scale, 1, qf,
                               acc, row, scores, inv_sum);
                else
                    attend_one(q, k_cache, v_cache, table, ctx, b * q_stride, out, head0, kh,
                               group, head_dim, block_size, row_stride, max_ctx, scale, 0, qf,
                               acc, row, scores, inv_sum);
            }
        }
        free(qf);
        free(acc);
        free(row);
        free(scores);
        free(inv_sum);
        free(rows);
    }
    return failed ? -1 : 0;
}
