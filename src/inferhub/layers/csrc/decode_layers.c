/* Every decoder layer of a decode step in one call, for a model whose projections run on
 * 4-bit weights: in bfloat16, the 4-bit kernel of lowbit_gemv.c (small batches with
 * weight_quant auto, the single stream's path) or the AMX tiles that rebuild a GGUF file's
 * bfloat16 weights from its 4 bits (amx_gemm.c: decode batches up to 384 sequences, whatever
 * weight_quant says); in float32, the AVX2 kernel of lowbit_avx2.c that rebuilds a GGUF
 * file's float32 weights (small batches, whatever weight_quant says), or its 8-bit twin on a
 * Q8_0 file's projections.
 *
 * A decode token of SmolLM2 makes about 300 calls into C per step through Python (norms,
 * projections, rotary, cache writes, attention, activation), each paying the interpreter,
 * ctypes and a fresh tensor: about 3 ms of a 12 ms step. Here the same kernels run in the
 * same order on the same inputs, so the result is bit for bit the Python path's; only the
 * trips back to Python are gone.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int inferhub_add_rms_norm(const void *x, const void *residual, const void *weight, void *out,
                          void *res_out, int64_t rows, int64_t hidden, int64_t x_stride,
                          float eps, int dtype, int num_threads);
int inferhub_rotary_inplace(void *qk, const int64_t *positions, const float *cos_cache,
                            const float *sin_cache, int64_t tokens, int64_t heads,
                            int64_t head_dim, int64_t token_stride, int dtype, int num_threads);
int inferhub_silu_and_mul(const void *gate_up, void *out, int64_t rows, int64_t inter,
                          int dtype, int num_threads);
int inferhub_write_kv(const void *k, const void *v, void *k_cache, void *v_cache,
                      const int64_t *slots, int64_t tokens, int64_t width, int64_t k_stride,
                      int64_t v_stride, int dtype);
int inferhub_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                                    const int32_t *block_tables, const int32_t *context_lens,
                                    void *out, int64_t q_stride, int64_t num_seqs,
                                    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                    int64_t max_blocks, int64_t block_size, float scale,
                                    int dtype, int num_threads);
int inferhub_q4_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                            const uint8_t *packed, int64_t n, const uint16_t *bias,
                            uint16_t *out, int num_threads);
int inferhub_amx_q4_linear_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t x_stride,
                                const uint8_t *packed, int64_t n, const uint16_t *bias,
                                uint16_t *out, int num_threads);
int inferhub_q4f32_linear(const float *x, int64_t m, int64_t k, int64_t x_stride,
                          const uint8_t *packed, int64_t n, const float *bias, float *out,
                          int num_threads);
int inferhub_q8f32_linear(const float *x, int64_t m, int64_t k, int64_t x_stride,
                          const uint8_t *packed, int64_t n, const float *bias, float *out,
                          int num_threads);

/* Which low-bit kernel the weight table is packed for. */
enum { KERNEL_Q4_BF16 = 0, KERNEL_AMX_Q4 = 1, KERNEL_Q4_F32 = 2, KERNEL_Q8_F32 = 3 };

static int linear(int kernel, const void *x, int64_t m, int64_t k, int64_t x_stride,
                  const uint8_t *packed, int64_t n, const void *bias, void *out,
                  int num_threads) {
    switch (kernel) {
    case KERNEL_Q4_BF16:
        return inferhub_q4_linear_bf16(x, m, k, x_stride, packed, n, bias, out, num_threads);
    case KERNEL_AMX_Q4:
        return inferhub_amx_q4_linear_bf16(x, m, k, x_stride, packed, n, bias, out,
                                           num_threads);
    case KERNEL_Q4_F32:
        return inferhub_q4f32_linear(x, m, k, x_stride, packed, n, bias, out, num_threads);
    case KERNEL_Q8_F32:
        return inferhub_q8f32_linear(x, m, k, x_stride, packed, n, bias, out, num_threads);
    default:
        return -3;
    }
}

/* Per layer, LAYER_PTRS addresses in `weights`: qkv, qkv bias (0: none), o, gate_up, down
 * (packed for `kernel`: KERNEL_Q4_BF16 lowbit_gemv.c's, KERNEL_AMX_Q4 the AMX tiles',
 * KERNEL_Q4_F32 / KERNEL_Q8_F32 lowbit_avx2.c's 4-/8-bit), input and post-attention norm
 * weights (the model's dtype: float32 for the float32 kernels, else bfloat16); in `caches`:
 * the layer's key and value cache. */
#define LAYER_PTRS 7
enum { W_QKV, W_QKV_BIAS, W_O, W_GATE_UP, W_DOWN, W_LN1, W_LN2 };

/* x (m, hidden): the embeddings, in; out (m, hidden): the final norm's output. Returns 0, or
 * the first kernel's error code (-1: no memory). */
int inferhub_decode_q4_layers(const void *x, void *out, int64_t m,
                              const int64_t *weights, const int64_t *caches,
                              const void *final_norm, int64_t num_layers, int64_t hidden,
                              int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                              int64_t inter, float eps, float scale, const int64_t *positions,
                              const int64_t *slots, const int32_t *block_tables,
                              const int32_t *context_lens, int64_t max_blocks,
                              int64_t block_size, const float *cos_cache,
                              const float *sin_cache, int kernel, int num_threads) {
    const int dtype = kernel == KERNEL_Q4_F32 || kernel == KERNEL_Q8_F32 ? 0 : 1; /* 0: f32 */
    const size_t elem = dtype == 1 ? sizeof(uint16_t) : sizeof(float);
    const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
    const int64_t qkv_n = q_size + 2 * kv_size;
    const int64_t width = hidden * 3 + qkv_n + q_size + 3 * inter;
    char *buf = malloc((size_t)(m * width) * elem);
    if (!buf) return -1;
    char *res = buf, *h = res + m * hidden * elem, *hn = h + m * hidden * elem;
    char *qkv = hn + m * hidden * elem, *attn = qkv + m * qkv_n * elem;
    char *gu = attn + m * q_size * elem, *act = gu + m * 2 * inter * elem;
    int rc = 0;
    for (int64_t l = 0; l < num_layers && rc == 0; l++) {
        const int64_t *w = weights + l * LAYER_PTRS;
        const void *ln1 = (const void *)w[W_LN1], *ln2 = (const void *)w[W_LN2];
        if (l == 0) {
            inferhub_add_rms_norm(x, NULL, ln1, hn, NULL, m, hidden, hidden, eps, dtype,
                                  num_threads);
            memcpy(res, x, (size_t)(m * hidden) * elem);
        } else {
            inferhub_add_rms_norm(h, res, ln1, hn, res, m, hidden, hidden, eps, dtype,
                                  num_threads);
        }
        rc = linear(kernel, hn, m, hidden, hidden, (const uint8_t *)w[W_QKV], qkv_n,
                    (const void *)w[W_QKV_BIAS], qkv, num_threads);
        if (rc) break;
        inferhub_rotary_inplace(qkv, positions, cos_cache, sin_cache, m,
                                num_heads + num_kv_heads, head_dim, qkv_n, dtype, num_threads);
        void *k_cache = (void *)caches[2 * l], *v_cache = (void *)caches[2 * l + 1];
        inferhub_write_kv(qkv + q_size * elem, qkv + (q_size + kv_size) * elem, k_cache,
                          v_cache, slots, m, kv_size, qkv_n, qkv_n, dtype);
        rc = inferhub_paged_decode_attention(qkv, k_cache, v_cache, block_tables, context_lens,
                                             attn, qkv_n, m, num_heads, num_kv_heads, head_dim,
                                             max_blocks, block_size, scale, dtype,
                                             num_threads);
        if (rc) break;
        rc = linear(kernel, attn, m, q_size, q_size, (const uint8_t *)w[W_O], hidden, NULL, h,
                    num_threads);
        if (rc) break;
        inferhub_add_rms_norm(h, res, ln2, hn, res, m, hidden, hidden, eps, dtype, num_threads);
        rc = linear(kernel, hn, m, hidden, hidden, (const uint8_t *)w[W_GATE_UP], 2 * inter,
                    NULL, gu, num_threads);
        if (rc) break;
        inferhub_silu_and_mul(gu, act, m, inter, dtype, num_threads);
        rc = linear(kernel, act, m, inter, inter, (const uint8_t *)w[W_DOWN], hidden, NULL, h,
                    num_threads);
    }
    if (rc == 0)
        inferhub_add_rms_norm(h, res, final_norm, out, res, m, hidden, hidden, eps, dtype,
                              num_threads);
    free(buf);
    return rc;
}
