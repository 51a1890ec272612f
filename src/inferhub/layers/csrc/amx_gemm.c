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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(HAVE_AVX512)
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

int inferhub_amx_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                             const uint16_t *packed, int64_t n, const uint16_t *bias,
                             uint16_t *out, int num_threads) {
    if (k % 32 || n % 32) return -2;
    const int64_t kb_count = k / 32, nblocks = n / 32;
    /* x copied into tile order: for each 32 rows and 32 columns, two 16 x 64-byte tiles
     * (contiguous tile loads; rows past m are zeros and their results dropped) */
    const int64_t mp = (m + 31) / 32 * 32;
    uint16_t *xt = thread_scratch((size_t)(mp * k) * sizeof(uint16_t));
    if (!xt) return -1;
    const int parallel = num_threads > 1 && mp * n * k >= (int64_t)1 << 22;
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
    /* Threads split the output columns; a few hundred microseconds of work at the least. */
#pragma omp parallel num_threads(num_threads) if (parallel)
    {
        configure_tiles();
        float acc[4][256] __attribute__((aligned(64)));
        for (int64_t m0 = 0; m0 < mp; m0 += MC) {
            const int64_t m1 = m0 + MC < mp ? m0 + MC : mp;
#pragma omp for schedule(static)
            for (int64_t nb = 0; nb < nblocks; nb++) {
                const uint16_t *b0 = packed + (2 * nb) * kb_count * 512;
                const uint16_t *b1 = b0 + kb_count * 512;
                for (int64_t mb = m0; mb < m1; mb += 32) {
                    const uint16_t *a0 = xt + (mb / 16) * kb_count * 512;
                    const uint16_t *a1 = a0 + kb_count * 512;
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int64_t kb = 0; kb < kb_count; kb++) {
                        if (mb == m0 && nb + 1 < nblocks) {
                            /* the next panel's weights on their way while this one computes */
                            const char *nx = (const char *)(b1 + kb_count * 512 + kb * 512);
                            for (int64_t off = 0; off < 1024; off += 64) {
                                _mm_prefetch(nx + off, _MM_HINT_T0);
                                _mm_prefetch(nx + kb_count * 1024 + off, _MM_HINT_T0);
                            }
                        }
                        _tile_loadd(4, a0 + kb * 512, 64);
                        _tile_loadd(5, a1 + kb * 512, 64);
                        _tile_loadd(6, b0 + kb * 512, 64);
                        _tile_loadd(7, b1 + kb * 512, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                    _tile_stored(0, acc[0], 64);
                    _tile_stored(1, acc[1], 64);
                    _tile_stored(2, acc[2], 64);
                    _tile_stored(3, acc[3], 64);
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
            }
        }
        _tile_release();
    }
    return 0;
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
#endif
