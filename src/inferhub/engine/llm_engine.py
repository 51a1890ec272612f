"""The engine step: schedule, run the model, sample, detokenize, check stops, report."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from inferhub.config import EngineConfig
from inferhub.engine.block_manager import BlockManager, blocks_needed
from inferhub.engine.detokenizer import IncrementalDetokenizer
from inferhub.engine.device import resolve_backend, resolve_device, resolve_dtype
from inferhub.engine.errors import PromptTooLongError
from inferhub.engine.model_runner import ModelRunner, available_memory, kv_bytes_per_block
from inferhub.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from inferhub.engine.sampler import Sampler, build_batch
from inferhub.engine.sampling_params import SamplingParams, SamplingParamsError
from inferhub.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from inferhub.engine.sequence import FinishReason, Sequence
from inferhub.models.loader import LoadedModel, load_model
from inferhub.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_free_blocks: int
    num_blocks: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    total_prompt_tokens: int
    total_generation_tokens: int
    num_preemptions: int


@dataclass(frozen=True)
class RequestLimits:
    """What decides whether a request can run: known once the engine is built."""

    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int


def check_request(
    limits: RequestLimits, prompt_token_ids: list[int], params: SamplingParams
) -> None:
    """Raise SamplingParamsError or PromptTooLongError for a request that cannot run."""
    params.validate(limits.vocab_size)
    if not prompt_token_ids:
        raise SamplingParamsError("messages", "The prompt is empty.")
    if any(not 0 <= t < limits.vocab_size for t in prompt_token_ids):
        raise SamplingParamsError("prompt", "The prompt holds token ids outside the vocabulary.")
    n_prompt = len(prompt_token_ids)
    total = n_prompt + (params.max_tokens or 1)
    if total > limits.max_model_len:
        raise PromptTooLongError(n_prompt, params.max_tokens, limits.max_model_len)
    if blocks_needed(total, limits.block_size) > limits.num_blocks:
        raise PromptTooLongError(n_prompt, params.max_tokens, limits.num_blocks * limits.block_size)


@dataclass
class _Request:
    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    seqs: list[Sequence] = field(default_factory=list)
    detoks: dict[int, IncrementalDetokenizer] = field(default_factory=dict)
    generators: dict[int, torch.Generator | None] = field(default_factory=dict)


class LLMEngine:
    """Holds the model, the KV cache and the queues; `step()` advances every request."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        backend = resolve_backend(config.attention_backend, self.device, self.dtype)
        if loaded is None:
            loaded = load_model(
                config.model,
                dtype=self.dtype,
                device=self.device,
                attention_backend=backend,
                show_progress=config.show_progress,
                weight_quant=config.weight_quant,
                int4_max_rows=config.int4_max_rows,
            )
        self.model = loaded.model
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.model_config = loaded.config
        self.vocab_size = self.model_config.vocab_size
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        per_block = kv_bytes_per_block(self.model, config.block_size, self.dtype)
        budget = config.kv_cache_memory or int(
            available_memory(self.device) * config.kv_cache_fraction
        )
        most_useful = config.max_num_seqs * (-(-self.max_model_len // config.block_size)) + 1
        num_blocks = max(1, min(budget // per_block, most_useful))
        self.runner = ModelRunner(
            self.model, num_blocks, config.block_size, self.device, self.dtype, backend
        )
        if config.cuda_graphs:
            self.runner.capture_cuda_graphs(min(config.max_num_seqs, 512), self.max_model_len)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
            ),
            self.block_manager,
        )
        self.sampler = Sampler()
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(
            self.model_config.eos_token_ids
        )
        self._requests: dict[str, _Request] = {}
        self.total_prompt_tokens = 0
        self.total_generation_tokens = 0
        self.num_preemptions = 0

    # -- requests --------------------------------------------------------------------------
    @property
    def limits(self) -> RequestLimits:
        bm = self.block_manager
        return RequestLimits(self.vocab_size, self.max_model_len, bm.block_size, bm.num_blocks)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise SamplingParamsError or PromptTooLongError for a request that cannot run."""
        check_request(self.limits, prompt_token_ids, params)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        self.check_request(prompt_token_ids, params)
        cap = self.max_model_len - len(prompt_token_ids)
        max_tokens = min(params.max_tokens or cap, cap)
        req = _Request(request_id, params, list(prompt_token_ids))
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            max_tokens=max_tokens,
            fork_n=params.n,
            arrival_time=time.monotonic(),
        )
        self._add_seq(req, seq)
        self._requests[request_id] = req
        self.scheduler.add(seq)
        self.total_prompt_tokens += len(prompt_token_ids)

    def _add_seq(self, req: _Request, seq: Sequence) -> None:
        req.seqs.append(seq)
        req.detoks[seq.seq_id] = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, req.params.stop
        )
        gen: torch.Generator | None = None
        if req.params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed((req.params.seed * 1_000_003 + seq.index * 7_919) % (2**63))
        req.generators[seq.seq_id] = gen

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End every sequence of the request now and free its blocks."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        changed = []
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
                changed.append(seq)
        return self._request_output(req, changed, {}, {}, error=None)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_used_blocks=bm.num_used_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=bm.num_blocks,
            kv_cache_usage=bm.usage,
            prefix_cache_hit_rate=bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
            total_prompt_tokens=self.total_prompt_tokens,
            total_generation_tokens=self.total_generation_tokens,
            num_preemptions=self.num_preemptions,
        )

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self.num_preemptions += len(sched.preempted)
        outputs: list[RequestOutput] = []
        for seq in sched.failed:
            outputs.extend(self._fail([seq], "the KV cache is too small for this request"))
        if sched.is_empty:
            return outputs
        sample_idx = [i for i in range(len(sched.seqs)) if sched.samples(i)]
        try:
            logits = self.runner.execute(sched, sample_idx)
        except Exception as exc:  # a failed batch fails only the requests in it
            log.exception("engine step failed")
            return outputs + self._fail(list(sched.seqs), f"engine error: {exc}")
        self.scheduler.update_after_step(sched)
        try:
            outputs.extend(self._postprocess(sched, sample_idx, logits))
        except Exception as exc:  # sampling or detokenizing failed: the same, for this batch
            log.exception("engine step failed after the forward pass")
            return outputs + self._fail(list(sched.seqs), f"engine error: {exc}")
        return outputs

    def _fail(self, seqs: list[Sequence], message: str) -> list[RequestOutput]:
        outs = []
        for req_id in dict.fromkeys(s.request_id for s in seqs):
            req = self._requests.get(req_id)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, FinishReason.ERROR)
                seq.finish_reason = FinishReason.ERROR
            outs.append(self._request_output(req, req.seqs, {}, {}, error=message))
        return outs

    def _postprocess(
        self, sched: SchedulerOutput, sample_idx: list[int], logits: torch.Tensor
    ) -> list[RequestOutput]:
        rows: list[int] = []
        row_seqs: list[Sequence] = []
        for j, i in enumerate(sample_idx):
            seq = sched.seqs[i]
            if seq.is_finished:
                continue
            rows.append(j)
            row_seqs.append(seq)
            if seq.fork_n > 1:
                req = self._requests[seq.request_id]
                for k in range(1, seq.fork_n):
                    child = Sequence(
                        request_id=seq.request_id,
                        prompt_token_ids=seq.prompt_token_ids,
                        params=seq.params,
                        index=k,
                        max_tokens=seq.max_tokens,
                        token_ids=list(seq.token_ids),
                        arrival_time=seq.arrival_time,
                    )
                    self.block_manager.fork(seq, child)
                    self.scheduler.add_running(child, after=seq)
                    self._add_seq(req, child)
                    rows.append(j)
                    row_seqs.append(child)
                seq.fork_n = 1
        if not rows:
            return []
        row_logits = (
            logits[torch.tensor(rows, device=logits.device)]
            if len(rows) != len(sample_idx)
            else logits
        )
        params = [s.params for s in row_seqs]
        banned = [
            sorted(self.eos_token_ids)
            if s.params.min_tokens and s.num_output_tokens < s.params.min_tokens
            else []
            for s in row_seqs
        ]
        gens = [self._requests[s.request_id].generators[s.seq_id] for s in row_seqs]
        batch = build_batch(
            params,
            [s.output_token_ids for s in row_seqs]
            if any(p.presence_penalty or p.frequency_penalty for p in params)
            else [[] for _ in row_seqs],
            gens,
            banned,
            self.vocab_size,
            self.device,
        )
        result = self.sampler(row_logits, batch)
        now = time.monotonic()
        changed: dict[str, list[Sequence]] = {}
        new_tokens: dict[int, int] = {}
        logprobs_by_seq: dict[int, TokenLogprob] = {}
        for r, (seq, token) in enumerate(zip(row_seqs, result.token_ids, strict=True)):
            seq.append_token(token)
            new_tokens[seq.seq_id] = token
            self.total_generation_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            req = self._requests[seq.request_id]
            detok = req.detoks[seq.seq_id]
            if result.logprobs is not None and seq.params.logprobs is not None:
                logprobs_by_seq[seq.seq_id] = self._token_logprob(
                    token, result.logprobs[r], seq.params.logprobs
                )
            reason = self._check_stop(seq, token, detok)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            changed.setdefault(seq.request_id, []).append(seq)
        return [
            self._request_output(self._requests[rid], seqs, new_tokens, logprobs_by_seq, error=None)
            for rid, seqs in changed.items()
        ]

    def _check_stop(
        self, seq: Sequence, token: int, detok: IncrementalDetokenizer
    ) -> FinishReason | None:
        p = seq.params
        if (
            not p.ignore_eos
            and token in self.eos_token_ids
            and seq.num_output_tokens > p.min_tokens - 1
        ):
            seq.stop_reason = token if token not in self.tokenizer.eos_token_ids else None
            return FinishReason.STOP
        if token in p.stop_token_ids:
            seq.stop_reason = token
            return FinishReason.STOP
        detok.add_token(token)
        if detok.stopped_by is not None:
            seq.stop_reason = detok.stopped_by
            return FinishReason.STOP
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _token_logprob(
        self, token: int, lp: tuple[float, list[int], list[float]], k: int
    ) -> TokenLogprob:
        tok = self.tokenizer
        chosen, top_ids, top_vals = lp
        top = [
            (tid, tok.id_to_token(tid), val, list(tok.token_bytes(tid)))
            for tid, val in zip(top_ids[:k], top_vals[:k], strict=True)
        ]
        return TokenLogprob(
            token, tok.id_to_token(token), chosen, list(tok.token_bytes(token)), top
        )

    def _request_output(
        self,
        req: _Request,
        seqs: Seq[Sequence],
        new_tokens: dict[int, int],
        logprobs_by_seq: dict[int, TokenLogprob],
        error: str | None,
    ) -> RequestOutput:
        outs = []
        for seq in seqs:
            detok = req.detoks[seq.seq_id]
            finished = seq.finish_reason is not None
            lp = logprobs_by_seq.get(seq.seq_id)
            token = new_tokens.get(seq.seq_id)
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text_delta=detok.flush_delta(final=finished),
                    token_ids_delta=[] if token is None else [token],
                    logprobs_delta=[lp] if lp is not None else None,
                    text=detok.text,
                    num_output_tokens=seq.num_output_tokens,
                    finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                    stop_reason=seq.stop_reason,
                )
            )
        finished_all = all(seq.finish_reason is not None for seq in req.seqs)
        if finished_all:
            del self._requests[req.request_id]
        return RequestOutput(
            request_id=req.request_id,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_cached_tokens=req.seqs[0].num_cached_tokens if req.seqs else 0,
            outputs=outs if len(outs) == 1 else sorted(outs, key=lambda o: o.index),
            finished=finished_all,
            error=error,
        )
