"""Fused Triton kernels for the CUDA path: RMSNorm with the residual add, and rotary embedding
in place. Each replaces a handful of elementwise kernels per layer (and runs in Triton's
interpreter on CPU for tests)."""

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
    row = tl.program_id(0)
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
def _rotary_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_t,
    stride_h,
    stride_c,
    n_heads,
    HALF: tl.constexpr,
    HEADS: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    h = tl.arange(0, HEADS)
    i = tl.arange(0, HALF)
    ok = h[:, None] < n_heads
    cos = tl.load(cos_ptr + pos * stride_c + i)[None, :]  # (1, HALF) float32
    sin = tl.load(sin_ptr + pos * stride_c + i)[None, :]
    base = x_ptr + t * stride_t + h[:, None] * stride_h + i[None, :]
    x1 = tl.load(base, mask=ok, other=0.0)
    x2 = tl.load(base + HALF, mask=ok, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    tl.store(base, (a * cos - b * sin).to(x1.dtype), mask=ok)
    tl.store(base + HALF, (b * cos + a * sin).to(x1.dtype), mask=ok)


def rotary_inplace(
    x: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor
) -> None:
    """Rotate x: (T, H, D) in place (rotate-half layout; the last dim must be contiguous);
    cos_cache/sin_cache: (max_position, D/2) float32."""
    t, h, d = x.shape
    if t == 0:
        return
    _rotary_kernel[(t,)](
        x,
        positions,
        cos_cache,
        sin_cache,
        x.stride(0),
        x.stride(1),
        cos_cache.stride(0),
        h,
        HALF=d // 2,
        HEADS=triton.next_power_of_2(h),
    )
