/* bfloat16 matrix products on AMX tiles (Intel Sapphire Rapids and later), for the CPU.
 *
 * out (M, N) = x (M, K) @ w^T (+ bias), with w (N, K) as nn.Linear stores it. The weight is
 * packed once (inferhub_amx_pack_bf16) into the tile layout the TDPBF16PS instruction reads:
 * for every 16 output columns and every 32 input columns, a 16 x 64-byte tile whose row r
 * holds, for each of the 16 columns, the pair of weights at k = 2r, 2r + 1 ("VNNI" order).
 * A call copies x into tile order, then streams each 32-column panel of weights once per 256
 * rows of x, keeping four 16 x 16 float32 accumulator tiles (32 rows x 32 columns) in the tile
 * registers, and prefetches the next panel while it computes (a decode step reads every
 * weight from DRAM once: the prefetch took 30 layers of SmolLM2's projections from 11 to
 * 16 GB/s at one row, 7.5 to 9.5 at 64).
 *
 * 4-bit weights (inferhub_amx_q4_*): a GGUF Q4_0/Q4_1 matrix kept as the file stores it, a
 * quarter of the bytes, whose bfloat16 weights are rebuilt panel by panel in the same tile
 * layout just before the tiles read them: w = bfloat16(q * d + m) rounded once from float32
 * (q * d is exact), which is exactly what loading the file densely gives (gguf's float32
 * dequantization, then torch's rounding to bfloat16). The tiles then see the same numbers in
 * the same order as the dense kernel's, so both kernels give the same bits.
 *
 * Arithmetic: products of bfloat16 values are exact in float32, sums are float32 (in an order
 * of the hardware's own, as oneDNN's AMX kernels, which torch uses, also have), the bias is
 * added in float32, and the result is rounded to bfloat16 to nearest even, as torch rounds.
 * TDPBF16PS treats subnormal inputs and results as zero.
 *
 * Shapes: K and N multiples of 32 (every projection of the models we serve); any M.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(HAVE_AVX512) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define MC 256 /* rows of x per pass over the weights */

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) tile_config;

/* Ask the kernel for the AMX register state (Linux 5.16+); 0 when granted. */
int inferhub_amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) { /* 0-3: accumulators, 4-5: x rows, 6-7: weights */
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

void inferhub_amx_pack_bf16(const uint16_t *w, int64_t n, int64_t k, uint16_t *packed,
                            int num_threads) {
    /* each tile is a 16 x 16 transpose of (k, k + 1) pairs, copied as 32-bit words */
    const int64_t kb_count = k / 32;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t nb = 0; nb < n / 16; nb++)
        for (int64_t kb = 0; kb < kb_count; kb++) {
            uint16_t *tile = packed + (nb * kb_count + kb) * 512;
            for (int64_t c = 0; c < 16; c++) {
                const uint16_t *src = w + (nb * 16 + c) * k + kb * 32;
                for (int64_t r = 0; r < 16; r++) memcpy(tile + r * 32 + 2 * c, src + 2 * r, 4);
            }
        }
}

/* Round the accumulator tile (16 x 16 float32, `rows` of them real) into out. */
static inline void store_tile(const float *acc, int64_t rows, uint16_t *out, int64_t out_stride,
                              const uint16_t *bias) {
    const __m512 b = bias ? load16(bias, 0, 1) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; r++)
        store16(out + r * out_stride, 0, _mm512_add_ps(_mm512_loadu_ps(acc + r * 16), b), 1);
}

/* Calls of up to this many rows (decode steps) give every thread its own copy of x in tile
 * order, made inside the threads' region: one parallel region (and its barrier) less per
 * call, and no tiles read from the other core's cache (decode steps of 1 and 4 sequences
 * 1.05x faster, of 64 the same, interleaved A/B); larger calls share one copy made by all. */
#define PRIVATE_X_ROWS 64

/* x copied into tile order: for each 32 rows and 32 columns, two 16 x 64-byte tiles
 * (contiguous tile loads; rows past m are zeros and their results dropped). NULL when out of
 * memory. */
static uint16_t *x_tiles(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                         int parallel, int num_threads) {
    const int64_t kb_count = k / 32, mp = (m + 31) / 32 * 32;
    uint16_t *xt = thread_scratch(0, (size_t)(mp * k) * sizeof(uint16_t));
    if (!xt) return NULL;
#pragma omp parallel for num_threads(num_threads) if (parallel) schedule(static)
    for (int64_t mb = 0; mb < mp / 16; mb++)
        for (int64_t kb = 0; kb < kb_count; kb++) {
            uint16_t *tile = xt + (mb * kb_count + kb) * 512;
            for (int64_t r = 0; r < 16; r++) {
                const int64_t row = mb * 16 + r;
                if (row < m)
                    memcpy(tile + r * 32, x + row * x_stride + kb * 32, 64);
                else
                    memset(tile + r * 32, 0, 64);
            }
        }
    return xt;
}

/* A call's x in tile order, shared: made by all threads before their region for calls of
 * more than PRIVATE_X_ROWS rows (*shared NULL and -1 when out of memory); for smaller ones
 * *shared stays NULL and each thread makes its own (thread_x_tiles). */
static int shared_x_tiles(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                          int parallel, int num_threads, const uint16_t **shared) {
    *shared = NULL;
    if ((m + 31) / 32 * 32 <= PRIVATE_X_ROWS) return 0;
    *shared = x_tiles(x, m, k, x_stride, parallel, num_threads);
    return *shared ? 0 : -1;
}

/* Inside the threads' region: the shared copy, or this thread's own (NULL: out of memory). */
static inline const uint16_t *thread_x_tiles(const uint16_t *shared, const uint16_t *x,
                                             int64_t m, int64_t k, int64_t x_stride) {
    return shared ? shared : x_tiles(x, m, k, x_stride, 0, 1);
}

/* Threads split the panels `schedule(guided)`: shrinking runs of consecutive panels, so a
 * thread that runs faster at the moment takes more of them (the cores of a shared VM run at
 * uneven speeds: 9% of a decode step's samples were one thread waiting at the end of a
 * static split; guided runs 3-4% faster per step, interleaved A/B), and a run keeps the
 * next-panel prefetch useful (one panel at a time, `dynamic`, was 9-12% slower: each
 * thread's prefetch brought in a panel that the other then took). */

/* 4-bit storage: per 16 output columns and 32 input columns (one GGUF group), a block of
 * Q4_BLOCK bytes: 16 rows of 16 bytes in the tile's own element order (byte i of row r: low
 * nibble = element i, high nibble = element 16 + i, where element 2c + j is column c's weight
 * at k = 2r + j), then the 16 columns' d and m as float16. A column tile's blocks follow each
 * other along k, and the column tiles follow each other. */
#define Q4_BLOCK 320

/* Rebuild one 16 x 32 bfloat16 tile from its 4-bit block: bfloat16(q * d + m). */
static inline void q4_tile(const uint8_t *blk, uint16_t *tile) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
    const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)));
    /* elements 0..15 of a row are columns 0..7 (two each), 16..31 columns 8..15 */
    const __m512i lo_cols = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i hi_cols = _mm512_add_epi32(lo_cols, _mm512_set1_epi32(8));
    const __m512 d_lo = _mm512_permutexvar_ps(lo_cols, d), d_hi = _mm512_permutexvar_ps(hi_cols, d);
    const __m512 m_lo = _mm512_permutexvar_ps(lo_cols, mn);
    const __m512 m_hi = _mm512_permutexvar_ps(hi_cols, mn);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    for (int r = 0; r < 16; r++) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(blk + 16 * r));
        const __m128i lo = _mm_and_si128(b, nibble);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
        /* one rounding: q * d is exact in float32, the fused add rounds once (as numpy's
         * separate multiply and add do, the product being exact) */
        const __m512 w_lo =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d_lo, m_lo);
        const __m512 w_hi =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d_hi, m_hi);
        _mm512_store_si512((__m512i *)(tile + 32 * r), (__m512i)_mm512_cvtne2ps_pbh(w_hi, w_lo));
    }
}

/* Lines first..last-1 (64 bytes each) from p, towards L1. */
static inline __attribute__((always_inline)) void prefetch_lines(const char *p, int64_t first,
                                                                int64_t last) {
    for (int64_t l = first; l < last; l++) _mm_prefetch(p + 64 * l, _MM_HINT_T0);
}

/* One 32 x 32 block of out: rows mb.. of x (tiles a0, a1) times the 32 columns of panel nb
 * (tiles b0, b1), over all of k. With q4 (the panel's two 4-bit column tiles), b0 and b1 are
 * first rebuilt from it, tile by tile as the loop reaches them; with prefetch, the next
 * `prefetch_bytes` (a multiple of 64) per k step are requested (the next panel, on its way
 * while this one computes), a quarter after each tile product: issued in one burst before
 * the tile loads, they held the loads up (the output projection at 64 rows, interleaved A/B:
 * 0.74x the time spread out, 0.93x at 1 row, 0.78x at 128). */
static inline __attribute__((always_inline)) void block_product(
    const uint16_t *a0, const uint16_t *b0, int64_t kb_count, const uint8_t *q4,
    const char *prefetch, int64_t prefetch_bytes, float acc[4][256]) {
    const uint16_t *a1 = a0 + kb_count * 512, *b1 = b0 + kb_count * 512;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t lines = prefetch_bytes / 64;
    for (int64_t kb = 0; kb < kb_count; kb++) {
        const char *pf = prefetch ? prefetch + kb * prefetch_bytes : NULL;
        if (q4) {
            q4_tile(q4 + kb * Q4_BLOCK, (uint16_t *)b0 + kb * 512);
            q4_tile(q4 + (kb_count + kb) * Q4_BLOCK, (uint16_t *)b1 + kb * 512);
        }
        _tile_loadd(4, a0 + kb * 512, 64);
        _tile_loadd(5, a1 + kb * 512, 64);
        _tile_loadd(6, b0 + kb * 512, 64);
        _tile_loadd(7, b1 + kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (pf) prefetch_lines(pf, 0, lines / 4);
        _tile_dpbf16ps(1, 4, 7);
        if (pf) prefetch_lines(pf, lines / 4, lines / 2);
        _tile_dpbf16ps(2, 5, 6);
        if (pf) prefetch_lines(pf, lines / 2, 3 * lines / 4);
        _tile_dpbf16ps(3, 5, 7);
        if (pf) prefetch_lines(pf, 3 * lines / 4, lines);
    }
    _tile_stored(0, acc[0], 64);
    _tile_stored(1, acc[1], 64);
    _tile_stored(2, acc[2], 64);
    _tile_stored(3, acc[3], 64);
}

/* The block's accumulators (rows mb.. of out, columns nb * 32..), the bias added, rounded. */
static inline void store_block(float acc[4][256], int64_t m, int64_t mb, int64_t n, int64_t nb,
                               const uint16_t *bias, uint16_t *out) {
    const int64_t rows = m - mb < 32 ? m - mb : 32;
    const int64_t top = rows < 16 ? rows : 16, bottom = rows - top;
    uint16_t *o = out + mb * n + nb * 32;
    const uint16_t *bs0 = bias ? bias + nb * 32 : NULL;
    const uint16_t *bs1 = bias ? bias + nb * 32 + 16 : NULL;
    store_tile(acc[0], top, o, n, bs0);
    store_tile(acc[1], top, o + 16, n, bs1);
    if (bottom > 0) {
        store_tile(acc[2], bottom, o + 16 * n, n, bs0);
        store_tile(acc[3], bottom, o + 16 * n + 16, n, bs1);
    }
}

int inferhub_amx_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                             const uint16_t *packed, int64_t n, const uint16_t *bias,
                             uint16_t *out, int num_threads) {
    if (k % 32 || n % 32) return -2;
    const int64_t kb_count = k / 32, nblocks = n / 32, mp = (m + 31) / 32 * 32;
    /* Threads split the output columns; a few hundred microseconds of work at the least. */
    const int parallel = num_threads > 1 && mp * n * k >= (int64_t)1 << 22;
    const uint16_t *shared_xt;
    if (shared_x_tiles(x, m, k, x_stride, parallel, num_threads, &shared_xt)) return -1;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
        const uint16_t *xt = thread_x_tiles(shared_xt, x, m, k, x_stride);
        if (!xt) {
#pragma omp atomic write
            failed = 1;
        }
        configure_tiles();
        float acc[4][256] __attribute__((aligned(64)));
        for (int64_t m0 = 0; m0 < mp; m0 += MC) {
            const int64_t m1 = m0 + MC < mp ? m0 + MC : mp;
#pragma omp for schedule(guided)
            for (int64_t nb = 0; nb < nblocks; nb++) {
                if (!xt) continue;
                const uint16_t *b0 = packed + (2 * nb) * kb_count * 512;
                /* the passes over the panel bring the next one in, a share each (2 KB per
                 * k step in one pass was 1.18x slower at 64 rows than 1 KB in each of two) */
                const int64_t passes = (m1 - m0) / 32, share = (2048 / passes + 63) / 64 * 64;
                for (int64_t mb = m0; mb < m1; mb += 32) {
                    const char *next =
                        nb + 1 < nblocks ? (const char *)(b0 + 2 * kb_count * 512) +
                                               (mb - m0) / 32 * share * kb_count
                                         : NULL;
                    block_product(xt + (mb / 16) * kb_count * 512, b0, kb_count, NULL, next,
                                  share, acc);
                    store_block(acc, m, mb, n, nb, bias, out);
                }
            }
        }
        _tile_release();
    }
    return failed ? -1 : 0;
}

void inferhub_amx_q4_pack(const uint8_t *q, const float *d, const float *mn, int64_t n,
                          int64_t k, uint8_t *packed) {
    const int64_t kb_count = k / 32;
    for (int64_t t = 0; t < n / 16; t++)
        for (int64_t kb = 0; kb < kb_count; kb++) {
            uint8_t *blk = packed + (t * kb_count + kb) * Q4_BLOCK;
            for (int64_t r = 0; r < 16; r++)
                for (int64_t i = 0; i < 16; i++) {
                    /* elements i and 16 + i of tile row r: column e / 2, k = 2r + e % 2 */
                    const int64_t e0 = i, e1 = 16 + i;
                    const uint8_t v0 = q[(t * 16 + e0 / 2) * k + kb * 32 + 2 * r + e0 % 2];
                    const uint8_t v1 = q[(t * 16 + e1 / 2) * k + kb * 32 + 2 * r + e1 % 2];
                    blk[16 * r + i] = (uint8_t)((v0 & 15) | (v1 & 15) << 4);
                }
            uint16_t *dh = (uint16_t *)(blk + 256), *mh = (uint16_t *)(blk + 288);
            for (int64_t c = 0; c < 16; c++) {
                dh[c] = _cvtss_sh(d[(t * 16 + c) * kb_count + kb], _MM_FROUND_TO_NEAREST_INT);
                mh[c] = _cvtss_sh(mn[(t * 16 + c) * kb_count + kb], _MM_FROUND_TO_NEAREST_INT);
            }
        }
}

int inferhub_amx_q4_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                                const uint8_t *packed, int64_t n, const uint16_t *bias,
                                uint16_t *out, int num_threads) {
    if (k % 32 || n % 32) return -2;
    const int64_t kb_count = k / 32, nblocks = n / 32, mp = (m + 31) / 32 * 32;
    const int64_t panel = 2 * kb_count * Q4_BLOCK; /* bytes of 4-bit weights per panel */
    const int parallel = num_threads > 1 && mp * n * k >= (int64_t)1 << 20;
    const uint16_t *shared_xt;
    if (shared_x_tiles(x, m, k, x_stride, parallel, num_threads, &shared_xt)) return -1;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
        const uint16_t *xt = thread_x_tiles(shared_xt, x, m, k, x_stride);
        /* the panel's rebuilt bfloat16 tiles: 2 KB per k step, in L1/L2 (allocated before
         * the tiles are configured: no library call between that and the tile code) */
        uint16_t *bt = xt ? thread_scratch(1, (size_t)kb_count * 2048) : NULL;
        if (!bt) {
#pragma omp atomic write
            failed = 1;
        }
        configure_tiles();
        float acc[4][256] __attribute__((aligned(64)));
#pragma omp for schedule(guided)
        for (int64_t nb = 0; nb < nblocks; nb++) {
            if (!bt) continue;
            const uint8_t *q4 = packed + nb * panel;
            for (int64_t mb = 0; mb < mp; mb += 32) {
                /* the first pass rebuilds the panel (and fetches the next), the others reuse it */
                const int first = mb == 0;
                const char *next = first && nb + 1 < nblocks ? (const char *)(q4 + panel) : NULL;
                block_product(xt + (mb / 16) * kb_count * 512, bt, kb_count, first ? q4 : NULL,
                              next, 2 * Q4_BLOCK, acc);
                store_block(acc, m, mb, n, nb, bias, out);
            }
        }
        _tile_release();
    }
    return failed ? -1 : 0;
}

#else /* no AMX here: the engine keeps torch's matrix products */
int inferhub_amx_init(void) { return -1; }
void inferhub_amx_pack_bf16(const uint16_t *w, int64_t n, int64_t k, uint16_t *packed,
                            int num_threads) {
    (void)w, (void)n, (void)k, (void)packed, (void)num_threads;
}
int inferhub_amx_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                             const uint16_t *packed, int64_t n, const uint16_t *bias,
                             uint16_t *out, int num_threads) {
    (void)x, (void)m, (void)k, (void)x_stride, (void)packed, (void)n, (void)bias, (void)out,
        (void)num_threads;
    return -3;
}
void inferhub_amx_q4_pack(const uint8_t *q, const float *d, const float *mn, int64_t n,
                          int64_t k, uint8_t *packed) {
    (void)q, (void)d, (void)mn, (void)n, (void)k, (void)packed;
}
int inferhub_amx_q4_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                                const uint8_t *packed, int64_t n, const uint16_t *bias,
                                uint16_t *out, int num_threads) {
    (void)x, (void)m, (void)k, (void)x_stride, (void)packed, (void)n, (void)bias, (void)out,
        (void)num_threads;
    return -3;
}
#endif
