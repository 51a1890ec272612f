"""ModelConfig: the architecture numbers our model code needs, from any source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("qwen2", "llama")


class UnsupportedModelError(ValueError):
    """The model's architecture or format is not one inferhub can run."""


@dataclass
class ModelConfig:
    architecture: str  # "qwen2" or "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias: True for Qwen2
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = str(cfg.get("model_type", "")).lower()
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = cfg.get("architectures") or [model_type or "unknown"]
            raise UnsupportedModelError(
                f"unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
                f"inferhub runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = [
            int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])
        ]
        attention_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
        # transformers 5 writes rope settings under "rope_parameters"
        rope = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = rope
        return cls(
            architecture=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            rope_scaling=rope_scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
