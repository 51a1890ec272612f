"""Which dtype an engine runs with on the CPU it has."""

from __future__ import annotations

import logging

import pytest
import torch

from inferhub.engine import device

CPU = torch.device("cpu")


def test_auto_dtype_follows_the_cpus_bfloat16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert device.resolve_dtype("auto", CPU) == torch.float32
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert device.resolve_dtype("auto", CPU) == torch.bfloat16


def test_bfloat16_asked_for_on_a_cpu_without_it_runs_but_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="inferhub.engine.device"):
        assert device.resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert "slower than float32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="inferhub.engine.device"):
        assert device.resolve_dtype("bfloat16", CPU) == torch.bfloat16
        assert device.resolve_dtype("float32", CPU) == torch.float32
    assert caplog.text == ""
    with pytest.raises(ValueError, match="float16 is only supported on CUDA"):
        device.resolve_dtype("float16", CPU)
