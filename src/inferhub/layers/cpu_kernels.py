"""CPU kernels written in C (csrc/), compiled on first use and called through ctypes.

The shared library is built with the system C compiler (`cc -O3 -march=native -fopenmp`)
into a cache folder keyed by the source, the flags, the compiler and the CPU, so a machine
builds it once (about a second). The build goes to a temporary name and is renamed into
place, so processes that start together never load a half-written file. Without a compiler,
or if the build fails, `library()` returns None and the engine keeps its pure-torch paths.

OpenMP: the library links `libgomp.so.1`, the runtime that torch's wheel already loaded into
the process, so the kernels share torch's thread pool instead of starting a second one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = (
    "paged_attention.c",
    "elementwise.c",
    "amx_gemm.c",
    "lowbit_gemv.c",
    "lowbit_avx2.c",
    "decode_layers.c",
    "prefill_attention.c",
)
HEADERS = ("simd.h",)
# No FMA contraction: the elementwise kernels reproduce torch's float32 rounding step by step.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=off")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def cache_dir() -> Path:
    env = os.environ.get("INFERHUB_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inferhub" / "kernels"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(compiler: str) -> Path:
    src_dir = Path(__file__).parent / "csrc"
    sources = [src_dir / name for name in SOURCES]
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    key = hashlib.sha256()
    headers = [src_dir / name for name in HEADERS]
    for part in (*[p.read_bytes() for p in sources + headers], " ".join(FLAGS).encode()):
        key.update(part)
    key.update(version.encode())
    key.update(_cpu_signature().encode())
    out = cache_dir() / f"inferhub_cpu_{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-o", tmp, *map(str, sources), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built here (logged once)."""
    if os.environ.get("INFERHUB_DISABLE_CPU_KERNELS"):
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler found: CPU attention falls back to torch (slower)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError) as exc:
        log.warning("CPU kernels unavailable, falling back to torch: %s", exc)
        return None
    ptr, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    signatures = {
        "inferhub_paged_decode_attention": [ptr] * 6 + [i64] * 7 + [f32, i32, i32],
        "inferhub_add_rms_norm": [ptr] * 5 + [i64] * 3 + [f32, i32, i32],
        "inferhub_rotary_inplace": [ptr] * 4 + [i64] * 4 + [i32, i32],
        "inferhub_silu_and_mul": [ptr] * 2 + [i64] * 2 + [i32, i32],
        "inferhub_write_kv": [ptr] * 5 + [i64] * 4 + [i32],
        "inferhub_argmax_rows": [ptr] + [i64] * 3 + [i32, ptr, i32],
        "inferhub_causal_attention_f32": [ptr] * 4 + [i64] * 4 + [ptr] * 2 + [i64] * 4 + [f32, i32],
    }
    signatures["inferhub_amx_init"] = []
    signatures["inferhub_amx_linear_bf16"] = [ptr] + [i64] * 3 + [ptr, i64, ptr, ptr, i32]
    signatures["inferhub_amx_q4_linear_bf16"] = signatures["inferhub_amx_linear_bf16"]
    signatures["inferhub_q4_linear_bf16"] = [ptr] + [i64] * 3 + [ptr, i64, ptr, ptr, i32]
    signatures["inferhub_q8_linear_bf16"] = [ptr] + [i64] * 3 + [ptr] * 2 + [i64, ptr, ptr, i32]
    signatures["inferhub_q4f32_linear"] = signatures["inferhub_q4_linear_bf16"]
    signatures["inferhub_q8f32_linear"] = signatures["inferhub_q4_linear_bf16"]
    signatures["inferhub_decode_q4_layers"] = (
        [ptr, ptr, i64, ptr, ptr, ptr] + [i64] * 6 + [f32, f32] + [ptr] * 4 + [i64] * 2
    ) + [ptr, ptr, i32, i32]
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    lib.inferhub_amx_pack_bf16.argtypes = [ptr, i64, i64, ptr, i32]
    lib.inferhub_amx_pack_bf16.restype = None
    lib.inferhub_amx_q4_pack.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    lib.inferhub_amx_q4_pack.restype = None
    lib.inferhub_q4_pack.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    lib.inferhub_q4_pack.restype = None
    lib.inferhub_q8_pack.argtypes = [ptr, i64, i64, ptr]
    lib.inferhub_q8_pack.restype = None
    lib.inferhub_q4f32_pack.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    lib.inferhub_q4f32_pack.restype = None
    lib.inferhub_q8f32_pack.argtypes = [ptr, ptr, i64, i64, ptr]
    lib.inferhub_q8f32_pack.restype = None
    return lib


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available")
    return lib


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DTYPES


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bounds: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """Causal attention of first prefill chunks over their own keys (csrc/prefill_attention.c).
    q: (N, H, D), k, v: (N, Hkv, D), float32, rows strided (heads D apart, D contiguous);
    bounds: (2, S) int32, each sequence's first row and its number of rows. Returns (N, H, D),
    or None where the kernel does not run (not float32, no AVX2 build, odd shapes)."""
    lib = library()
    n, h, d = q.shape
    ok = (
        lib is not None
        and q.dtype == k.dtype == v.dtype == torch.float32
        and all(t.stride(2) == 1 and t.stride(1) == d for t in (q, k, v))
        and bounds.dtype == torch.int32
        and bounds.is_contiguous()
    )
    if not ok or lib is None:
        return None
    out = torch.empty(n, h, d, dtype=torch.float32)
    rc = lib.inferhub_causal_attention_f32(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        q.stride(0),
        k.stride(0),
        v.stride(0),
        out.stride(0),
        bounds[0].data_ptr(),
        bounds[1].data_ptr(),
        bounds.shape[1],
        h,
        k.shape[1],
        d,
        scale,
        torch.get_num_threads(),
    )
    if rc == 1:
        raise MemoryError("causal_attention: out of memory")
    return out if rc == 0 else None


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q: (B, H, D), one decode token per sequence, each token's heads contiguous (a view into
    the fused qkv output is fine); caches: (num_slots, Hkv, D) contiguous; block_tables:
    (B, max_blocks) int32; context_lens: (B,) int32. Returns (B, H, D).

    The wrappers here check only what the C code cannot survive (they run about 200 times
    per decode step: each check costs as much as the kernel for a small batch)."""
    assert block_tables.dtype == context_lens.dtype == torch.int32 and q.dtype == k_cache.dtype
    b, h, d = q.shape
    if q.stride(2) != 1 or q.stride(1) != d:
        q = q.contiguous()
    out = torch.empty(b, h, d, dtype=q.dtype)
    rc = _lib().inferhub_paged_decode_attention(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        out.data_ptr(),
        q.stride(0),
        b,
        h,
        k_cache.shape[1],
        d,
        block_tables.shape[1],
        block_size,
        scale,
        _DTYPES[q.dtype],
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("paged decode attention could not allocate its scratch buffers")
    return out


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual) for x: (T, hidden), as RMSNorm.forward,
    except that the sum is written over `residual` (the model drops the old residual; this
    saves an allocation per call)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    t, hidden = x.shape
    assert weight.dtype == x.dtype
    out = torch.empty(t, hidden, dtype=x.dtype)
    if residual is not None:
        assert residual.dtype == x.dtype and residual.shape == x.shape
        residual = residual.contiguous()
    _lib().inferhub_add_rms_norm(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        None if residual is None else residual.data_ptr(),
        t,
        hidden,
        x.stride(0),
        eps,
        _DTYPES[x.dtype],
        torch.get_num_threads(),
    )
    return out, (x if residual is None else residual)


def rotary_inplace(
    qk: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor
) -> None:
    """Rotate qk: (T, heads, D) in place; its heads must be contiguous within a token (a view
    into the fused qkv output is fine). cos/sin caches: (max_pos, D / 2) float32."""
    t, heads, d = qk.shape
    assert qk.stride(2) == 1 and qk.stride(1) == d and cos_cache.dtype == torch.float32
    if positions.dtype != torch.int64:
        positions = positions.to(torch.int64)
    _lib().inferhub_rotary_inplace(
        qk.data_ptr(),
        positions.data_ptr(),
        cos_cache.data_ptr(),
        sin_cache.data_ptr(),
        t,
        heads,
        d,
        qk.stride(0),
        _DTYPES[qk.dtype],
        torch.get_num_threads(),
    )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up: (T, 2 * I) = [gate | up]; returns (T, I)."""
    gate_up = gate_up.contiguous()
    t, width = gate_up.shape
    out = torch.empty(t, width // 2, dtype=gate_up.dtype)
    _lib().inferhub_silu_and_mul(
        gate_up.data_ptr(),
        out.data_ptr(),
        t,
        width // 2,
        _DTYPES[gate_up.dtype],
        torch.get_num_threads(),
    )
    return out


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v: (T, Hkv, D) with each token's heads contiguous; caches (num_slots, Hkv, D)."""
    t, hkv, d = k.shape
    assert k.stride(1) == d and k.stride(2) == 1 and v.stride(1) == d and v.stride(2) == 1
    assert k.dtype == k_cache.dtype and slot_mapping.dtype == torch.int64
    _lib().inferhub_write_kv(
        k.data_ptr(),
        v.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slot_mapping.data_ptr(),
        t,
        hkv * d,
        k.stride(0),
        v.stride(0),
        _DTYPES[k.dtype],
    )


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum of (rows, cols) logits, the first one on ties, NaN counted
    as the largest: `logits.max(dim=-1).indices`, in one pass of vector maxima per row."""
    rows, cols = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(rows, dtype=torch.int64)
    _lib().inferhub_argmax_rows(
        logits.data_ptr(),
        rows,
        cols,
        logits.stride(0),
        _DTYPES[logits.dtype],
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


@functools.cache
def amx_available() -> bool:
    """bfloat16 AMX tiles usable here: the CPU has them, the kernels were built with them and
    the OS granted this process the tile state. INFERHUB_DISABLE_AMX=1 turns them off."""
    if os.environ.get("INFERHUB_DISABLE_AMX"):
        return False
    lib = library()
    if lib is None or "amx_bf16" not in _cpu_signature().split():
        return False
    return bool(lib.inferhub_amx_init() == 0)


def amx_pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """An (N, K) bfloat16 weight in the AMX tile layout amx_linear_bf16 reads; N and K
    multiples of 32."""
    n, k = weight.shape
    if not amx_available():
        raise RuntimeError("AMX tiles are not available here")
    if weight.dtype != torch.bfloat16 or n % 32 or k % 32:
        raise ValueError(
            f"AMX packing needs a bfloat16 weight with both sides multiples of 32, "
            f"not {weight.dtype} {tuple(weight.shape)}"
        )
    weight = weight.detach().contiguous()
    packed = torch.empty(n * k, dtype=torch.bfloat16)
    _lib().inferhub_amx_pack_bf16(
        weight.data_ptr(), n, k, packed.data_ptr(), torch.get_num_threads()
    )
    return packed


def amx_linear_bf16(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (M, K) bfloat16 @ the packed (N, K) weight^T (+ bias): (M, N), as F.linear."""
    if not amx_available():  # the tile state is granted per process: never run without it
        raise RuntimeError("AMX tiles are not available here")
    return _linear(_lib().inferhub_amx_linear_bf16, "AMX", x, (packed,), n, bias)


def amx_q4_pack(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """4-bit weights w = bfloat16(q * scale + offset) (q: (N, K) uint8 0..15; scale, offset:
    (N, K // 32), one per group of 32, float16 values as GGUF stores them) in the layout
    amx_q4_linear_bf16 reads. N and K multiples of 32."""
    n, k = q.shape
    if not amx_available():
        raise RuntimeError("AMX tiles are not available here")
    if q.dtype != torch.uint8 or n % 32 or k % 32 or scale.shape != (n, k // 32):
        raise ValueError(f"4-bit AMX packing needs (32i, 32j) uint8 values, not {q.dtype} {(n, k)}")
    scale = scale.to(torch.float32).contiguous()
    offset = offset.to(torch.float32).contiguous()
    for name, t in (("scale", scale), ("offset", offset)):
        if not torch.equal(t.to(torch.float16).to(torch.float32), t):
            raise ValueError(f"4-bit AMX packing keeps the {name}s in float16, and these are not")
    q = q.contiguous()
    packed = torch.empty(n * k * 5 // 8, dtype=torch.uint8)  # 0.5 byte + 2 x fp16 / 32
    _lib().inferhub_amx_q4_pack(
        q.data_ptr(), scale.data_ptr(), offset.data_ptr(), n, k, packed.data_ptr()
    )
    return packed


def amx_q4_linear_bf16(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (M, K) bfloat16 @ the amx_q4_pack'ed (N, K) weight^T (+ bias): (M, N), the same bits
    as amx_linear_bf16 on the bfloat16 weight bfloat16(q * scale + offset)."""
    if not amx_available():
        raise RuntimeError("AMX tiles are not available here")
    return _linear(_lib().inferhub_amx_q4_linear_bf16, "4-bit AMX", x, (packed,), n, bias)


def _linear(
    fn: Callable[..., int],
    what: str,
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    n: int,
    bias: torch.Tensor | None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Call one of the C matrix products, which all take (x, m, k, x's row stride, the
    weight's buffers, n, bias or NULL, out, threads) and return 0 or an error code; x, bias
    and out in `dtype`."""
    if x.dtype != dtype:
        raise TypeError(f"the {what} kernel takes {dtype} inputs, not {x.dtype}")
    if bias is not None and (bias.dtype != dtype or bias.numel() != n):
        raise TypeError(
            f"the {what} kernel takes a bias of {n} {dtype}, not {bias.dtype} {bias.shape}"
        )
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, n, dtype=dtype)
    if m == 0:  # nothing to compute (and no scratch buffer to ask the kernels for)
        return out
    rc = fn(
        x.data_ptr(),
        m,
        k,
        x.stride(0),
        *[w.data_ptr() for w in weights],
        n,
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"{what} matrix product failed (code {rc})")
    return out


@functools.cache
def lowbit_available() -> bool:
    """The 4-bit and 8-bit kernels of csrc/lowbit_gemv.c run here (AVX512-BF16)."""
    flags = _cpu_signature().split()
    return library() is not None and "avx512_bf16" in flags and "avx512bw" in flags


def q4_pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """4-bit weights w = (q - 8) * scale + zero (q: (N, K) uint8 0..15; scale, zero: (N,
    K // 32) float32) in q4_linear_bf16's layout. N % 64 == 0, K % 32 == 0. The layout keeps
    each group's scale and minimum (zero - 8 * scale) as float16, as GGUF's Q4_0/Q4_1 store
    them (exact for those; a float16 rounding of weights quantized otherwise)."""
    n, k = q.shape
    if n % 64 or k % 32 or q.dtype != torch.uint8:
        raise ValueError(f"4-bit packing needs (64i, 32j) uint8 values, not {q.dtype} {(n, k)}")
    q = q.contiguous()
    scale = scale.to(torch.float32).contiguous()
    zero = zero.to(torch.float32).contiguous()
    packed = torch.empty(n * k * 5 // 8, dtype=torch.uint8)  # 0.5 byte + 2 x fp16 / 32
    _lib().inferhub_q4_pack(
        q.data_ptr(), scale.data_ptr(), zero.data_ptr(), n, k, packed.data_ptr()
    )
    return packed


def q4_linear_bf16(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (M, K) bfloat16 @ the q4_pack'ed (N, K) weight^T (+ bias): (M, N) bfloat16."""
    return _linear(_lib().inferhub_q4_linear_bf16, "4-bit", x, (packed,), n, bias)


@functools.cache
def q4f32_available() -> bool:
    """The float32 4-bit kernel of csrc/lowbit_avx2.c runs here (AVX2, FMA and F16C)."""
    flags = _cpu_signature().split()
    return library() is not None and all(f in flags for f in ("avx2", "fma", "f16c"))


def q4f32_pack(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """A GGUF file's 4-bit weights w = q * scale + offset (q: (N, K) uint8 0..15; scale,
    offset: (N, K // 32) float32, each a float16 number as the file stores them) in
    q4f32_linear's layout. N % 16 == 0, K % 32 == 0. Raises ValueError when a scale or offset
    is not a float16 number (the kernel would not rebuild the dense weights exactly)."""
    n, k = q.shape
    if n % 16 or k % 32 or q.dtype != torch.uint8:
        raise ValueError(f"4-bit packing needs (16i, 32j) uint8 values, not {q.dtype} {(n, k)}")
    d = scale.to(torch.float32).contiguous()
    m = offset.to(torch.float32).contiguous()
    d16, m16 = d.to(torch.float16), m.to(torch.float16)
    if not (torch.equal(d16.to(torch.float32), d) and torch.equal(m16.to(torch.float32), m)):
        raise ValueError("4-bit scales or offsets that float16 does not hold exactly")
    q = q.contiguous()
    packed = torch.empty(n * k * 5 // 8, dtype=torch.uint8)  # 0.5 byte + 2 x fp16 / 32
    _lib().inferhub_q4f32_pack(
        q.data_ptr(), d16.data_ptr(), m16.data_ptr(), n, k, packed.data_ptr()
    )
    return packed


def q4f32_linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (M, K) float32 @ the q4f32_pack'ed (N, K) weight^T (+ bias): (M, N) float32."""
    if packed.numel() != n * x.shape[-1] * 5 // 8:
        raise ValueError(f"x of width {x.shape[-1]} for a 4-bit weight of {packed.numel()} bytes")
    return _linear(_lib().inferhub_q4f32_linear, "4-bit", x, (packed,), n, bias, torch.float32)


def q8f32_pack(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A GGUF file's 8-bit weights w = q * scale (Q8_0: q (N, K) int8; scale (N, K // 32),
    float16 numbers) in q8f32_linear's layout. N % 16 == 0, K % 32 == 0."""
    n, k = q.shape
    if n % 16 or k % 32 or q.dtype != torch.int8:
        raise ValueError(f"8-bit packing needs (16i, 32j) int8 values, not {q.dtype} {(n, k)}")
    d = scale.to(torch.float32).contiguous()
    d16 = d.to(torch.float16)
    if not torch.equal(d16.to(torch.float32), d):
        raise ValueError("8-bit scales that float16 does not hold exactly")
    q = q.contiguous()
    packed = torch.empty(n * k * 17 // 16, dtype=torch.uint8)  # 1 byte + fp16 / 32
    _lib().inferhub_q8f32_pack(q.data_ptr(), d16.data_ptr(), n, k, packed.data_ptr())
    return packed


def q8f32_linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (M, K) float32 @ the q8f32_pack'ed (N, K) weight^T (+ bias): (M, N) float32."""
    if packed.numel() != n * x.shape[-1] * 17 // 16:
        raise ValueError(f"x of width {x.shape[-1]} for an 8-bit weight of {packed.numel()} bytes")
    return _linear(_lib().inferhub_q8f32_linear, "8-bit", x, (packed,), n, bias, torch.float32)


def q8_pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 weights in q8_linear_bf16's layout (16 output columns per vector)."""
    n, k = q.shape
    if n % 16 or q.dtype != torch.int8:
        raise ValueError(f"8-bit packing needs (16i, K) int8 values, not {q.dtype} {(n, k)}")
    q = q.contiguous()
    packed = torch.empty(n * k, dtype=torch.int8)
    _lib().inferhub_q8_pack(q.data_ptr(), n, k, packed.data_ptr())
    return packed


def q8_linear_bf16(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """x (M, K) bfloat16 @ (q * scale)^T (+ bias) for q8_pack'ed q and float32 scale (N,)."""
    return _linear(_lib().inferhub_q8_linear_bf16, "8-bit", x, (packed, scale), n, bias)


# Addresses per layer in decode_q4_layers' weight table (csrc/decode_layers.c, LAYER_PTRS).
DECODE_LAYER_PTRS = 7
# The low-bit kernel a weight table is packed for (decode_layers.c's KERNEL_*): q4_pack's
# (bfloat16), amx_q4_pack's (bfloat16), q4f32_pack's (float32), q8f32_pack's (float32).
KERNEL_Q4_BF16, KERNEL_AMX_Q4, KERNEL_Q4_F32, KERNEL_Q8_F32 = 0, 1, 2, 3
FLOAT32_KERNELS = (KERNEL_Q4_F32, KERNEL_Q8_F32)


def decode_q4_layers(
    x: torch.Tensor,
    weights: torch.Tensor,
    caches: torch.Tensor,
    final_norm: torch.Tensor,
    shape: tuple[int, int, int, int, int, int],
    eps: float,
    scale: float,
    positions: torch.Tensor,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    kernel: int = KERNEL_Q4_BF16,
) -> torch.Tensor:
    """All decoder layers of a decode step and the final norm, in one call (decode_layers.c).

    x: (M, hidden) embeddings, float32 for the float32 kernels, else bfloat16; weights: int64
    (layers * DECODE_LAYER_PTRS,) addresses (qkv, qkv bias or 0, o, gate_up, down packed for
    `kernel`, then the two norm weights, in x's dtype); caches:
    int64 (layers * 2,) addresses of each layer's key and value cache; shape: (layers, hidden,
    heads, kv heads, head dim, intermediate). positions, slots int64; block tables and
    context lengths int32, as for paged_decode_attention. Returns the final hidden states."""
    want = torch.float32 if kernel in FLOAT32_KERNELS else torch.bfloat16
    if x.dtype != want:
        raise TypeError(f"the decode layers of kernel {kernel} take {want}, not {x.dtype}")
    m, hidden = x.shape
    out = torch.empty(m, hidden, dtype=want)
    layers, hidden_size, heads, kv_heads, head_dim, inter = shape
    rc = _lib().inferhub_decode_q4_layers(
        x.data_ptr(),
        out.data_ptr(),
        m,
        weights.data_ptr(),
        caches.data_ptr(),
        final_norm.data_ptr(),
        layers,
        hidden_size,
        heads,
        kv_heads,
        head_dim,
        inter,
        eps,
        scale,
        positions.data_ptr(),
        slots.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        block_tables.shape[1],
        block_size,
        cos_cache.data_ptr(),
        sin_cache.data_ptr(),
        kernel,
        torch.get_num_threads(),
    )
    if rc == -1:
        raise MemoryError("the decode layers could not allocate their buffers")
    if rc != 0:
        raise RuntimeError(f"the decode layers failed (code {rc})")
    return out
