"""Incremental detokenization: whole UTF-8 characters only, stop strings across tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from inferhub.engine.detokenizer import IncrementalDetokenizer

TEXT = "Hello, world! 你好，世界！今天天气很好。Emoji: 😀 🚀 ❤️ 👍 done."


@pytest.fixture(scope="module")
def tok(tiny_hf: dict[str, Path]) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_hf["qwen2"])


def stream(
    tok: PreTrainedTokenizerBase, text: str, stop: list[str]
) -> tuple[list[str], IncrementalDetokenizer]:
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [5, 6, 7], stop)
    deltas = []
    for t in ids:
        detok.add_token(t)
        deltas.append(detok.flush_delta())
        if detok.stopped_by is not None:
            break
    deltas.append(detok.flush_delta(final=True))
    return deltas, detok


def test_multibyte_characters_are_never_split(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode(TEXT, add_special_tokens=False)
    # the tiny vocabulary splits some characters over several byte tokens
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    deltas, detok = stream(tok, TEXT, [])
    assert "".join(deltas) == TEXT == detok.text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("stop", ["world! 你", "天气", "🚀", "done."])
def test_stop_strings_match_across_tokens_and_are_never_sent(
    tok: PreTrainedTokenizerBase, stop: str
) -> None:
    deltas, detok = stream(tok, TEXT, ["never-here", stop])
    expected = TEXT[: TEXT.index(stop)]
    assert detok.stopped_by == stop
    assert "".join(deltas) == expected == detok.text


def test_partial_stop_prefix_is_held_back_then_released(tok: PreTrainedTokenizerBase) -> None:
    ids = tok.encode("Hello, world!", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], ["world?"])
    sent = ""
    for t in ids:
        detok.add_token(t)
        sent += detok.flush_delta()
        # never send text that may turn out to be the start of the stop string
        assert not any(sent.endswith("world?"[:k]) for k in range(1, 6)) or sent.endswith("!")
    sent += detok.flush_delta(final=True)
    assert sent == "Hello, world!" and detok.stopped_by is None


def test_special_tokens_are_not_in_the_text(tok: PreTrainedTokenizerBase) -> None:
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    detok = IncrementalDetokenizer(tok, [], [])
    for t in [*tok.encode("Hi", add_special_tokens=False), eos]:
        detok.add_token(t)
    assert detok.flush_delta(final=True) == "Hi"
