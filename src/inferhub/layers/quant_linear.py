"""Weight-only 4-bit (and 8-bit output) linear layers for the CPU.

A decode step of a small batch is bound by reading the weights: at batch 1 a bfloat16 matrix
product reads 2 bytes per weight, a 4-bit one about 0.6. GGUF files already store most
weights in 4-bit groups (Q4_0, Q4_1: 32 weights share a scale and an offset), so those are kept
exactly as the file has them (`Int4Weight.from_gguf`), not re-quantized. Other weights can be
quantized on load (`Int4Weight.quantize`, asymmetric min/max per group of 32: lossy, opt-in).

Large batches are compute-bound, and there torch's bfloat16 GEMM is faster than the 4-bit
kernel, so an `Int4Linear` keeps the dense weight too and picks the kernel per call by the
number of rows (`max_rows`).

Kernels: for bfloat16 inputs on a CPU with AVX512-BF16, the C kernels of
csrc/lowbit_gemv.c (16 output columns per vector, exact products, float32 sums; about
1.1-1.3x torch's int4pack kernel over a decode step's 30 layers, 1.3-1.8x its int8 one on
SmolLM2's output projection); for float32 inputs on a CPU with AVX2 (no AVX-512 needed), a
GGUF file's own blocks through csrc/lowbit_avx2.c, which rebuilds the file's dense float32
weights exactly (so it serves by default, like the AMX tiles); otherwise torch's
`_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from inferhub.layers import cpu_kernels
from inferhub.layers.amx_linear import amx_supported, dense_forward

GROUP = 32  # weights per scale/offset group (GGUF's QK4_0 / QK4_1)
# At or below this many rows a call uses the 4-bit kernel; above it the dense weight.
# Measured on a 2-core AVX-512 CPU, SmolLM2-135M, bf16: decode 1.35-1.58x faster at 1-4
# sequences, 1.09x at 8, even at 12, 0.92x at 16 (docs/benchmarks.md).
DEFAULT_MAX_ROWS = 8
# The same switch when AMX tiles read the file's 4 bits for the larger calls (interleaved step
# A/B, same machine: the 4-bit kernel 1.69x faster at 1 sequence, 1.11x at 4, the tiles 1.06x
# at 5, 1.14x at 6 and 1.6x at 8).
TILES_MAX_ROWS = 4
# A row limit that no call reaches: the kernel takes every call, prefill included.
ALL_ROWS = 1 << 62
# The same switch for the exact float32 kernel on AVX2 (csrc/lowbit_avx2.c). Measured on a
# 2-core AMD EPYC (Zen 3), SmolLM2-135M's shapes against torch's float32 GEMV/GEMM (MKL):
# 2.2-2.5x faster at 1 row, 2-2.8x at 4-6, 1.2-1.6x at 16, 1.2-1.7x at 64, 1.1-1.5x at 128,
# and 0.91-1.16x (1.07x over the four shapes together) at 256-2048 rows, where both run near
# the cores' float32 FMA rate; prefill steps took 0.95x the time on it (interleaved A/B). So
# on AVX2 it takes every call, and the dense float32 copy of those weights is released after
# loading (Int4Linear.release_dense). With AVX-512, torch's float32 GEMM is twice as wide as
# this AVX2 kernel (not measured against it): there the kernel keeps to calls of GEMV size,
# where reading 4 bits a weight instead of 32 decides.
_AVX512 = "avx512f" in cpu_kernels._cpu_signature().split()
F32_MAX_ROWS = 8 if _AVX512 else ALL_ROWS


@dataclass
class Int4Weight:
    """Unpacked 4-bit weights of an (N, K) matrix: w = (q - 8) * scale + zero, per group.

    `offset`, for weights read from a GGUF file, is the file's own per-group term in the
    form its dequantization computes, w = q * scale + offset in float32 with one rounding (the
    minimum m of Q4_1, -8 * d for Q4_0): with it, the AMX kernel rebuilds exactly the bfloat16
    weights that loading the file densely gives. None for weights quantized here."""

    q: torch.Tensor  # (N, K) uint8, values 0..15
    scale: torch.Tensor  # (N, K // GROUP) float32
    zero: torch.Tensor  # (N, K // GROUP) float32
    offset: torch.Tensor | None = None  # (N, K // GROUP) float32

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        q = self.q.to(torch.float32).reshape(n, k // GROUP, GROUP) - 8.0
        return (q * self.scale[..., None] + self.zero[..., None]).reshape(n, k)

    def permute_rows(self, index: np.ndarray) -> Int4Weight:
        idx = torch.from_numpy(np.ascontiguousarray(index))
        offset = None if self.offset is None else self.offset[idx]
        return Int4Weight(self.q[idx], self.scale[idx], self.zero[idx], offset)

    @staticmethod
    def cat(parts: Sequence[Int4Weight]) -> Int4Weight:
        """Stack along the output rows (fused q/k/v or gate/up projections)."""
        offsets = [p.offset for p in parts if p.offset is not None]
        return Int4Weight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
            torch.cat(offsets) if len(offsets) == len(parts) else None,
        )

    @staticmethod
    def quantize(w: torch.Tensor) -> Int4Weight:
        """Asymmetric min/max quantization of a float matrix, GROUP weights per scale."""
        n, k = w.shape
        if k % GROUP:
            raise ValueError(f"cannot quantize a matrix of {k} columns in groups of {GROUP}")
        g = w.detach().to(torch.float32).reshape(n, k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-10)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        return Int4Weight(q.reshape(n, k), scale, lo + 8 * scale)

    @staticmethod
    def from_gguf(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> Int4Weight:
        """The blocks of a Q4_0 or Q4_1 tensor, bit for bit (ggml-quants.c's layout).

        A Q4_0 block is a float16 scale d and 16 bytes of nibbles: w = d * (q - 8).
        A Q4_1 block is d, a float16 minimum m and 16 bytes: w = d * q + m. The low nibbles
        of the 16 bytes are weights 0..15 of the block, the high nibbles weights 16..31.
        """
        n, k = shape
        header = {"Q4_0": 2, "Q4_1": 4}[qtype]
        blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // GROUP, header + 16)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[..., header:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, k)
        if qtype == "Q4_0":
            zero = np.zeros_like(d)
            offset = -8 * d  # exact: a float16 times 8
        else:
            offset = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
            zero = offset + 8 * d
        return Int4Weight(
            torch.from_numpy(q),
            torch.from_numpy(d),
            torch.from_numpy(zero),
            torch.from_numpy(offset),
        )


@dataclass
class PackedQ4F32:
    """A projection's GGUF Q4_0/Q4_1 blocks already in the exact float32 kernel's layout
    (cpu_kernels.q4f32_pack), with no unpacked or dense copy: what a lean load keeps (0.625
    bytes a weight) for a layer whose kernel will take every call."""

    packed: torch.Tensor
    shape: tuple[int, int]  # (N, K) of the dense weight

    @staticmethod
    def pack(weight: Int4Weight) -> PackedQ4F32:
        """Raises ValueError when the kernel cannot take these blocks (a scale or offset
        that float16 does not hold, or a shape not in whole tasks)."""
        if weight.offset is None:
            raise ValueError("only a GGUF file's own blocks rebuild the dense weights exactly")
        return PackedQ4F32(
            cpu_kernels.q4f32_pack(weight.q, weight.scale, weight.offset), weight.shape
        )


# The output projection (vocabulary x hidden, the largest matrix of a small model) in 8 bits
# for calls of at most this many rows: 1.8 ms instead of 6.4 ms for SmolLM2's 49k x 576 at one
# row, still faster at 4, slower at 8.
INT8_MAX_ROWS = 4


def int4_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


class _LowBitLinear(nn.Module):
    """A linear layer that runs calls of at most `max_rows` rows on a low-bit copy of its
    weight and larger ones on the dense weight.

    `weight` and `bias` are the dense layer's own parameters (same names, so checkpoints,
    tied embeddings and `named_parameters` see no difference); the low-bit copy is a buffer.
    """

    bits: int
    amx_packed: torch.Tensor | None

    def __init__(self, linear: nn.Linear, max_rows: int) -> None:
        super().__init__()
        self.register_buffer("amx_packed", None, persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_rows = max_rows
        self.weight = linear.weight
        self.bias = linear.bias

    def _small(self, x: torch.Tensor) -> torch.Tensor | None:
        """The low-bit product of a small call, bias included, or None to use the dense
        weight."""
        raise NotImplementedError

    def use_amx(self) -> None:
        """Run the larger calls on an AMX-packed copy of the dense weight (amx_linear.py)."""
        self.amx_packed = cpu_kernels.amx_pack_bf16(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._small(x.contiguous()) if x.dim() == 2 and x.shape[0] <= self.max_rows else None
        return self._dense(x) if y is None else y

    @property
    def exact(self) -> bool:
        """Whether the low-bit kernel gives the dense weight's products (it rebuilds a GGUF
        file's own dense weights from their blocks), so that it may serve every call."""
        return False

    @property
    def dense_released(self) -> bool:
        """True once the dense weight is gone (release_dense): every call is the kernel's."""
        return self.weight.numel() == 0 and self.in_features * self.out_features > 0

    def release_dense(self) -> None:
        """Free the dense weight: for a layer whose exact kernel takes calls of any number of
        rows in the model's dtype, that copy is never read again. Calls the kernel cannot take
        then fail with a clear error instead of computing something else."""
        if not self.exact:
            raise ValueError("the dense weight serves the calls of a lossy kernel's layer")
        if self.max_rows < ALL_ROWS:
            raise ValueError(f"the dense weight serves calls above {self.max_rows} rows")
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        self._check_dense(x)
        return dense_forward(x, self.weight, self.bias, self.amx_packed)

    def _check_dense(self, x: torch.Tensor) -> None:
        if self.dense_released:
            raise RuntimeError(
                f"{type(self).__name__} {self.out_features}x{self.in_features}: its dense "
                f"weight was released, and its kernel takes 2-D float32 inputs, not "
                f"{x.dtype} {tuple(x.shape)}"
            )

    def _with_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        rows = "every call" if self.max_rows >= ALL_ROWS else f"up to {self.max_rows} rows"
        dense = ", dense weight released" if self.dense_released else ""
        return f"in={self.in_features}, out={self.out_features}, {self.bits}-bit {rows}{dense}"


class Int4Linear(_LowBitLinear):
    """Small calls on packed 4-bit weights (the C kernel for bfloat16 where it runs, else
    torch's int4pack kernel), large ones dense.

    With a GGUF file's own 4-bit weights (`Int4Weight.offset` set), bfloat16 and AMX tiles,
    the dense calls of at most AMX_MAX_ROWS rows also read the 4-bit copy: the AMX kernel
    rebuilds the exact bfloat16 weights panel by panel (the same bits as the dense product,
    a quarter of the bytes to read). max_rows = 0 keeps only that use of the 4-bit weights."""

    bits = 4
    packed: torch.Tensor | None  # torch's int4pack layout
    scales_zeros: torch.Tensor | None
    q4: torch.Tensor | None  # cpu_kernels.q4_pack's layout
    amx_q4: torch.Tensor | None  # cpu_kernels.amx_q4_pack's layout
    q4f32: torch.Tensor | None  # cpu_kernels.q4f32_pack's layout (exact, float32)

    def __init__(
        self,
        linear: nn.Linear,
        weight: Int4Weight | PackedQ4F32,
        max_rows: int,
        tiles: bool = True,
        exact_rows: int = 0,
    ) -> None:
        """max_rows: the small calls' limit on a lossy 4-bit kernel (0: none); exact_rows:
        the limit on the float32 AVX2 kernel, which gives the dense weights' products from a
        file's own blocks (0: not that kernel). One of the two applies, the exact one first.
        A PackedQ4F32 weight is for that kernel only (exact_rows > 0, float32)."""
        n, k = weight.shape
        if (linear.out_features, linear.in_features) != (n, k):
            raise ValueError(
                f"4-bit weight of shape {(n, k)} for a linear layer of shape "
                f"{(linear.out_features, linear.in_features)}"
            )
        super().__init__(linear, max_rows)
        dtype, device = linear.weight.dtype, linear.weight.device
        for name in ("packed", "scales_zeros", "q4", "amx_q4", "q4f32"):
            self.register_buffer(name, None, persistent=False)
        if isinstance(weight, PackedQ4F32):
            if exact_rows <= 0 or dtype != torch.float32 or device.type != "cpu":
                raise ValueError("packed float32 4-bit weights run on the exact kernel only")
            self.q4f32 = weight.packed
            self.max_rows = exact_rows
            return
        if tiles and weight.offset is not None and amx_supported(linear.weight):
            try:
                self.amx_q4 = cpu_kernels.amx_q4_pack(weight.q, weight.scale, weight.offset)
            except ValueError:  # scales that float16 cannot hold: the dense weight serves
                self.amx_q4 = None
        if (
            exact_rows > 0
            and dtype == torch.float32
            and device.type == "cpu"
            and weight.offset is not None
            and n % 16 == 0
            and cpu_kernels.q4f32_available()
        ):
            try:
                self.q4f32 = PackedQ4F32.pack(weight).packed
                self.max_rows = exact_rows
                return
            except ValueError:  # scales float16 does not hold: not the file's own blocks
                pass
        if max_rows <= 0:
            self.max_rows = 0
            return
        if (
            dtype == torch.bfloat16
            and device.type == "cpu"
            and n % 64 == 0
            and cpu_kernels.lowbit_available()
        ):
            self.q4 = cpu_kernels.q4_pack(weight.q, weight.scale, weight.zero)
            return
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32), 1)
        # The kernel takes (K // GROUP, N, 2): scale and zero of each group, in the input dtype.
        scales_zeros = torch.stack([weight.scale.t(), weight.zero.t()], dim=-1).contiguous()
        self.packed = packed.to(device)
        self.scales_zeros = scales_zeros.to(device, dtype)

    @property
    def exact(self) -> bool:
        return self.q4f32 is not None

    def use_amx(self) -> None:
        if self.amx_q4 is None:  # with the 4-bit tiles, a packed dense copy would go unused
            super().use_amx()

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx_q4 is None:
            return super()._dense(x)
        self._check_dense(x)
        kernel = cpu_kernels.amx_q4_linear_bf16
        return dense_forward(x, self.weight, self.bias, self.amx_q4, kernel=kernel)

    def _small(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.q4f32 is not None:
            if x.dtype != torch.float32:
                return None
            return cpu_kernels.q4f32_linear(x, self.q4f32, self.out_features, self.bias)
        if self.q4 is not None:
            if x.dtype != torch.bfloat16:
                return None
            return cpu_kernels.q4_linear_bf16(x, self.q4, self.out_features, self.bias)
        if self.packed is None or self.scales_zeros is None:
            return None
        # the torch.* binding: about 3 us less per call than torch.ops.aten's packet
        y = torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)
        return self._with_bias(y)

    def extra_repr(self) -> str:
        tiles = ", 4-bit AMX tiles" if self.amx_q4 is not None else ""
        return super().extra_repr() + tiles


# Calls of up to this many rows on ExactQ8Linear's kernel. Measured on a 2-core AMD EPYC
# (Zen 3), SmolLM2-135M's output projection (49152 x 576) against torch's float32 product:
# 8.4-9.2x faster at 1 row, 3.0x at 16, 1.8x at 64, 1.3x at 128 and 256, so every call on
# AVX2 (with AVX-512: as F32_MAX_ROWS).
EXACT_Q8_MAX_ROWS = 8 if _AVX512 else ALL_ROWS


def q8_0_blocks(raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks of a GGUF Q8_0 tensor, bit for bit: (q (N, K) int8, d (N, K // 32) float32
    holding the file's float16 scales); w = d * q. A block is d (float16) and 32 int8."""
    n, k = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // GROUP, 2 + GROUP)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[..., 2:].copy().view(np.int8).reshape(n, k)
    return torch.from_numpy(q), torch.from_numpy(d)


@dataclass
class PackedQ8F32:
    """A GGUF file's Q8_0 blocks (w = d * q) of a matrix, or of a fused projection's parts
    stacked by rows, in the exact float32 8-bit kernel's layout (cpu_kernels.q8f32_pack)."""

    packed: torch.Tensor
    shape: tuple[int, int]  # (N, K) of the dense weight

    @staticmethod
    def pack(q: torch.Tensor, scale: torch.Tensor) -> PackedQ8F32:
        """q (N, K) int8, scale (N, K // 32) float32 holding float16 numbers; raises
        ValueError when the kernel cannot take them."""
        n, k = q.shape
        return PackedQ8F32(cpu_kernels.q8f32_pack(q, scale), (int(n), int(k)))


class ExactQ8Linear(_LowBitLinear):
    """float32 calls of up to max_rows rows on a GGUF file's own Q8_0 blocks (w = d * q,
    exact in float32) through csrc/lowbit_avx2.c, which rebuilds the dense weights exactly
    (AVX2: a quarter of the bytes a float32 weight reads); larger ones dense. The output
    projection of a Q8_0 file, and a lean load's Q8_0 projections."""

    bits = 8
    q8f32: torch.Tensor

    def __init__(
        self, linear: nn.Linear, weight: PackedQ8F32, max_rows: int = EXACT_Q8_MAX_ROWS
    ) -> None:
        if weight.shape != (linear.out_features, linear.in_features):
            raise ValueError(
                f"8-bit weight of shape {weight.shape} for a linear layer of shape "
                f"{(linear.out_features, linear.in_features)}"
            )
        super().__init__(linear, max_rows)
        self.register_buffer("q8f32", weight.packed, persistent=False)

    @property
    def exact(self) -> bool:
        return True

    def _small(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.dtype != torch.float32:
            return None
        return cpu_kernels.q8f32_linear(x, self.q8f32, self.out_features, self.bias)


class Int8Linear(_LowBitLinear):
    """Small calls on 8-bit weights (one scale per output row), large ones dense.

    For bfloat16 models only (torch's int8pack kernel is fast for bfloat16 inputs): there the
    dense weight is already rounded to 8 significant bits, and 8-bit rows err about as much.
    """

    bits = 8
    q: torch.Tensor
    scale: torch.Tensor
    q8: torch.Tensor | None  # cpu_kernels.q8_pack's layout of q, when that kernel runs here
    scale32: torch.Tensor | None

    def __init__(self, linear: nn.Linear, max_rows: int = INT8_MAX_ROWS) -> None:
        if linear.weight.dtype != torch.bfloat16 or linear.weight.device.type != "cpu":
            raise ValueError("8-bit weights are for bfloat16 models on the CPU")
        super().__init__(linear, max_rows)
        w = linear.weight.detach().to(torch.float32)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)
        self.register_buffer("q8", None, persistent=False)
        self.register_buffer("scale32", None, persistent=False)
        if self.out_features % 16 == 0 and cpu_kernels.lowbit_available():
            # the C kernel, with the same bfloat16-rounded scales torch's kernel uses
            self.q8 = cpu_kernels.q8_pack(q)
            self.scale32 = self.scale.to(torch.float32)
            q = q[:0]  # the row-major copy is not needed
        self.register_buffer("q", q, persistent=False)

    def _small(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.dtype != torch.bfloat16:
            return None
        if self.q8 is not None and self.scale32 is not None:
            return cpu_kernels.q8_linear_bf16(
                x, self.q8, self.scale32, self.out_features, self.bias
            )
        return self._with_bias(torch._weight_int8pack_mm(x, self.q, self.scale))
