"""Offline batch generation: `LLM(config).generate(prompts, params)` runs to completion."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

from inferhub.config import EngineConfig
from inferhub.engine.llm_engine import LLMEngine
from inferhub.engine.outputs import TokenLogprob
from inferhub.engine.sampling_params import SamplingParams
from inferhub.models.loader import LoadedModel


@dataclass
class GenerationResult:
    """One finished choice of an offline request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


class LLM:
    """Offline batch generation: `LLM(config).generate(prompts, params)`."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.engine = LLMEngine(config, loaded)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self, prompts: Seq[str | list[int]], params: SamplingParams | Seq[SamplingParams]
    ) -> list[list[GenerationResult]]:
        """Run every prompt to completion; returns, per prompt, its choices in index order."""
        param_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids: list[str] = []
        for i, (prompt, p) in enumerate(zip(prompts, param_list, strict=True)):
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"offline-{id(self)}-{i}"
            self.engine.add_request(rid, token_ids, p)
            ids.append(rid)
        results: dict[str, dict[int, GenerationResult]] = {rid: {} for rid in ids}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.error:
                    raise RuntimeError(out.error)
                for c in out.outputs:
                    r = results[out.request_id].setdefault(
                        c.index, GenerationResult(c.index, "", [], None, None)
                    )
                    r.text = c.text
                    r.token_ids.extend(c.token_ids_delta)
                    r.finish_reason = c.finish_reason
                    if c.logprobs_delta is not None:
                        r.logprobs = (r.logprobs or []) + c.logprobs_delta
        return [[results[rid][k] for k in sorted(results[rid])] for rid in ids]
