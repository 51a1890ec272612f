"""Configuration dataclasses. Only this module and cli.py read the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class EngineConfig:
    """How one model is loaded and run."""

    model: str  # a Hugging Face folder or a .gguf file
    name: str | None = None  # served model name
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    attention_backend: str = "auto"  # auto | torch | sdpa | cpu | triton
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None = a fraction of free memory
    kv_cache_fraction: float = 0.3  # of free memory, when kv_cache_memory is None
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's context
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # CPU threads for torch; None = torch's default
    seed: int = 0
    # CPU 4-bit weights for calls of at most int4_max_rows rows (decode of small batches):
    # auto = a GGUF file's Q4_0/Q4_1 weights kept as they are; int4 = also quantize the rest
    # (lossy); none = dense arithmetic only (the default: in bf16 the low-bit kernels round
    # differently from the dense ones, so a request's greedy text could depend on how many
    # others share its batch). AMX tiles read a Q4 file's blocks in every mode: they rebuild
    # the dense bfloat16 weights exactly, so that changes no result; so do the float32 AVX2
    # kernels on a file's Q4_0/Q4_1 projections and Q8_0 output projection.
    weight_quant: str = "none"
    # None: 4 when AMX tiles read the file's 4 bits for larger calls, else 8; the exact float32
    # kernels every call on AVX2 (8 with AVX-512) (measured): their projections are then
    # loaded straight from the file's blocks, with no dense float32 copy. A number also limits
    # those exact kernels (so the dense copy is loaded for the larger calls); 0: no low-bit
    # kernel at all
    int4_max_rows: int | None = None
    cuda_graphs: bool = True  # record decode steps as CUDA graphs (CUDA + triton backend)
    show_progress: bool = True


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=lambda: Path("data"))
    api_keys: list[str] = field(default_factory=list)
    models: list[EngineConfig] = field(default_factory=list)
    max_body_bytes: int = 4 * 1024 * 1024
    # Who may call. `api_keys` (a fixed list, no billing) or `open_access` (anyone, loopback
    # only) replace the database gateway, which is the default.
    open_access: bool = False
    database_url: str | None = field(default=None, repr=False)  # None: SQLite in data_dir
    redis_url: str | None = field(default=None, repr=False)  # None: rate limits in memory
    instance: str = "default"  # this replica's name, unique among those sharing a database
    admin_key: str | None = field(default=None, repr=False)  # the first admin key, if given
    redis_failure: str = "memory"  # while Redis is down: "memory" (per replica) or "closed" (503)
    # Overload: requests waiting for an engine beyond this many are refused at once (503 with
    # Retry-After) instead of timing out in the queue.
    max_queued_requests: int = 256
    # A request still running after this many seconds is aborted (504); None: no limit.
    request_timeout_s: float | None = 600.0


def env_api_keys() -> list[str]:
    raw = os.environ.get("INFERHUB_API_KEYS", "")
    return [k.strip() for k in raw.split(",") if k.strip()]


def cache_dir() -> Path | None:
    """Where derived files are cached (tokenizers converted from GGUF files):
    INFERHUB_CACHE_DIR, else $XDG_CACHE_HOME/inferhub or ~/.cache/inferhub; None when
    INFERHUB_CACHE_DIR is set to an empty string (no cache)."""
    configured = os.environ.get("INFERHUB_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "inferhub"
