/* Helpers shared by the CPU kernels: scalar bfloat16 conversions, AVX-512 ones (HAVE_AVX512
 * is defined when those exist) and an AVX2 exp (HAVE_AVX2). */
#ifndef INFERHUB_SIMD_H
#define INFERHUB_SIMD_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A 64-byte aligned buffer of at least `bytes` for the calling thread, kept between calls (a
 * fresh one per call would come from mmap, page faults included, past glibc's 128 KB
 * threshold). NULL when out of memory. Each thread has SCRATCH_SLOTS of them per source file:
 * a kernel that needs two buffers at once takes slots 0 and 1. */
#define SCRATCH_SLOTS 2
static inline void *thread_scratch(int slot, size_t bytes) {
    static __thread void *buf[SCRATCH_SLOTS];
    static __thread size_t cap[SCRATCH_SLOTS];
    if (bytes > cap[slot]) {
        free(buf[slot]);
        cap[slot] = (bytes + 4095) / 4096 * 4096;
        buf[slot] = aligned_alloc(64, cap[slot]);
        if (!buf[slot]) cap[slot] = 0;
    }
    return buf[slot];
}

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch does; NaN stays NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_AVX512 1

/* 16 values of the row at element `index` as float32 lanes. */
static inline __attribute__((always_inline)) __m512 load16(const void *src, int64_t index,
                                                           int dtype) {
    if (dtype == 1) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)src + index));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)src + index);
}

/* exp(x) = 2^n * e^g with |g| <= ln(2)/2, Taylor to degree 7 (relative error < 1e-7);
 * +inf above about 88.7, 0 below about -100. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 g = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The bfloat16 bit patterns (in the low half of each 32-bit lane) of 16 floats, rounded to
 * nearest even as torch rounds; NaN stays NaN. */
static inline __m512i bf16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    r = _mm512_srli_epi32(r, 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_mask_mov_epi32(r, nan, quiet);
}

/* v as the dtype would store it, back in float32 lanes (bfloat16: rounded). */
static inline __m512 round16(__m512 v, int dtype) {
    if (dtype != 1) return v;
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
}

static inline __attribute__((always_inline)) void store16(void *dst, int64_t index, __m512 v,
                                                          int dtype) {
    if (dtype == 1)
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + index),
                            _mm512_cvtepi32_epi16(bf16_bits(v)));
    else
        _mm512_storeu_ps((float *)dst + index, v);
}
#endif /* __AVX512F__ */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1

/* exp(x) as exp512 computes it (2^n * e^g, |g| <= ln(2)/2, Taylor to degree 7), 8 lanes:
 * +inf above about 88.7, 0 below -87 (no subnormal results). */
static inline __m256 exp256(__m256 x) {
    const __m256 big = _mm256_cmp_ps(x, _mm256_set1_ps(88.72f), _CMP_GT_OQ);
    const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 g = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.69314718055994531f));
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, g, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 r = _mm256_andnot_ps(small, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
    return _mm256_blendv_ps(r, _mm256_set1_ps(__builtin_inff()), big);
}
/* The sum and the maximum of the 8 lanes. */
static inline float hsum8(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

static inline float hmax8(__m256 v) {
    const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}
#endif /* __AVX2__ && __FMA__ */
#endif /* INFERHUB_SIMD_H */
