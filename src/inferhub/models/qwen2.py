"""Qwen2 and Llama decoder models over the paged KV cache (Llama = Qwen2 without q/k/v bias).

Inside the decoder, submodules are called through `.forward`: `nn.Module.__call__` costs
about 2 us (the hook machinery; no hooks are registered on these modules) and a decode step
makes about 270 such calls, 4% of a single-stream step on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from inferhub.layers import cpu_kernels
from inferhub.layers.activation import silu_and_mul
from inferhub.layers.amx_linear import AMX_MAX_ROWS, AmxLinear, amx_supported
from inferhub.layers.attention import KERNEL_BACKENDS, AttentionMetadata, paged_attention
from inferhub.layers.norm import RMSNorm
from inferhub.layers.quant_linear import (
    ALL_ROWS,
    EXACT_Q8_MAX_ROWS,
    GROUP,
    ExactQ8Linear,
    Int4Linear,
    Int4Weight,
    Int8Linear,
    PackedQ4F32,
    PackedQ8F32,
    _LowBitLinear,
)
from inferhub.layers.rotary import RotaryEmbedding, apply_rotary
from inferhub.models.config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # (num_slots, Hkv, D) each


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.fused = False  # rotary through one kernel: Triton on CUDA, C on the CPU
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj.forward(x)  # (T, q + 2kv)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # rotate q and k heads together: (T, H + Hkv, D)
        qk = qk.view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        kv_written = False
        if self.fused and qk.device.type == "cpu":
            cpu_kernels.rotary_inplace(qk, positions, rotary.cos_cache, rotary.sin_cache)
        elif self.fused:  # Triton: rotary and the layer's KV-cache writes in one launch
            from inferhub.layers.triton_fused import rotary_and_cache

            rotary_and_cache(
                qk,
                v,
                positions,
                meta.slot_mapping,
                rotary.cos_cache,
                rotary.sin_cache,
                kv_cache[0],
                kv_cache[1],
            )
            kv_written = True
        else:
            qk = apply_rotary(qk, *cos_sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # (T, H, D), (T, Hkv, D)
        out = paged_attention(
            q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.backend, kv_written
        )
        return self.o_proj.forward(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.fused = False  # the C kernel for SiLU-and-multiply (cpu backend)
        self.triton = False  # the Triton kernel for it (triton backend, CUDA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.forward(x)
        if self.fused:
            return self.down_proj.forward(cpu_kernels.silu_and_mul(gate_up))
        if self.triton and gate_up.device.type == "cuda":
            from inferhub.layers import triton_fused

            return self.down_proj.forward(triton_fused.silu_and_mul(gate_up))
        return self.down_proj.forward(silu_and_mul(gate_up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
        positions: torch.Tensor,
        rotary: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm.forward(x, residual)
        h = self.self_attn.forward(h, cos_sin, kv_cache, meta, positions, rotary)
        h, residual = self.post_attention_layernorm.forward(h, residual)
        return self.mlp.forward(h), residual


@dataclass
class _Q4DecodePlan:
    """What decode_q4_layers needs that does not change between steps: a weight table per
    4-bit kernel the projections have, and the rows each one serves in the layers' own
    forward (so the one call picks the kernel the layer-by-layer path would)."""

    small: torch.Tensor | None  # int64 addresses of the small calls' 4-bit weights (q4_pack'ed
    # in bfloat16, q4f32_pack'ed in float32), DECODE_LAYER_PTRS per layer
    small_kernel: int  # ... the kernel they are packed for (cpu_kernels.KERNEL_*)
    small_rows: int  # ... used by calls of at most this many rows
    tiles: torch.Tensor | None  # the same for the AMX tiles' amx_q4_pack'ed weights
    tiles_above: int  # ... used by calls of more rows than this, up to AMX_MAX_ROWS
    attn: Attention  # the first layer's: its backend (may change) and scale
    keep: list[torch.Tensor]  # the tensors those addresses point into
    caches_key: tuple[int, int] = (0, 0)
    caches: torch.Tensor | None = None

    def table(self, rows: int) -> tuple[torch.Tensor, int] | None:
        """The weight table for a step of `rows` sequences and the kernel it is packed for."""
        if self.small is not None and rows <= self.small_rows:
            return self.small, self.small_kernel
        if self.tiles is not None and self.tiles_above < rows <= AMX_MAX_ROWS:
            return self.tiles, cpu_kernels.KERNEL_AMX_Q4
        return None


class Qwen2ForCausalLM(nn.Module):
    """Also runs Llama checkpoints (config.attention_bias = False).

    Decode steps of a bfloat16 model on 4-bit weights (small batches on the 4-bit kernel, or
    up to AMX_MAX_ROWS on AMX tiles that read a GGUF file's 4 bits), with the C kernels ("cpu"
    backend), run every layer in one C call (`decode_q4_layers`): the same kernels in the
    same order, without ~300 trips through Python per step."""

    def __init__(self, cfg: ModelConfig, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, attention_backend) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._q4_plan: _Q4DecodePlan | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: (T,). Returns the final hidden states (T, hidden)."""
        x = self.embed_tokens(input_ids)  # (T, hidden)
        plan = self._q4_plan
        if (
            plan is not None
            and not meta.has_prefill
            and 0 < x.shape[0] == meta.num_decode_tokens
            and meta.block_tables is not None
            and meta.context_lens is not None
            and plan.attn.backend == "cpu"
        ):
            table = plan.table(x.shape[0])
            if table is not None:
                return self._decode_q4(plan, table, x, positions, kv_caches, meta)
        fused = self.norm.fused
        cos_sin = (x, x) if fused else self.rotary.cos_sin(positions, x.dtype)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer.forward(
                x, residual, cos_sin, kv_cache, meta, positions, self.rotary
            )
        x, _ = self.norm.forward(x, residual)
        return x

    def _decode_q4(
        self,
        plan: _Q4DecodePlan,
        table: tuple[torch.Tensor, int],
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        assert meta.block_tables is not None and meta.context_lens is not None
        key = (id(kv_caches), kv_caches[0][0].data_ptr())
        if plan.caches is None or plan.caches_key != key:
            plan.caches = torch.tensor(
                [t.data_ptr() for kv in kv_caches for t in kv], dtype=torch.int64
            )
            plan.caches_key = key
        cfg = self.config
        weights, kernel = table
        return cpu_kernels.decode_q4_layers(
            x,
            weights,
            plan.caches,
            self.norm.weight,
            (
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
                cfg.intermediate_size,
            ),
            self.norm.eps,
            plan.attn.scale,
            positions if positions.dtype == torch.int64 else positions.to(torch.int64),
            meta.slot_mapping,
            meta.block_tables.contiguous(),
            meta.context_lens,
            meta.block_size,
            self.rotary.cos_cache,
            self.rotary.sin_cache,
            kernel,
        )

    def _plan_q4_decode(self) -> _Q4DecodePlan | None:
        """The weight tables of decode_q4_layers: one for the C 4-bit kernel when every
        projection of every layer runs small calls on it, one for the AMX tiles when every
        projection's larger calls read 4-bit tiles (bfloat16), or for the exact float32 4-bit
        kernel (float32); None when neither (or the norms are not in the model's dtype, or a
        bias sits where the kernel takes none)."""
        layers = [layer for layer in self.layers if isinstance(layer, DecoderLayer)]
        dtype = self.norm.weight.dtype
        if not layers or dtype not in (torch.bfloat16, torch.float32):
            return None
        # per layer: its four projections and its two norm weights
        parts: list[tuple[list[Int4Linear | ExactQ8Linear], list[torch.Tensor]]] = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            projs = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            if any(w.dtype != dtype or not w.is_contiguous() for w in norms):
                return None
            if not all(isinstance(p, (Int4Linear, ExactQ8Linear)) for p in projs):
                return None
            if any(p.bias is not None for p in projs[1:]):
                return None
            parts.append((projs, norms))  # type: ignore[arg-type]
        keep: list[torch.Tensor] = []

        def table(attr: str) -> torch.Tensor | None:
            addresses: list[int] = []
            for projs, norms in parts:
                packed = [getattr(p, attr, None) for p in projs]
                if any(t is None for t in packed):
                    return None
                tensors = [packed[0], projs[0].bias, *packed[1:], *norms]
                keep.extend(t for t in tensors if t is not None)
                addresses += [0 if t is None else t.data_ptr() for t in tensors]
            assert len(addresses) == cpu_kernels.DECODE_LAYER_PTRS * len(self.layers)
            return torch.tensor(addresses, dtype=torch.int64)

        if dtype == torch.float32 and all(
            isinstance(p, ExactQ8Linear) for ps, _ in parts for p in ps
        ):
            small, kernel, tiles = table("q8f32"), cpu_kernels.KERNEL_Q8_F32, None
        elif dtype == torch.float32:
            small, kernel, tiles = table("q4f32"), cpu_kernels.KERNEL_Q4_F32, None
        else:
            small, kernel, tiles = table("q4"), cpu_kernels.KERNEL_Q4_BF16, table("amx_q4")
        if small is None and tiles is None:
            return None
        rows = [p.max_rows for projs, _ in parts for p in projs]
        return _Q4DecodePlan(small, kernel, min(rows), tiles, max(rows), layers[0].self_attn, keep)

    def set_attention_backend(self, backend: str) -> None:
        """Pick the attention backend; "triton" and "cpu" also turn on their fused RMSNorm,
        rotary (Triton's with the KV-cache writes) and SiLU-and-multiply kernels."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.backend = backend
            if isinstance(module, (Attention, RMSNorm)):
                module.fused = backend in KERNEL_BACKENDS
            if isinstance(module, MLP):
                module.fused = backend == "cpu"
                module.triton = backend == "triton"

    def use_int8_lm_head(self) -> None:
        """Small batches compute logits on 8-bit rows of the output projection (bf16 only)."""
        if isinstance(self.lm_head, nn.Linear):
            self.lm_head = Int8Linear(self.lm_head)  # type: ignore[assignment]

    def use_exact_q8_lm_head(
        self, q: torch.Tensor, scale: torch.Tensor, max_rows: int = EXACT_Q8_MAX_ROWS
    ) -> None:
        """float32 batches of up to max_rows sequences compute logits on the file's own Q8_0
        blocks of the output projection (exact: ExactQ8Linear)."""
        if isinstance(self.lm_head, nn.Linear):
            head = ExactQ8Linear(self.lm_head, PackedQ8F32.pack(q, scale), max_rows)
            self.lm_head = head  # type: ignore[assignment]

    def use_exact_q8(self, weights: Mapping[str, PackedQ8F32], max_rows: int) -> int:
        """Run the projections named in `weights` (model.layers.N.self_attn.qkv_proj.weight:
        a file's Q8_0 blocks of all its parts, packed) on the exact float32 8-bit kernel for
        calls of up to max_rows rows. Returns how many were converted."""
        converted = 0
        for i, parent, attr, parts in self._projections():
            packed = weights.get(self.projection_name(i, parts))
            linear = getattr(parent, attr)
            if packed is not None and isinstance(linear, nn.Linear):
                setattr(parent, attr, ExactQ8Linear(linear, packed, max_rows))
                converted += 1
        self._q4_plan = self._plan_q4_decode()
        return converted

    def release_dense_weights(self) -> int:
        """Free the dense weights that no call reads any more: those of projections (and of
        an untied output projection) whose exact kernel takes calls of any size. Returns the
        bytes released."""
        freed = 0
        modules: list[nn.Module] = [getattr(p, a) for _, p, a, _ in self._projections()]
        if self.lm_head.weight is not self.embed_tokens.weight:  # tied: the embedding's
            modules.append(self.lm_head)
        for module in modules:
            if isinstance(module, _LowBitLinear) and module.exact and module.max_rows >= ALL_ROWS:
                # counted at the dense size: a lean load never allocated it in the first place
                freed += module.in_features * module.out_features * module.weight.element_size()
                module.release_dense()
        return freed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # (N, vocab) in the model's dtype

    def use_amx(self) -> int:
        """Pack every projection that AMX tiles can run (bfloat16 on a CPU with them) for the
        tile kernel; returns how many were packed."""
        packed = sum(_pack_for_amx(parent, attr) for _, parent, attr, _ in self._projections())
        return packed + _pack_for_amx(self, "lm_head")

    # -- 4-bit weights (CPU) ----------------------------------------------------------------
    # Each projection and the checkpoint weights it is made of, in row order.
    _PROJECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj": ("self_attn.o_proj",),
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj": ("mlp.down_proj",),
    }

    def use_int4(
        self,
        weights: Mapping[str, Int4Weight | PackedQ4F32] | None,
        max_rows: int,
        tiles: bool = True,
        exact_rows: int = 0,
    ) -> int:
        """Run the projections of every layer on 4-bit weights for calls of <= max_rows rows.

        `weights` maps checkpoint names (model.layers.N.self_attn.q_proj.weight) to the file's
        own 4-bit blocks; a projection is converted only when all its parts are there, or
        when the projection's own name (model.layers.N.self_attn.qkv_proj.weight) maps to its
        blocks already packed for the exact float32 kernel (a lean load). With
        None, every projection is quantized from its dense weight (lossy). tiles=False keeps
        the file's blocks off the AMX tiles (the dense weights serve the larger calls);
        exact_rows > 0 runs small calls of up to that many rows on the kernel that gives the
        dense weights' products where it takes the file's blocks (Int4Linear). Returns the number of projections converted.
        """
        converted = 0
        for i, parent, attr, parts in self._projections():
            linear = getattr(parent, attr)
            if not isinstance(linear, nn.Linear) or linear.in_features % GROUP:
                continue  # already converted, or not in whole groups
            int4: Int4Weight | PackedQ4F32
            own = self.projection_name(i, parts)
            if weights is None:
                int4 = Int4Weight.quantize(linear.weight)
            elif own in weights:
                int4 = weights[own]
            else:
                names = [f"model.layers.{i}.{part}.weight" for part in parts]
                found = [weights[name] for name in names if name in weights]
                if len(found) < len(names):
                    continue
                int4 = Int4Weight.cat([w for w in found if isinstance(w, Int4Weight)])
            setattr(
                parent,
                attr,
                Int4Linear(linear, int4, max_rows, tiles=tiles, exact_rows=exact_rows),
            )
            converted += 1
        self._q4_plan = self._plan_q4_decode()
        return converted

    def _projections(self) -> Iterator[tuple[int, nn.Module, str, tuple[str, ...]]]:
        """(layer index, parent module, attribute, checkpoint parts) of every projection."""
        for i, layer in enumerate(self.layers):
            for target, parts in self._PROJECTIONS.items():
                parent_name, attr = target.split(".")
                yield i, getattr(layer, parent_name), attr, parts

    @classmethod
    def projection_name(cls, layer: int, parts: tuple[str, ...]) -> str:
        """The checkpoint-style name of a (fused) projection: model.layers.3.self_attn.qkv_proj
        .weight for the q/k/v parts."""
        target = next(t for t, p in cls._PROJECTIONS.items() if p == parts)
        return f"model.layers.{layer}.{target}.weight"

    # -- weights ---------------------------------------------------------------------------
    _FUSED: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors named as in a Hugging Face checkpoint (model.layers.N.self_attn...).
        A meta tensor counts as loaded once its shape is checked, and leaves the parameter as
        it is: a lean load passes the projections whose file blocks a kernel serves instead
        (never read densely)."""
        params = dict(self.named_parameters())
        cfg = self.config
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        i = cfg.intermediate_size
        offsets = {"qkv_proj": [(0, q), (q, kv), (q + kv, kv)], "gate_up_proj": [(0, i), (i, i)]}
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            parts = name.split(".")
            target = name
            shard: tuple[int, int] | None = None
            for j, part in enumerate(parts):
                if part in self._FUSED:
                    fused, idx = self._FUSED[part]
                    parts[j] = fused
                    target = ".".join(parts)
                    shard = offsets[fused][idx]
                    break
            if target not in params:
                raise KeyError(f"unexpected weight {name!r} in checkpoint")
            param = params[target]
            if tensor.is_meta:
                # a lean load's projection: its blocks go to a kernel, its parameter stays
                # empty; only the shape is checked
                linear = self.get_submodule(target.rsplit(".", 1)[0])
                rows = shard[1] if shard is not None else getattr(linear, "out_features", -1)
                want = (rows, getattr(linear, "in_features", -1))
                if tuple(tensor.shape) != want:
                    raise ValueError(
                        f"weight {name!r} has shape {tuple(tensor.shape)}, expected {want}"
                    )
                loaded.add(f"{target}:{shard}")
                continue
            with torch.no_grad():
                if shard is None:
                    if param.shape != tensor.shape:
                        raise ValueError(
                            f"weight {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(param.shape)}"
                        )
                    param.copy_(tensor)
                else:
                    start, size = shard
                    param.narrow(0, start, size).copy_(tensor)
            loaded.add(f"{target}:{shard}")
        expected = 0
        for pname in params:
            if pname.endswith(("qkv_proj.weight", "qkv_proj.bias")):
                expected += 3
            elif pname.endswith("gate_up_proj.weight"):
                expected += 2
            else:
                expected += 1
        if len(loaded) < expected:
            missing = sorted(
                p for p in params if not any(key.startswith(p + ":") for key in loaded)
            )
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}")


def _pack_for_amx(parent: nn.Module, attr: str) -> int:
    linear = getattr(parent, attr)
    if not amx_supported(linear.weight):
        return 0
    if isinstance(linear, nn.Linear):
        setattr(parent, attr, AmxLinear(linear))
    elif isinstance(linear, (Int4Linear, Int8Linear)):
        linear.use_amx()
    else:
        return 0
    return 1
