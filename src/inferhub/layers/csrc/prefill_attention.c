/* Causal attention of first prefill chunks over their own keys and values, for the CPU
 * (float32, AVX2/FMA).
 *
 * Each sequence's new tokens attend to the tokens before them in the same chunk (a chunk that
 * starts at position 0: its context is exactly its own keys). Work items are (sequence, kv
 * head, block of BQ queries); the query heads that share the kv head (GQA) are processed
 * together, so each key and value row is read once per item. For each tile of 16 keys the
 * keys are transposed once into a (head_dim, 16) tile, then every query row computes its 16
 * scores with two accumulators per 8 dims (broadcast query element times a key-tile row), an
 * online softmax, and adds p . V into its output row. Keys past a row's position are masked
 * (the tiles on the diagonal); tiles wholly past the block's last query are never read.
 *
 * torch's flash attention for the CPU took 6.2 ms a layer for a 512-token SmolLM2 prompt
 * (9 heads, 3 kv heads, head_dim 64) on 2 Zen 3 cores, about 49 GFLOP/s.
 *
 * Layouts: q (tokens, num_heads, head_dim), k and v (tokens, num_kv_heads, head_dim), out
 * (tokens, num_heads, head_dim); rows q_stride, k_stride, v_stride, out_stride elements apart,
 * heads head_dim apart. Sequence s is tokens starts[s] .. starts[s] + lens[s].
 * Returns 0, 1 when out of memory, 2 when this build has no AVX2 (the caller falls back).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define BQ 16     /* queries per work item */
#define KT 32     /* keys per tile (a multiple of 8; scores2 and update_row take 32) */
#define MAX_D8 32 /* head_dim up to 256 */

#ifdef HAVE_AVX2
static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline float hsum8f(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* Scores of query row qr against the KT keys of the transposed tile kt, two rows at a time
 * (eight independent accumulator chains keep both FMA pipes busy). */
static inline __attribute__((always_inline)) void scores2(const float *qa, const float *qb,
                                                          const float *kt, int64_t d,
                                                          __m256 *sa, __m256 *sb) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t c = 0; c < d; c++) {
        const __m256 xa = _mm256_broadcast_ss(qa + c), xb = _mm256_broadcast_ss(qb + c);
        const float *row = kt + c * KT;
        const __m256 k0 = _mm256_load_ps(row), k1 = _mm256_load_ps(row + 8);
        const __m256 k2 = _mm256_load_ps(row + 16), k3 = _mm256_load_ps(row + 24);
        a0 = _mm256_fmadd_ps(xa, k0, a0);
        a1 = _mm256_fmadd_ps(xa, k1, a1);
        a2 = _mm256_fmadd_ps(xa, k2, a2);
        a3 = _mm256_fmadd_ps(xa, k3, a3);
        b0 = _mm256_fmadd_ps(xb, k0, b0);
        b1 = _mm256_fmadd_ps(xb, k1, b1);
        b2 = _mm256_fmadd_ps(xb, k2, b2);
        b3 = _mm256_fmadd_ps(xb, k3, b3);
    }
    sa[0] = a0, sa[1] = a1, sa[2] = a2, sa[3] = a3;
    sb[0] = b0, sb[1] = b1, sb[2] = b2, sb[3] = b3;
}

/* The online-softmax update of one row with its KT scores s (keys past `last` - j0 masked):
 * rescales its output row o by the change of its maximum and adds p . V for keys j0 .. last. */
static inline __attribute__((always_inline)) void update_row(
    __m256 *s, int64_t last_rel, int mask, const float *v, int64_t v_stride, int64_t d8,
    float *m, float *l, float *o) {
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    if (mask) {
        const __m256 lim = _mm256_set1_ps((float)last_rel);
        const __m256 ninf = _mm256_set1_ps(-INFINITY);
        for (int t = 0; t < KT / 8; t++) {
            const __m256 idx = _mm256_add_ps(lane, _mm256_set1_ps(8.0f * t));
            s[t] = _mm256_blendv_ps(s[t], ninf, _mm256_cmp_ps(idx, lim, _CMP_GT_OQ));
        }
    }
    __m256 mx = _mm256_max_ps(_mm256_max_ps(s[0], s[1]), _mm256_max_ps(s[2], s[3]));
    const float tmax = hmax8(mx); /* finite: the tile's first key is visible */
    const float m_new = *m > tmax ? *m : tmax; /* (no fmaxf or expf calls: a call spills
                                                  every vector register) */
    const __m256 mv = _mm256_set1_ps(m_new);
    float p[KT] __attribute__((aligned(32)));
    __m256 sum = _mm256_setzero_ps();
    for (int t = 0; t < KT / 8; t++) {
        const __m256 e = exp256(_mm256_sub_ps(s[t], mv)); /* exp(-inf) = 0 */
        sum = _mm256_add_ps(sum, e);
        _mm256_store_ps(p + 8 * t, e);
    }
    /* 0 on the first tile (m = -inf) */
    const float alpha = _mm256_cvtss_f32(exp256(_mm256_set1_ps(*m - m_new)));
    *l = *l * alpha + hsum8f(sum);
    *m = m_new;
    const __m256 av = _mm256_set1_ps(alpha);
    const int64_t jn = last_rel + 1;
    int64_t c0 = 0;
    for (; c0 + 8 <= d8; c0 += 8) { /* 8 output vectors at a time, in registers */
        __m256 acc[8];
        for (int c = 0; c < 8; c++) acc[c] = _mm256_mul_ps(_mm256_load_ps(o + 8 * (c0 + c)), av);
        for (int64_t j = 0; j < jn; j++) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            const float *vr = v + j * v_stride + 8 * c0;
            for (int c = 0; c < 8; c++)
                acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * c), acc[c]);
        }
        for (int c = 0; c < 8; c++) _mm256_store_ps(o + 8 * (c0 + c), acc[c]);
    }
    for (; c0 < d8; c0++) { /* the rest (head_dim not a multiple of 64), a vector at a time */
        __m256 acc = _mm256_mul_ps(_mm256_load_ps(o + 8 * c0), av);
        for (int64_t j = 0; j < jn; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + j * v_stride + 8 * c0),
                                  acc);
        _mm256_store_ps(o + 8 * c0, acc);
    }
}

/* One work item: queries i0 .. i0 + nq of a sequence (positions relative to its start), the
 * `group` heads of kv head kh. qs: scaled queries (rows = nq * group, row r = query r / group,
 * head r % group), o: their outputs, kt: the transposed key tile; d8 = head_dim / 8. */
static inline __attribute__((always_inline)) void causal_item(
    const float *q, const float *k, const float *v, float *out, int64_t q_stride,
    int64_t k_stride, int64_t v_stride, int64_t out_stride, int64_t start, int64_t i0,
    int64_t nq, int64_t kh, int64_t group, const int64_t d8, float scale, float *qs, float *o,
    float *kt, float *m, float *l) {
    const int64_t d = d8 * 8;
    const int64_t rows = nq * group;
    for (int64_t r = 0; r < rows; r++) {
        const float *src = q + (start + i0 + r / group) * q_stride + (kh * group + r % group) * d;
        for (int64_t c = 0; c < d; c++) qs[r * d + c] = src[c] * scale;
        memset(o + r * d, 0, (size_t)d * sizeof(float));
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    const int64_t n_keys = i0 + nq; /* keys 0 .. the block's last query */
    const float *vh = v + start * v_stride + kh * d;
    for (int64_t j0 = 0; j0 < n_keys; j0 += KT) {
        const int64_t nk = n_keys - j0 < KT ? n_keys - j0 : KT;
        for (int64_t j = 0; j < KT; j++) {
            const float *kr = k + (start + j0 + (j < nk ? j : 0)) * k_stride + kh * d;
            for (int64_t c = 0; c < d; c++) kt[c * KT + j] = kr[c];
        }
        /* rows whose query precedes the tile see none of it; the others, in pairs */
        int64_t r = 0;
        while (r < rows && i0 + r / group < j0) r++;
        for (; r < rows; r += 2) {
            const int64_t rb = r + 1 < rows ? r + 1 : r;
            __m256 sa[KT / 8], sb[KT / 8];
            scores2(qs + r * d, qs + rb * d, kt, d, sa, sb);
            const int64_t qa = i0 + r / group, qb = i0 + rb / group;
            const int64_t la = (qa < j0 + nk - 1 ? qa : j0 + nk - 1) - j0;
            const int64_t lb = (qb < j0 + nk - 1 ? qb : j0 + nk - 1) - j0;
            update_row(sa, la, la < KT - 1, vh + j0 * v_stride, v_stride, d8, m + r, l + r,
                       o + r * d);
            if (rb != r)
                update_row(sb, lb, lb < KT - 1, vh + j0 * v_stride, v_stride, d8, m + rb,
                           l + rb, o + rb * d);
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        float *dst = out + (start + i0 + r / group) * out_stride + (kh * group + r % group) * d;
        const float inv = 1.0f / l[r];
        for (int64_t c = 0; c < d; c++) dst[c] = o[r * d + c] * inv;
    }
}
#endif

int inferhub_causal_attention_f32(const float *q, const float *k, const float *v, float *out,
                                  int64_t q_stride, int64_t k_stride, int64_t v_stride,
                                  int64_t out_stride, const int32_t *starts,
                                  const int32_t *lens, int64_t num_seqs, int64_t num_heads,
                                  int64_t num_kv_heads, int64_t head_dim, float scale,
                                  int num_threads) {
#ifndef HAVE_AVX2
    (void)q, (void)k, (void)v, (void)out, (void)q_stride, (void)k_stride, (void)v_stride;
    (void)out_stride, (void)starts, (void)lens, (void)num_seqs, (void)num_heads;
    (void)num_kv_heads, (void)head_dim, (void)scale, (void)num_threads;
    return 2;
#else
    if (head_dim % 8 != 0 || head_dim > 8 * MAX_D8 || num_heads % num_kv_heads != 0) return 2;
    const int64_t group = num_heads / num_kv_heads;
    /* items: (sequence, query block, kv head), the heaviest (last blocks) handed out first */
    int64_t blocks = 0, max_len = 0;
    for (int64_t s = 0; s < num_seqs; s++) {
        blocks += (lens[s] + BQ - 1) / BQ;
        if (lens[s] > max_len) max_len = lens[s];
    }
    if (blocks == 0) return 0;
    int64_t *item_seq = malloc((size_t)blocks * sizeof(int64_t));
    int64_t *item_blk = malloc((size_t)blocks * sizeof(int64_t));
    if (!item_seq || !item_blk) {
        free(item_seq);
        free(item_blk);
        return 1;
    }
    int64_t n = 0;
    const int64_t max_blocks = (max_len + BQ - 1) / BQ;
    for (int64_t b = max_blocks - 1; b >= 0; b--)
        for (int64_t s = 0; s < num_seqs; s++)
            if (b * BQ < lens[s]) item_seq[n] = s, item_blk[n++] = b;
    const int64_t items = n * num_kv_heads;
    const int64_t d8 = head_dim / 8;
    int failed = 0;
    const int parallel = num_threads > 1 && items > 1;
#pragma omp parallel num_threads(num_threads) if (parallel) reduction(| : failed)
    {
        const size_t rows = (size_t)(BQ * group);
        float *qs = thread_scratch(0, rows * (size_t)head_dim * 2 * sizeof(float) +
                                          (size_t)head_dim * KT * sizeof(float) +
                                          2 * rows * sizeof(float));
        if (!qs) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (failed) continue;
            float *o = qs + rows * (size_t)head_dim;
            float *kt = o + rows * (size_t)head_dim;
            float *m = kt + (size_t)head_dim * KT;
            float *l = m + rows;
            const int64_t s = item_seq[it / num_kv_heads], kh = it % num_kv_heads;
            const int64_t i0 = item_blk[it / num_kv_heads] * BQ;
            const int64_t nq = lens[s] - i0 < BQ ? lens[s] - i0 : BQ;
            if (d8 == 8)
                causal_item(q, k, v, out, q_stride, k_stride, v_stride, out_stride, starts[s],
                            i0, nq, kh, group, 8, scale, qs, o, kt, m, l);
            else if (d8 == 16)
                causal_item(q, k, v, out, q_stride, k_stride, v_stride, out_stride, starts[s],
                            i0, nq, kh, group, 16, scale, qs, o, kt, m, l);
            else
                causal_item(q, k, v, out, q_stride, k_stride, v_stride, out_stride, starts[s],
                            i0, nq, kh, group, d8, scale, qs, o, kt, m, l);
        }
    }
    free(item_seq);
    free(item_blk);
    return failed ? 1 : 0;
#endif
}
