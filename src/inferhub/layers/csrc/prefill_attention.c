/* Causal attention of first prefill chunks over their own keys and values, for the CPU
 * (float32, AVX2/FMA).
 *
 * Each sequence's new tokens attend to the tokens before them in the same chunk (a chunk that
 * starts at position 0: its context is exactly its own keys). Work items are (sequence, kv
 * head, block of BQ queries); the query heads that share the kv head (GQA) are processed
 * together, so each key and value row is read once per item. For each tile of KT keys the
 * keys are transposed once into a (head_dim, KT) tile; then query rows, two at a time, compute
 * their KT scores (broadcast query element times a key-tile row; both rows share each loaded
 * vector), an online softmax each, and add p . V into their output rows (again sharing each
 * loaded V vector). Keys past a row's position are masked (the tiles on the diagonal); tiles
 * wholly past the block's last query are never read.
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
#define KT 32     /* keys per tile (scores2 and softmax_row take 32) */
#define MAX_D8 32 /* head_dim up to 256 */

#ifdef HAVE_AVX2
/* Scores of query rows qa and qb against the KT keys of the transposed tile kt (eight
 * independent accumulator chains keep both FMA pipes busy). */
static inline __attribute__((always_inline)) void scores2(const float *qa, const float *qb,
                                                          const float *kt, int64_t d,
                                                          __m256 *sa, __m256 *sb) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t c = 0; c < d; c++) {
        const __m256 xa = _mm256_broadcast_ss(qa + c), xb = _mm256_broadcast_ss(qb + c);
        const float *row = kt + c * KT;
        __m256 k0 = _mm256_load_ps(row), k1 = _mm256_load_ps(row + 8);
        __m256 k2 = _mm256_load_ps(row + 16), k3 = _mm256_load_ps(row + 24);
        /* loaded once for both rows: without this gcc folds each load into both FMAs */
        __asm__("" : "+x"(k0), "+x"(k1), "+x"(k2), "+x"(k3));
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

/* The online-softmax step of one row with its KT scores s (keys past last_rel masked when
 * `mask`): updates its max m and sum l, writes p (the tile's weights, 0 where masked) and
 * returns the factor its output row must be scaled by. */
static inline __attribute__((always_inline)) float softmax_row(__m256 *s, int64_t last_rel,
                                                               int mask, float *m, float *l,
                                                               float *p) {
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
    __m256 sum = _mm256_setzero_ps();
    for (int t = 0; t < KT / 8; t++) {
        const __m256 e = exp256(_mm256_sub_ps(s[t], mv)); /* exp(-inf) = 0 */
        sum = _mm256_add_ps(sum, e);
        _mm256_store_ps(p + 8 * t, e);
    }
    /* 0 on the first tile (m = -inf) */
    const float alpha = _mm256_cvtss_f32(exp256(_mm256_set1_ps(*m - m_new)));
    *l = *l * alpha + hsum8(sum);
    *m = m_new;
    return alpha;
}

/* Output rows oa, ob (head_dim = 8 * d8) scaled by their alphas, plus p . V over keys
 * 0 .. jn of the tile (rows of v, v_stride apart); both rows share each loaded V vector. */
static inline __attribute__((always_inline)) void pv2(const float *pa, const float *pb,
                                                      float alpha_a, float alpha_b, float *oa,
                                                      float *ob, const float *v,
                                                      int64_t v_stride, int64_t jn,
                                                      int64_t d8) {
    const __m256 aa = _mm256_set1_ps(alpha_a), ab = _mm256_set1_ps(alpha_b);
    int64_t c0 = 0;
    for (; c0 + 4 <= d8; c0 += 4) { /* 4 vectors of each row in registers */
        __m256 xa[4], xb[4];
        for (int c = 0; c < 4; c++) {
            xa[c] = _mm256_mul_ps(_mm256_load_ps(oa + 8 * (c0 + c)), aa);
            xb[c] = _mm256_mul_ps(_mm256_load_ps(ob + 8 * (c0 + c)), ab);
        }
        for (int64_t j = 0; j < jn; j++) {
            const __m256 wa = _mm256_broadcast_ss(pa + j), wb = _mm256_broadcast_ss(pb + j);
            const float *vr = v + j * v_stride + 8 * c0;
            for (int c = 0; c < 4; c++) {
                __m256 vv = _mm256_loadu_ps(vr + 8 * c);
                __asm__("" : "+x"(vv)); /* one load for both rows */
                xa[c] = _mm256_fmadd_ps(wa, vv, xa[c]);
                xb[c] = _mm256_fmadd_ps(wb, vv, xb[c]);
            }
        }
        for (int c = 0; c < 4; c++) {
            _mm256_store_ps(oa + 8 * (c0 + c), xa[c]);
            _mm256_store_ps(ob + 8 * (c0 + c), xb[c]);
        }
    }
    for (; c0 < d8; c0++) { /* the rest (head_dim not a multiple of 32), a vector at a time */
        __m256 xa = _mm256_mul_ps(_mm256_load_ps(oa + 8 * c0), aa);
        __m256 xb = _mm256_mul_ps(_mm256_load_ps(ob + 8 * c0), ab);
        for (int64_t j = 0; j < jn; j++) {
            const __m256 vv = _mm256_loadu_ps(v + j * v_stride + 8 * c0);
            xa = _mm256_fmadd_ps(_mm256_broadcast_ss(pa + j), vv, xa);
            xb = _mm256_fmadd_ps(_mm256_broadcast_ss(pb + j), vv, xb);
        }
        _mm256_store_ps(oa + 8 * c0, xa);
        _mm256_store_ps(ob + 8 * c0, xb);
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
            float pa[KT] __attribute__((aligned(32))), pb[KT] __attribute__((aligned(32)));
            const float alpha_a = softmax_row(sa, la, la < KT - 1, m + r, l + r, pa);
            float alpha_b = 1.0f, *ob = o + rows * d; /* odd last row: a spare twin row */
            if (rb != r) {
                alpha_b = softmax_row(sb, lb, lb < KT - 1, m + rb, l + rb, pb);
                ob = o + rb * d;
            } else {
                memset(pb, 0, sizeof pb);
            }
            /* keys past a row's last have p = 0, so the pair takes the longer of the two */
            pv2(pa, pb, alpha_a, alpha_b, o + r * d, ob, vh + j0 * v_stride, v_stride,
                (la > lb ? la : lb) + 1, d8);
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
        /* qs (rows), o (rows and a spare), kt, m, l */
        float *qs = thread_scratch(0, (rows * 2 + 1) * (size_t)head_dim * sizeof(float) +
                                          (size_t)head_dim * KT * sizeof(float) +
                                          2 * rows * sizeof(float));
        if (!qs) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (failed) continue;
            float *o = qs + rows * (size_t)head_dim;
            float *kt = o + (rows + 1) * (size_t)head_dim;
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
