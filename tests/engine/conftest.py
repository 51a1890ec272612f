"""Fixtures for engine tests: tiny random models built once per session, engines that must
give every KV block back by the end of each test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from inferhub.config import EngineConfig
from inferhub.engine.llm import LLM
from tiny_models import make_tiny_gguf, make_tiny_hf


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-hf")
    return {arch: make_tiny_hf(root / arch, arch) for arch in ("qwen2", "llama")}


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-gguf")
    return {arch: make_tiny_gguf(root, arch) for arch in ("qwen2", "llama")}


@pytest.fixture(scope="session")
def hf_reference() -> Callable[[Path, list[list[int]], int], list[list[int]]]:
    """Greedy continuations from `transformers`, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    cache: dict[Path, Any] = {}

    def run(path: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        if path not in cache:
            kwargs: dict[str, Any] = {"dtype": torch.float32}
            source = path
            if path.suffix == ".gguf":  # transformers dequantizes the file to float32
                kwargs["gguf_file"] = path.name
                source = path.parent
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()
            model.generation_config.eos_token_id = None  # like ignore_eos: never stop early
            cache[path] = model
        model = cache[path]
        outs = []
        for p in prompts:
            ids = torch.tensor([p])
            with torch.inference_mode():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=0,
                )
            outs.append(out[0, len(p) :].tolist())
        return outs

    return run


@pytest.fixture
def make_llm() -> Iterator[Callable[..., LLM]]:
    """Build LLMs in float32 with small caches; each must end with no block in use."""
    made: list[LLM] = []

    def build(model: Path | str, **overrides: Any) -> LLM:
        cfg: dict[str, Any] = {
            "model": str(model),
            "dtype": "float32",
            "device": os.environ.get("INFERHUB_TEST_DEVICE", "cpu"),
            "block_size": 4,
            "kv_cache_memory": 4 << 20,
            "max_num_seqs": 32,
            "max_num_batched_tokens": 256,
            "show_progress": False,
        }
        cfg.update(overrides)
        llm = LLM(EngineConfig(**cfg))
        made.append(llm)
        return llm

    yield build
    for llm in made:
        assert not llm.engine.has_unfinished_requests()
        assert llm.engine.block_manager.num_used_blocks == 0, "KV blocks leaked"
