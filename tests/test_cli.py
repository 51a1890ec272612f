"""The `inferhub` command: argument handling and the safety checks without a model; generate,
chat and serve wiring with a fake engine; generate and chat on the real embedded model (slow)."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "server"))

from fakes import FakeEngine

from inferhub import cli
from inferhub.gateway.static import OpenAccess, StaticKeys
from inferhub.server.run import Server


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
     ("0.0.0.0", False), ("192.168.1.5", False), ("::", False), ("example.com", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert cli.is_loopback(host) is loopback


def test_model_specs() -> None:
    assert cli._model_specs(["a=/m/x.gguf", "/m/Qwen2-0.5B.gguf", "/m/llama-dir"]) == [
        ("a", "/m/x.gguf"),
        ("Qwen2-0.5B", "/m/Qwen2-0.5B.gguf"),
        ("llama-dir", "/m/llama-dir"),
    ]
    with pytest.raises(ValueError, match="share a name"):
        cli._model_specs(["a=/x", "a=/y"])
    name, path = cli._model_specs([])[0]
    assert name == "SmolLM2-135M-Instruct" and path.endswith(".gguf")


def test_sizes() -> None:
    assert cli._size("2G") == 2 * 2**30 and cli._size("512MiB") == 512 * 2**20
    assert cli._size("1000") == 1000


def test_serve_refuses_public_host_without_keys(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("INFERHUB_API_KEYS", raising=False)
    assert cli.main(["serve", "--no-auth", "--host", "0.0.0.0"]) == 2
    assert "refusing to serve on 0.0.0.0 without API keys" in capsys.readouterr().err


def serve_with_fakes(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> dict[str, Any]:
    """Run `inferhub serve` with fake engines and without listening; returns what it built."""
    built: dict[str, Any] = {"placements": []}

    def fake(placement: str) -> Callable[[Any], FakeEngine]:
        def build(config: Any) -> FakeEngine:
            built["placements"].append(placement)
            return FakeEngine(config.name)

        return build

    monkeypatch.setattr("inferhub.engine.async_engine.AsyncEngine", fake("thread"))
    monkeypatch.setattr("inferhub.engine.engine_process.ProcessEngine", fake("process"))

    def run(server: Server) -> None:
        built["state"] = server.state
        built["config"] = server.config

    monkeypatch.setattr(Server, "run", run)
    assert cli.main(["serve", *argv]) == 1  # "not started": run() did not serve
    return built


def test_serve_runs_each_engine_in_a_process_unless_told_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("INFERHUB_API_KEYS", raising=False)
    models = ["--no-auth", "--model", "a=/a.gguf", "--model", "b=/b.gguf"]
    assert serve_with_fakes(monkeypatch, models)["placements"] == ["process", "process"]
    in_thread = serve_with_fakes(monkeypatch, [*models, "--engine-in-thread"])
    assert in_thread["placements"] == ["thread", "thread"]


def test_serve_keys_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERHUB_API_KEYS", "sk-env-1, sk-env-2")
    built = serve_with_fakes(monkeypatch, ["--host", "0.0.0.0", "--model", "m=/x.gguf"])
    state = built["state"]
    assert isinstance(state.gatekeeper, StaticKeys) and state.config.api_keys == [
        "sk-env-1",
        "sk-env-2",
    ]
    assert list(state.engines) == ["m"] and built["config"].host == "0.0.0.0"
    built = serve_with_fakes(monkeypatch, ["--api-key", "sk-flag", "--model", "m=/x.gguf"])
    assert built["state"].config.api_keys == ["sk-flag"]


def test_serve_open_on_loopback_and_several_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERHUB_API_KEYS", raising=False)
    built = serve_with_fakes(
        monkeypatch,
        [
            "--no-auth",
            "--model",
            "a=/a.gguf",
            "--model",
            "b=/b",
            "--port",
            "0",
            "--drain-timeout",
            "5",
        ],
    )
    assert isinstance(built["state"].gatekeeper, OpenAccess)
    assert list(built["state"].engines) == ["a", "b"]
    assert built["config"].timeout_graceful_shutdown == 5
    assert all(m.weight_quant == "none" for m in built["state"].config.models)


def test_serve_weight_quant_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERHUB_API_KEYS", raising=False)
    argv = ["--no-auth", "--model", "a=/a.gguf", "--weight-quant", "auto"]
    built = serve_with_fakes(monkeypatch, argv)
    assert [m.weight_quant for m in built["state"].config.models] == ["auto"]
    with pytest.raises(SystemExit):
        cli.main(["serve", "--weight-quant", "int3"])


def test_generate_streams_the_answer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = FakeEngine()
    monkeypatch.setattr(cli, "_load", lambda args: engine)
    assert cli.main(["generate", "--temperature", "0", "--system", "Be brief.", "hi"]) == 0
    assert capsys.readouterr().out == "Hello, world! 你好\n"
    _, prompt, params = engine.requests[0]
    assert engine.tokenizer.decode(prompt) == "<system>Be brief.<user>hi<assistant>"
    assert (params.temperature, params.max_tokens) == (0.0, 512)
    assert engine.stopped
    assert cli.main(["generate", "--raw", "--max-tokens", "3", "plain"]) == 0
    assert capsys.readouterr().out == "Hel\n"
    assert engine.tokenizer.decode(engine.requests[1][1]) == "plain"


def test_chat_keeps_history_and_resets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = FakeEngine(reply="ok")
    monkeypatch.setattr(cli, "_load", lambda args: engine)
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n/reset\nthree\n"))
    assert cli.main(["chat"]) == 0  # EOF ends the chat
    prompts = [engine.tokenizer.decode(p) for _, p, _ in engine.requests]
    assert prompts == [
        "<user>one<assistant>",
        "<user>one<assistant>ok<user>two<assistant>",
        "<user>three<assistant>",
    ]
    assert capsys.readouterr().out.count("ok\n") == 3


@pytest.mark.slow
def test_generate_on_the_embedded_model() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "inferhub.cli", "generate", "--temperature", "0", "--max-tokens", "12",
         "What is the capital of France?"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


@pytest.mark.slow
def test_chat_on_the_embedded_model() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "inferhub.cli", "chat", "--temperature", "0", "--max-tokens", "16"],
        input="What is the capital of France?\n/exit\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
