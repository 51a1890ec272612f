"""load_model: a Hugging Face folder (safetensors) or a GGUF file -> model, config and tokenizer."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from inferhub.layers import cpu_kernels
from inferhub.layers.quant_linear import (
    ALL_ROWS,
    DEFAULT_MAX_ROWS,
    EXACT_Q8_MAX_ROWS,
    F32_MAX_ROWS,
    GROUP,
    TILES_MAX_ROWS,
    Int4Linear,
    Int4Weight,
    Int8Linear,
    PackedQ4F32,
    PackedQ8F32,
    _LowBitLinear,
    int4_supported,
    q8_0_blocks,
)
from inferhub.layers.rotary import RotaryEmbedding
from inferhub.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from inferhub.models.qwen2 import Qwen2ForCausalLM
from inferhub.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Qwen2ForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    source: str  # the absolute path it was loaded from
    int4_projections: int = 0  # projections on low-bit kernels (4-bit; the lean 8-bit ones)
    exact_q8_lm_head: bool = False  # float32 logits of small batches on the file's Q8_0 rows
    quantized_output: bool = False  # the file stores the output projection quantized
    int8_lm_head: bool = False  # logits of small batches from 8-bit rows
    amx_projections: int = 0  # projections with an AMX-packed copy for calls up to 384 rows
    amx_q4_projections: int = 0  # of those, the ones whose AMX tiles read the file's 4 bits
    released_bytes: int = 0  # dense weights freed: exact kernels take every call (AVX2)
    # while loading a GGUF file: its output projection's tensor (reader's, memory-mapped)
    gguf_output: Any = field(default=None, repr=False)


def load_model(
    path: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    attention_backend: str = "sdpa",
    show_progress: bool = True,
    weight_quant: str = "none",
    int4_max_rows: int | None = None,
) -> LoadedModel:
    """Load a Hugging Face model folder or a single `.gguf` file, ready for inference.

    weight_quant: "auto" keeps a GGUF file's 4-bit weights (Q4_0, Q4_1) packed for the CPU's
    4-bit kernels, used by calls of at most `int4_max_rows` rows (the dense weights serve
    larger ones), and in bfloat16 computes small batches' logits on 8-bit rows when the file
    stores the output projection quantized; "int4" also quantizes every other projection and
    the output projection (lossy); "none" (the default, as in EngineConfig) adds no lossy
    kernel. Whatever it says, kernels that rebuild a GGUF file's dense weights exactly from
    its blocks serve where they run: AMX tiles in bfloat16, and in float32 the AVX2 kernels
    on Q4_0/Q4_1 projections and a Q8_0 output projection (calls of up to F32_MAX_ROWS rows,
    or `int4_max_rows`; 0 turns them off). Where they take every call (F32_MAX_ROWS on AVX2
    without AVX-512, or int4_max_rows >= ALL_ROWS), the load is lean: those projections, and
    Q8_0 projections too (the exact 8-bit kernel), are packed from the file's blocks and never
    dequantized, with no dense float32 copy. (So with weight_quant "int4", a lean load's
    Q8_0 projections run exactly on 8 bits rather than lossily on 4.)
    """
    if weight_quant not in ("auto", "none", "int4"):
        raise ValueError(f"weight_quant must be auto, none or int4, not {weight_quant!r}")
    if weight_quant == "int4" and not int4_supported(device, dtype):
        raise ValueError(f"4-bit weights run on the CPU only, not on {device.type} in {dtype}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    source = os.path.abspath(path)
    int4: dict[str, Int4Weight | PackedQ4F32 | PackedQ8F32] = {}
    tiles = False  # AMX tiles on the file's 4-bit blocks (GGUF only)
    exact32 = False  # the exact float32 4-bit kernel on the file's blocks (GGUF only)
    lean = False  # ... taking every call: those projections are never loaded densely
    exact_rows = F32_MAX_ROWS if int4_max_rows is None else int4_max_rows
    if os.path.isdir(source):
        loaded = _load_hf_folder(source, dtype, device, attention_backend, show_progress)
    else:
        with open(source, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            if source.lower().endswith(".gguf"):
                raise ValueError(f"{source} is not a valid GGUF file (bad magic {magic!r})")
            raise ValueError(f"{source} is neither a Hugging Face model folder nor a .gguf file")
        keep = weight_quant != "none" and int4_supported(device, dtype)
        # AMX tiles can read a Q4_0/Q4_1 file's own 4 bits in place of the dense bfloat16
        # copy (the same bits out, a quarter of the bytes in), whatever weight_quant says;
        # the load holds the blocks unpacked (1.375 bytes a weight, up to 2.5 times the file)
        # until they are packed, so only when that fits a quarter of the memory available
        fits = 5 * os.path.getsize(source) // 2 <= _memory_available() // 4
        tiles = (
            device.type == "cpu"
            and dtype == torch.bfloat16
            and cpu_kernels.amx_available()
            and fits
        )
        # likewise, in float32 on AVX2, the kernels that rebuild the file's dense float32
        # weights exactly from its 4 and 8 bits (csrc/lowbit_avx2.c), unless int4_max_rows
        # = 0 asks for none. Where they take every call (lean), the projections they serve
        # are packed as they are read and never dequantized: less memory than a dense load
        # whatever the file's size, so with no `fits` condition
        exact_here = (
            device.type == "cpu"
            and dtype == torch.float32
            and int4_max_rows != 0
            and cpu_kernels.q4f32_available()
        )
        lean = exact_here and exact_rows >= ALL_ROWS
        exact32 = exact_here and (fits or lean)
        loaded = _load_gguf(
            source,
            dtype,
            device,
            attention_backend,
            show_progress,
            int4 if keep or tiles or exact32 else None,
            lean=lean,
            unpacked=keep or tiles or (exact32 and not lean),
        )
    # by default the 4-bit kernel takes calls of up to TILES_MAX_ROWS rows when the file's
    # 4-bit tiles serve the larger ones (AMX), else up to DEFAULT_MAX_ROWS (dense above); the
    # exact float32 kernel up to F32_MAX_ROWS
    rows = int4_max_rows
    if rows is None:
        rows = TILES_MAX_ROWS if tiles else DEFAULT_MAX_ROWS
    if int4:
        packed = {n for n, w in int4.items() if isinstance(w, (PackedQ4F32, PackedQ8F32))}
        eight = {n: w for n, w in int4.items() if isinstance(w, PackedQ8F32)}
        four = {n: w for n, w in int4.items() if not isinstance(w, PackedQ8F32)}
        int4.clear()
        converted = loaded.model.use_int4(
            four, rows if keep else 0, tiles=tiles, exact_rows=exact_rows if exact32 else 0
        )
        four.clear()  # packed now: the unpacked blocks (a byte a weight) can go
        if eight:  # a lean load's Q8_0 projections (exact_rows: every call)
            loaded.int4_projections += loaded.model.use_exact_q8(eight, exact_rows)
        taken = {
            f"model.{name}"
            for name, module in loaded.model.named_modules()
            if isinstance(module, _LowBitLinear) and module.exact
        }
        if missed := {name.removesuffix(".weight") for name in packed} - taken:
            # their dense parameters were never written: they must not serve
            raise RuntimeError(f"lean load: no exact kernel took {sorted(missed)[:3]}")
        if keep:
            loaded.int4_projections += converted
        elif exact32:  # those the exact kernel took (the others stay dense)
            loaded.int4_projections += sum(
                1
                for module in loaded.model.modules()
                if isinstance(module, Int4Linear) and module.q4f32 is not None
            )
    if weight_quant == "int4":
        loaded.int4_projections += loaded.model.use_int4(None, rows)
    if exact32 and loaded.quantized_output:
        q8_rows = EXACT_Q8_MAX_ROWS if int4_max_rows is None else int4_max_rows
        loaded.exact_q8_lm_head = _use_exact_q8_head(loaded.gguf_output, loaded.model, q8_rows)
    loaded.gguf_output = None  # the reader's view of the file: not needed any more
    if exact32:
        # on AVX2 the exact kernels take every call (F32_MAX_ROWS): the dense copies go
        loaded.released_bytes = loaded.model.release_dense_weights()
        if loaded.released_bytes:
            log.info(
                "exact float32 kernels take every call: %.0f MB of dense weights released",
                loaded.released_bytes / 1e6,
            )
    int8_head = weight_quant == "int4" or (weight_quant == "auto" and loaded.quantized_output)
    if int8_head and device.type == "cpu" and dtype == torch.bfloat16:
        loaded.model.use_int8_lm_head()
        loaded.int8_lm_head = True
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_kernels.amx_available():
        loaded.amx_projections = _use_amx(loaded.model)
        loaded.amx_q4_projections = sum(
            1
            for module in loaded.model.modules()
            if isinstance(module, Int4Linear) and module.amx_q4 is not None
        )
    if device.type == "cpu":
        _return_freed_memory()
    return loaded


def _return_freed_memory() -> None:
    """Hand the heap memory that loading freed (unpacked blocks, released dense copies) back
    to the system: glibc keeps freed heap pages otherwise, and the KV cache budget, sized
    from the memory available after loading, would not see them (SmolLM2 in float32 on AVX2:
    a resident size of 1020 MB after loading, 682 MB after this). A no-op without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _use_exact_q8_head(output: Any, model: Qwen2ForCausalLM, max_rows: int) -> bool:
    """Put the file's own Q8_0 output projection (or tied embedding), `output` (the GGUF
    reader's tensor, memory-mapped: only its blocks are read), on the exact float32 kernel;
    False when the file stores it otherwise."""
    if output is None or output.tensor_type.name != "Q8_0":
        return False
    n, k = model.lm_head.out_features, model.lm_head.in_features
    if n % 16 or k % GROUP:
        return False
    q, scale = q8_0_blocks(output.data, (n, k))
    try:
        model.use_exact_q8_lm_head(q, scale, max_rows)
    except ValueError:  # scales float16 does not hold: not a Q8_0 file's own
        return False
    return True


def _use_amx(model: Qwen2ForCausalLM) -> int:
    """Pack the projections for the AMX kernel when the copies fit: at most a quarter of the
    memory still available (a 7B model in bfloat16 would need another 15 GB). Projections
    whose tiles read 4-bit weights need no copy."""
    weights = 0
    for module in model.modules():
        if isinstance(module, Int4Linear) and module.amx_q4 is not None:
            continue
        if isinstance(module, (nn.Linear, Int4Linear, Int8Linear)):
            weights += module.weight.numel() * module.weight.element_size()
    available = _memory_available()
    if weights > available // 4:
        log.info("AMX kernels off: packing %.1f GB of weights would not fit", weights / 1e9)
        return 0
    return model.use_amx()


# -- shared ---------------------------------------------------------------------------------
def _build_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    backend: str,
    no_weight: Iterable[str] = (),
) -> Qwen2ForCausalLM:
    """An uninitialized model directly in `dtype` on `device` (no float32 copy on the way).
    The linear layers named in `no_weight` (module paths) get an empty weight, never
    allocated at its size (a lean load's projections)."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config, attention_backend=backend)
    for name in no_weight:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        linear.weight.data = linear.weight.new_empty(0)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Rotary tables are computed, not loaded: rebuild them for real (float32) on the device.
    model.rotary = RotaryEmbedding(
        config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
    ).to(device)
    return model


def _load_weights(
    model: Qwen2ForCausalLM,
    weights: Iterator[tuple[str, torch.Tensor]],
    total: int,
    source: str,
    show_progress: bool,
) -> None:
    bar = tqdm(
        weights, total=total, desc="Loading weights", unit="tensor", disable=not show_progress
    )
    try:
        model.load_weights(bar)
    except KeyError as exc:
        raise ValueError(f"{source}: {exc.args[0] if exc.args else exc}") from exc
    except ValueError as exc:
        if isinstance(exc, UnsupportedModelError):
            raise
        raise ValueError(f"{source}: {exc}") from exc
    finally:
        bar.close()


def _finish(
    model: Qwen2ForCausalLM, config: ModelConfig, tokenizer: Tokenizer, source: str
) -> LoadedModel:
    model.eval()
    model.requires_grad_(False)
    config.eos_token_ids = sorted(set(config.eos_token_ids) | tokenizer.eos_token_ids)
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=source)


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list):
        return [int(v) for v in value]
    return [int(value)]


# -- Hugging Face folders --------------------------------------------------------------------
def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _normalize_hf_config(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers >= 5 writes rope settings under `rope_parameters`; map them to the old keys."""
    cfg = dict(raw)
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        if cfg.get("rope_theta") is None and "rope_theta" in params:
            cfg["rope_theta"] = params["rope_theta"]
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if cfg.get("rope_scaling") is None and rope_type != "default":
            cfg["rope_scaling"] = dict(params)
    return cfg


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = sorted({os.path.join(folder, str(f)) for f in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"{index} names missing shard {os.path.basename(missing[0])}")
        return files
    files = sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")
    )
    if not files:
        raise ValueError(
            f"{folder} has no *.safetensors weights (PyTorch .bin checkpoints are not supported)"
        )
    return files


def _load_hf_folder(
    folder: str, dtype: torch.dtype, device: torch.device, backend: str, show_progress: bool
) -> LoadedModel:
    from safetensors import safe_open

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        config = ModelConfig.from_hf_dict(_normalize_hf_config(_read_json(config_path)))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{config_path} lacks a required setting: {exc}") from exc
    files = _safetensors_files(folder)
    gen_path = os.path.join(folder, "generation_config.json")
    gen_eos = _as_ids(_read_json(gen_path).get("eos_token_id")) if os.path.isfile(gen_path) else []
    tokenizer = Tokenizer.from_pretrained(folder, extra_eos_ids=[*config.eos_token_ids, *gen_eos])

    try:
        total = 0
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as st:
                total += len(list(st.keys()))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"cannot read safetensors file {file}: {exc}") from exc

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            try:
                with safe_open(file, framework="pt", device="cpu") as st:
                    for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                        yield name, st.get_tensor(name)
            except Exception as exc:  # safetensors raises its own error types
                raise ValueError(f"cannot read safetensors file {file}: {exc}") from exc

    model = _build_model(config, dtype, device, backend)
    _load_weights(model, weights(), total, folder, show_progress)
    return _finish(model, config, tokenizer, folder)


# -- GGUF files ------------------------------------------------------------------------------
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_to_hf_name(name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (and the top-level ones)."""
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit():
        module = _GGUF_LAYER_NAMES.get(parts[2])
        if module is not None and parts[3] in ("weight", "bias"):
            return f"model.layers.{parts[1]}.{module}.{parts[3]}"
    raise ValueError(f"unexpected GGUF tensor {name!r}")


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _hf_shape(tensor: Any) -> tuple[int, ...]:
    """GGUF lists dimensions innermost first; PyTorch outermost first."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _dequantize(tensor: Any) -> np.ndarray:
    import gguf

    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise UnsupportedModelError(
            f"GGUF tensor {tensor.name!r} uses {tensor.tensor_type.name}, which cannot be dequantized"
        ) from exc
    data = np.asarray(data, dtype=np.float32).reshape(_hf_shape(tensor))
    return data if data.flags.writeable else data.copy()  # the reader's memmap is read-only


class _GGUFMeta:
    """Typed access to a GGUFReader's key/value metadata."""

    def __init__(self, reader: Any, path: str) -> None:
        self.reader = reader
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: GGUF metadata {key!r} is missing")
        return value


def _gguf_config(meta: _GGUFMeta, tensors: dict[str, Any]) -> ModelConfig:
    arch = str(meta.get("general.architecture", "unknown"))
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}; inferhub runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for name in ("token_embd.weight", "blk.0.attn_q.weight"):
        if name not in tensors:
            raise ValueError(f"{meta.path}: GGUF tensor {name!r} is missing")
    heads = int(meta.require(f"{arch}.attention.head_count"))
    intermediate = meta.require(f"{arch}.feed_forward_length")
    if isinstance(intermediate, list):  # per-layer lists in some files
        intermediate = intermediate[0]
    head_dim = _hf_shape(tensors["blk.0.attn_q.weight"])[0] // heads
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    rope_scaling: dict[str, Any] | None = None
    if scaling_type == "linear":
        rope_scaling = {
            "rope_type": "linear",
            "factor": float(meta.require(f"{arch}.rope.scaling.factor")),
        }
    elif scaling_type not in (None, "none"):
        raise UnsupportedModelError(f"GGUF rope scaling {scaling_type!r} is not supported")
    return ModelConfig(
        architecture=arch,
        vocab_size=_hf_shape(tensors["token_embd.weight"])[0],
        hidden_size=int(meta.require(f"{arch}.embedding_length")),
        intermediate_size=int(intermediate),
        num_hidden_layers=int(meta.require(f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        rope_scaling=rope_scaling,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_as_ids(meta.get("tokenizer.ggml.eos_token_id")),
    )


def _apply_rope_freq_factors(model: Qwen2ForCausalLM, factors: torch.Tensor) -> None:
    """llama.cpp stores Llama 3 rope scaling as per-frequency divisors (`rope_freqs.weight`)."""
    cfg = model.config
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    inv_freq = (inv_freq / factors.double()).float()
    freqs = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
    device = model.embed_tokens.weight.device
    model.rotary.register_buffer("cos_cache", freqs.cos().to(device), persistent=False)
    model.rotary.register_buffer("sin_cache", freqs.sin().to(device), persistent=False)


def _load_gguf(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    backend: str,
    show_progress: bool,
    int4: dict[str, Int4Weight | PackedQ4F32 | PackedQ8F32] | None = None,
    lean: bool = False,
    unpacked: bool = True,
) -> LoadedModel:
    """Load a GGUF file; with `int4`, also collect its Q4_0/Q4_1 projection weights there.

    lean (with `int4`): the projections whose every part the file stores as Q4_0/Q4_1, or
    every part as Q8_0, in a shape the exact float32 kernels take are not dequantized at all:
    each is packed for its kernel as soon as its parts are read (int4[its own name], a
    PackedQ4F32 or PackedQ8F32) and has no dense
    parameter (an empty one, given its real size only if the kernel refuses the blocks and
    they load densely after all). Only for a model whose exact kernels will take every call.
    unpacked: also collect the other Q4_0/Q4_1 weights, unpacked (for the lossy kernel or the
    AMX tiles)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, struct and numpy errors alike
        raise ValueError(f"{path} is not a valid GGUF file: {exc}") from exc
    meta = _GGUFMeta(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    config = _gguf_config(meta, tensors)
    extra_eos = [
        *config.eos_token_ids,
        *_as_ids(meta.get("tokenizer.ggml.eot_token_id")),
        *_as_ids(meta.get("tokenizer.ggml.eom_token_id")),
    ]
    tokenizer = Tokenizer.from_gguf(path, extra_eos_ids=extra_eos)
    permute = config.architecture == "llama"
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    lean_parts = (
        _lean_projections(tensors, config.num_hidden_layers) if lean and int4 is not None else {}
    )
    part_of = {part: proj for proj, (parts, _) in lean_parts.items() for part in parts}

    def unpermute(tensor: Any, n: int) -> np.ndarray | None:
        """The row order that undoes llama.cpp's q/k permutation, or None."""
        if permute and ".attn_q." in tensor.name:
            return _unpermute_rows(np.arange(n), heads)
        if permute and ".attn_k." in tensor.name:
            return _unpermute_rows(np.arange(n), kv_heads)
        return None

    def dense(tensor: Any) -> np.ndarray:
        data = _dequantize(tensor)
        rows = unpermute(tensor, data.shape[0])
        return data if rows is None else data[rows]

    def blocks(tensor: Any) -> Int4Weight:
        shape = _hf_shape(tensor)
        w4 = Int4Weight.from_gguf(tensor.data, tensor.tensor_type.name, (shape[0], shape[1]))
        rows = unpermute(tensor, shape[0])
        return w4 if rows is None else w4.permute_rows(rows)

    def blocks8(tensor: Any) -> tuple[torch.Tensor, torch.Tensor]:
        shape = _hf_shape(tensor)
        q, d = q8_0_blocks(tensor.data, (shape[0], shape[1]))
        rows = unpermute(tensor, shape[0])
        if rows is None:
            return q, d
        index = torch.from_numpy(np.ascontiguousarray(rows))
        return q[index], d[index]

    def pack(kind: str, parts: list[Any]) -> PackedQ4F32 | PackedQ8F32:
        if kind == "q8":
            return PackedQ8F32.pack(
                torch.cat([q for q, _ in parts]), torch.cat([d for _, d in parts])
            )
        return PackedQ4F32.pack(Int4Weight.cat(parts))

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        pending: dict[str, dict[str, tuple[Any, Any]]] = {}
        for tensor in reader.tensors:
            if tensor.name == "rope_freqs.weight":
                continue
            hf_name = gguf_to_hf_name(tensor.name)
            proj = part_of.get(hf_name)
            if proj is not None and int4 is not None:  # lean: never dequantized
                names, kind = lean_parts[proj]
                got = pending.setdefault(proj, {})
                got[hf_name] = (tensor, blocks8(tensor) if kind == "q8" else blocks(tensor))
                # a meta tensor: load_weights checks its shape and copies nothing
                yield hf_name, torch.empty(_hf_shape(tensor), device="meta")
                if len(got) < len(names):
                    continue
                del pending[proj]
                parts = [got[name] for name in names]
                try:
                    int4[proj] = pack(kind, [b for _, b in parts])
                except ValueError:  # blocks the kernel cannot take: dense after all
                    linear = model.get_submodule(_module_name(proj))
                    assert isinstance(linear, nn.Linear)
                    linear.weight.data = torch.empty(
                        linear.out_features, linear.in_features, dtype=dtype, device=device
                    )
                    for name, (part, b) in zip(names, parts, strict=True):
                        if unpacked and kind == "q4":
                            int4[name] = b
                        yield name, torch.from_numpy(dense(part))
                continue
            data = dense(tensor)
            qtype = tensor.tensor_type.name
            if (
                int4 is not None
                and unpacked
                and qtype in ("Q4_0", "Q4_1")
                and ".layers." in hf_name
            ):
                int4[hf_name] = blocks(tensor)
            yield hf_name, torch.from_numpy(data)

    # no dense copy for the lean projections: never allocated
    model = _build_model(config, dtype, device, backend, map(_module_name, lean_parts))
    total = sum(1 for name in tensors if name != "rope_freqs.weight")
    _load_weights(model, weights(), total, path, show_progress)
    if "rope_freqs.weight" in tensors:
        _apply_rope_freq_factors(model, torch.from_numpy(_dequantize(tensors["rope_freqs.weight"])))
    loaded = _finish(model, config, tokenizer, path)
    output = tensors.get("output.weight", tensors["token_embd.weight"])
    loaded.quantized_output = output.tensor_type.name not in ("F32", "F16", "BF16")
    loaded.gguf_output = output
    return loaded


def _module_name(weight_name: str) -> str:
    """model.layers.3.self_attn.qkv_proj.weight -> layers.3.self_attn.qkv_proj (the model's
    own module path)."""
    return weight_name.removeprefix("model.").removesuffix(".weight")


_LEAN_KINDS = {"Q4_0": "q4", "Q4_1": "q4", "Q8_0": "q8"}


def _lean_projections(
    tensors: dict[str, Any], num_layers: int
) -> dict[str, tuple[tuple[str, ...], str]]:
    """The (fused) projections whose every part the file stores in 4 bits (Q4_0/Q4_1) or
    every part in 8 bits (Q8_0), in a shape the exact float32 kernels take (whole tasks of 16
    outputs, groups of 32 inputs): each projection's own name -> (its parts' checkpoint names
    in row order, "q4" or "q8")."""
    by_name: dict[str, Any] = {}
    for name, tensor in tensors.items():
        try:
            by_name[gguf_to_hf_name(name)] = tensor
        except ValueError:  # not a weight of ours: the load itself says so
            continue
    lean: dict[str, tuple[tuple[str, ...], str]] = {}
    for i in range(num_layers):
        for parts in Qwen2ForCausalLM._PROJECTIONS.values():
            names = tuple(f"model.layers.{i}.{part}.weight" for part in parts)
            if not all(name in by_name for name in names):
                continue
            found = [by_name[name] for name in names]
            kinds = {_LEAN_KINDS.get(t.tensor_type.name, "") for t in found}
            if len(kinds) != 1 or "" in kinds:
                continue
            shapes = [_hf_shape(t) for t in found]
            k = shapes[0][-1]
            if any(len(sh) != 2 or sh[1] != k for sh in shapes) or k % GROUP:
                continue
            if sum(sh[0] for sh in shapes) % 16:
                continue
            lean[Qwen2ForCausalLM.projection_name(i, parts)] = (names, kinds.pop())
    return lean


def _memory_available() -> int:
    """MemAvailable (free memory plus what the kernel can reclaim, such as the page cache the
    model file just filled), or the free pages where /proc/meminfo is not there."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
