"""The embedded SmolLM2-135M-Instruct GGUF: our greedy chat answer equals `transformers`'
greedy answer from the same file, token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inferhub.config import EngineConfig
from inferhub.engine.llm import LLM
from inferhub.engine.sampling_params import SamplingParams
from inferhub.models.default import default_model_path

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]


def test_greedy_chat_answers_match_transformers() -> None:
    from transformers import AutoModelForCausalLM

    path = Path(default_model_path())
    llm = LLM(
        EngineConfig(
            model=str(path), dtype="float32", kv_cache_memory=64 << 20, show_progress=False
        )
    )
    prompts = [
        llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS
    ]
    ours = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=40))
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    for prompt, choices in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=40,
                do_sample=False,
                eos_token_id=sorted(llm.engine.eos_token_ids),
                pad_token_id=0,
            )
        theirs = out[0, len(prompt) :].tolist()
        assert choices[0].token_ids == theirs
        assert choices[0].text.strip()
    assert "Paris" in ours[0][0].text
    assert llm.engine.block_manager.num_used_blocks == 0
