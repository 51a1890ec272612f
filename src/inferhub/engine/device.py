"""Which device, dtype and attention backend an engine runs with when asked for "auto"."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name in table:
        if table[name] is torch.float16 and device.type == "cpu":
            raise ValueError("float16 is only supported on CUDA; use bfloat16 or float32 on CPU")
        if table[name] is torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16():
            log.warning(
                "bfloat16 on a CPU without AVX512-BF16 or AMX: torch's bfloat16 products run "
                "several times slower than float32 here (dtype auto picks float32)"
            )
        return table[name]
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name != "auto":
        if name not in ("torch", "sdpa", "cpu", "triton"):
            raise ValueError(f"unknown attention backend {name!r}")
        if name == "cpu" and (device.type != "cpu" or cpu_backend(dtype) != "cpu"):
            raise ValueError(
                "the cpu attention backend needs the CPU, float32 or bfloat16, and a C "
                "compiler to build its kernel"
            )
        return name
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            return "sdpa"
    return cpu_backend(dtype)


def cpu_backend(dtype: torch.dtype) -> str:
    """The C decode kernel where it builds and handles the dtype, else torch's SDPA."""
    from inferhub.layers import cpu_kernels

    if cpu_kernels.supports(dtype) and cpu_kernels.library() is not None:
        return "cpu"
    return "sdpa"
