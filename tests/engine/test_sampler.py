"""Sampler semantics one by one, on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from inferhub.engine.sampler import Sampler, argmax, build_batch
from inferhub.engine.sampling_params import SamplingParams, SamplingParamsError

V = 10
CPU = torch.device("cpu")


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
    banned: list[list[int]] | None = None,
) -> list[int]:
    n = len(params)
    batch = build_batch(
        params,
        outputs or [[] for _ in range(n)],
        generators or [None] * n,
        banned or [[] for _ in range(n)],
        logits.shape[1],
        CPU,
    )
    return Sampler()(logits.clone(), batch).token_ids


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, V)
    assert sample(logits, [SamplingParams(temperature=0)] * 4) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_argmax_matches_torch_argmax_and_takes_the_first_of_ties(dtype: torch.dtype) -> None:
    logits = torch.randn(64, 49152).to(dtype)
    assert torch.equal(argmax(logits), logits.argmax(-1))
    tied = torch.zeros(3, 1000, dtype=dtype)
    tied[0, [5, 900]] = 1.0
    tied[1, [0, 999]] = 2.0
    assert argmax(tied).tolist() == [5, 0, 0]


def test_logit_bias_plus_100_forces_and_minus_100_bans() -> None:
    logits = torch.randn(3, V)
    forced = SamplingParams(temperature=1.0, logit_bias={7: 100})
    assert sample(logits, [forced] * 3) == [7, 7, 7]
    top = int(logits[0].argmax())
    banned = SamplingParams(temperature=0, logit_bias={top: -100})
    assert sample(logits[:1], [banned])[0] != top


def test_frequency_penalty_counts_each_occurrence() -> None:
    logits = torch.zeros(1, V)
    logits[0, 3] = 2.5
    logits[0, 4] = 2.0
    # token 3 appeared twice: 2.5 - 2*0.5 = 1.5 < 2.0 -> 4 wins
    p = SamplingParams(temperature=0, frequency_penalty=0.5)
    assert sample(logits, [p], outputs=[[3, 3]]) == [4]
    # once: 2.5 - 0.5 = 2.0 ties, argmax keeps the first (3); any other token is untouched
    assert sample(logits, [p], outputs=[[3, 9]]) == [3]


def test_presence_penalty_is_flat() -> None:
    logits = torch.zeros(1, V)
    logits[0, 3] = 2.5
    logits[0, 4] = 2.0
    p = SamplingParams(temperature=0, presence_penalty=0.4)
    assert sample(logits, [p], outputs=[[3, 3, 3, 3]]) == [3]  # 2.1 > 2.0: count not used
    p = SamplingParams(temperature=0, presence_penalty=0.6)
    assert sample(logits, [p], outputs=[[3]]) == [4]


def test_negative_penalty_encourages_repeats() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5] = 1.0
    p = SamplingParams(temperature=0, frequency_penalty=-2.0)
    assert sample(logits, [p], outputs=[[2]]) == [2]


def test_penalties_apply_per_row_only() -> None:
    logits = torch.zeros(2, V)
    logits[:, 3] = 2.5
    logits[:, 4] = 2.0
    rows = [SamplingParams(temperature=0, presence_penalty=1.0), SamplingParams(temperature=0)]
    assert sample(logits, rows, outputs=[[3], [3]]) == [4, 3]


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4)])
    logits = torch.log(probs.clamp(min=1e-30))
    p = SamplingParams(temperature=1.0, top_p=0.8)
    seen = {t for _ in range(300) for t in sample(logits, [p])}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8: token 2 is outside the nucleus
    p = SamplingParams(temperature=1.0, top_p=0.81)
    seen = {t for _ in range(400) for t in sample(logits, [p])}
    assert seen == {0, 1, 2}
    p = SamplingParams(temperature=1.0, top_p=0.4)
    assert {t for _ in range(50) for t in sample(logits, [p])} == {0}


def test_top_k_and_min_p() -> None:
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1] + [1e-9] * (V - 4)]))
    seen = {t for _ in range(300) for t in sample(logits, [SamplingParams(top_k=2)])}
    assert seen == {0, 1}
    seen = {t for _ in range(300) for t in sample(logits, [SamplingParams(min_p=0.6)])}
    assert seen == {0, 1}  # floor 0.24: 0.4 and 0.3 stay


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.3] + [1e-12] * (V - 2)]))
    tokens = [sample(logits, [SamplingParams(temperature=1.0)])[0] for _ in range(2000)]
    share = tokens.count(0) / len(tokens)
    assert abs(share - 0.7) < 0.05


def test_each_row_follows_its_own_distribution_and_cut_tokens_never_come() -> None:
    rows = [
        [0.0, 0.0, 0.5, 0.5] + [0.0] * (V - 4),  # leading and trailing zeros after top_k
        [0.9, 0.1] + [0.0] * (V - 2),
        [0.0] * (V - 1) + [1.0],  # only the last token
    ]
    logits = torch.log(torch.tensor(rows)).repeat(300, 1)  # log 0 = -inf: never drawn
    params = [SamplingParams(temperature=1.0)] * logits.shape[0]
    tokens = torch.tensor(sample(logits, params)).view(300, 3)
    assert set(tokens[:, 0].tolist()) == {2, 3}
    assert abs((tokens[:, 0] == 2).float().mean().item() - 0.5) < 0.1
    assert set(tokens[:, 1].tolist()) == {0, 1}
    assert abs((tokens[:, 1] == 0).float().mean().item() - 0.9) < 0.06
    assert set(tokens[:, 2].tolist()) == {V - 1}


def test_low_temperature_sharpens() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.4] + [1e-12] * (V - 2)]))
    tokens = [sample(logits, [SamplingParams(temperature=0.05)])[0] for _ in range(200)]
    assert tokens.count(0) > 195


def test_seed_is_reproducible_and_independent_of_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, V)
    p = SamplingParams(temperature=1.0, seed=42)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(42)

    alone = [sample(logits[2:3], [p], generators=[g])[0] for g in [gen()]]
    # the same row inside a batch with other unseeded rows: the same draw
    others = [SamplingParams(temperature=1.0)] * 5
    rows = [*others[:2], p, *others[3:]]
    gens: list[torch.Generator | None] = [None, None, gen(), None, None]
    for _ in range(5):
        gens[2] = gen()
        assert sample(logits, rows, generators=gens)[2] == alone[0]
    # a sequence of draws from one generator repeats exactly
    g1, g2 = gen(), gen()
    seq1 = [sample(logits[2:3], [p], generators=[g1])[0] for _ in range(20)]
    seq2 = [sample(logits[2:3], [p], generators=[g2])[0] for _ in range(20)]
    assert seq1 == seq2 and len(set(seq1)) > 1


def test_banned_tokens_cannot_be_sampled() -> None:
    logits = torch.zeros(1, V)
    logits[0, 2] = 50.0
    assert sample(logits, [SamplingParams(temperature=0)], banned=[[2]]) != [2]


def test_logprobs_are_of_the_raw_distribution() -> None:
    logits = torch.randn(2, V)
    p = SamplingParams(temperature=0, logprobs=3)
    batch = build_batch([p, p], [[], []], [None, None], [[], []], V, CPU)
    out = Sampler()(logits.clone(), batch)
    assert out.logprobs is not None
    ref = torch.log_softmax(logits, -1)
    for row in range(2):
        chosen, ids, vals = out.logprobs[row]
        assert math.isclose(chosen, float(ref[row].max()), rel_tol=1e-5)
        assert ids == ref[row].topk(3).indices.tolist()
        assert vals == pytest.approx(ref[row].topk(3).values.tolist(), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {1: 101}}, "logit_bias"),
        ({"logit_bias": {V + 5: 1}}, "logit_bias"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 21}, "top_logprobs"),
    ],
)
def test_out_of_range_values_name_the_field(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**kwargs).validate(vocab_size=V)  # type: ignore[arg-type]
    assert err.value.param == param
