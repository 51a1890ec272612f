"""RMSNorm, with the residual add fused in (as Hugging Face computes it, in float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inferhub.layers import cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.fused = False  # one fused kernel: Triton on CUDA, C on the CPU (cpu_kernels)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # normalize in float32, cast back, then scale: the rounding of Hugging Face's RMSNorm
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(x + residual), x + residual); the sum is the next residual. The fused
        CPU kernel writes the sum over `residual` (the caller drops the old one)."""
        if self.fused and x.device.type == "cpu":
            return cpu_kernels.rms_norm(x, residual, self.weight, self.eps)
        if self.fused:
            from inferhub.layers.triton_fused import rms_norm

            return rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        return self._norm(x), x
