"""Fused Triton kernels for the CUDA path: RMSNorm with the residual add, rotary embedding in
place with the layer's KV-cache writes, and SiLU-and-multiply. Each replaces a handful of
elementwise kernels per layer (and runs in Triton's interpreter on CPU for tests)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def _rms_norm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2^31
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like a bf16 add
        tl.store(res_out_ptr + row * stride_o + cols, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype)
    tl.store(out_ptr + row * stride_o + cols, out, mask=ok)


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (norm(x + residual) * weight, x + residual) for x, residual: (T, D)."""
    t, d = x.shape
    out = torch.empty((t, d), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else x
    if t == 0:
        return out, res_out
    _rms_norm_kernel[(t,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        res_out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        d,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(d),
    )
    return out, res_out


@triton.jit  # type: ignore[untyped-decorator]
def _rotary_cache_kernel(  # type: ignore[no-untyped-def]
    qk_ptr,
    v_ptr,
    pos_ptr,
    slot_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_t,
    stride_h,
    stride_vt,
    stride_vh,
    stride_c,
    stride_cs,
    stride_ch,
    n_heads,
    n_q_heads,
    n_kv_heads,
    HALF: tl.constexpr,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
):
    """Token t: rotate its q and k heads in place, and write its rotated k and its v into the
    KV cache at its slot."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS)
    i = tl.arange(0, HALF)
    ok = h[:, None] < n_heads
    cos = tl.load(cos_ptr + pos * stride_c + i)[None, :]  # (1, HALF) float32
    sin = tl.load(sin_ptr + pos * stride_c + i)[None, :]
    base = qk_ptr + t * stride_t + h[:, None] * stride_h + i[None, :]
    x1 = tl.load(base, mask=ok, other=0.0)
    x2 = tl.load(base + HALF, mask=ok, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    r1 = (a * cos - b * sin).to(x1.dtype)
    r2 = (b * cos + a * sin).to(x1.dtype)
    tl.store(base, r1, mask=ok)
    tl.store(base + HALF, r2, mask=ok)
    is_k = ok & (h[:, None] >= n_q_heads)
    k_dst = k_cache_ptr + slot * stride_cs + (h - n_q_heads)[:, None] * stride_ch + i[None, :]
    tl.store(k_dst, r1.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_dst + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    kv = tl.arange(0, KV_HEADS)
    dd = tl.arange(0, 2 * HALF)
    kv_ok = kv[:, None] < n_kv_heads
    v = tl.load(v_ptr + t * stride_vt + kv[:, None] * stride_vh + dd[None, :], mask=kv_ok)
    v_dst = v_cache_ptr + slot * stride_cs + kv[:, None] * stride_ch + dd[None, :]
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=kv_ok)


def rotary_and_cache(
    qk: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """Rotate qk: (T, H + Hkv, D) in place (the last Hkv heads are the keys) and write the
    rotated keys and v: (T, Hkv, D) into the caches (slots, Hkv, D) at `slots` (T,): the
    rotary kernel and the two cache writes of a layer in one launch."""
    t, heads, d = qk.shape
    hkv = v.shape[1]
    if t == 0:
        return
    assert qk.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    _rotary_cache_kernel[(t,)](
        qk,
        v,
        positions,
        slots,
        cos_cache,
        sin_cache,
        k_cache,
        v_cache,
        qk.stride(0),
        qk.stride(1),
        v.stride(0),
        v.stride(1),
        cos_cache.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        heads,
        heads - hkv,
        hkv,
        HALF=d // 2,
        HEADS=triton.next_power_of_2(heads),
        KV_HEADS=triton.next_power_of_2(hkv),
    )


@triton.jit  # type: ignore[untyped-decorator]
def _silu_and_mul_kernel(  # type: ignore[no-untyped-def]
    x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 in large batches
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    # rounded as torch computes F.silu(gate) * up: silu in float32, cast, then the product
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    out = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)
    tl.store(out_ptr + row * stride_o + cols, out, mask=ok)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up: (T, 2I) -> (T, I), one launch instead of two."""
    t, two_i = gate_up.shape
    n = two_i // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    assert gate_up.stride(1) == 1
    block = 1024
    _silu_and_mul_kernel[(t, triton.cdiv(n, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block
    )
    return out
