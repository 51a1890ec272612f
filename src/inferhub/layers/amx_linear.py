"""Dense bfloat16 projections on AMX tiles, for CPUs that have them (csrc/amx_gemm.c).

torch's bfloat16 `F.linear` on the CPU (oneDNN) reaches about 500 GFLOP/s on a decode step's
shapes (64 rows of SmolLM2), neither the tiles' compute nor the memory's bandwidth. The AMX
kernel reads weights packed once at load in the tiles' own layout and was 1.3-2.4x faster per
projection from 1 to 384 rows on this project's CPU, even at 512 rows and slower beyond
(docs/benchmarks.md), so calls of more than `AMX_MAX_ROWS` rows (prefill chunks) stay on
`F.linear`. The packed copy costs as much memory as the weight it packs.

The arithmetic is the same kind as torch's: bf16 products in float32, float32 sums (in the
hardware's order), one rounding to bfloat16; the tiles treat subnormal inputs and results as
zero. Anything but a 2-D bfloat16 input of the weight's width goes to `F.linear`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from inferhub.layers import cpu_kernels

AMX_MAX_ROWS = 384


def amx_supported(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return (
        weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and n % 32 == 0
        and k % 32 == 0
        and cpu_kernels.amx_available()
    )


def dense_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None,
    max_rows: int = AMX_MAX_ROWS,
    kernel: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """x @ weight^T + bias: on the packed AMX copy when there is one and the call is small.
    `kernel` reads `packed` (default: cpu_kernels.amx_linear_bf16, a packed bfloat16 copy;
    the 4-bit layers pass amx_q4_linear_bf16 with the file's blocks)."""
    if (
        packed is not None
        and x.dim() == 2
        and x.shape[0] <= max_rows
        and x.dtype == torch.bfloat16
        and x.shape[1] == weight.shape[1]
    ):
        run = kernel or cpu_kernels.amx_linear_bf16
        return run(x, packed, weight.shape[0], bias)
    return F.linear(x, weight, bias)


class AmxLinear(nn.Module):
    """nn.Linear whose calls of at most `max_rows` rows run on AMX tiles.

    `weight` and `bias` are the wrapped layer's own parameters (tied embeddings keep working);
    the packed copy is a non-persistent buffer."""

    packed: torch.Tensor

    def __init__(self, linear: nn.Linear, max_rows: int = AMX_MAX_ROWS) -> None:
        super().__init__()
        if not amx_supported(linear.weight):
            raise ValueError("AMX tiles are not usable for this layer here")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rows = max_rows
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("packed", cpu_kernels.amx_pack_bf16(linear.weight), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_forward(x, self.weight, self.bias, self.packed, self.max_rows)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, AMX up to {self.max_rows} rows"
