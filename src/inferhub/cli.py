"""The `inferhub` command: `generate` and `chat` run one model in this process, `serve` runs
the OpenAI-compatible API server; the gateway adds its own subcommands where it has them."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import ipaddress
import logging
import os
import queue
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferhub import __version__
from inferhub.config import EngineConfig, ServerConfig, env_api_keys

if TYPE_CHECKING:
    from inferhub.engine.async_engine import AsyncEngine
    from inferhub.engine.outputs import CompletionOutput
    from inferhub.engine.sampling_params import SamplingParams
    from inferhub.gateway.interface import Gatekeeper

log = logging.getLogger("inferhub")


# -- shared arguments ----------------------------------------------------------------------------


def _size(text: str) -> int:
    """Bytes from "2G", "512MiB", "1000000"."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2G, 512M)") from exc


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    g.add_argument("--kv-cache-memory", type=_size, help="KV cache size, e.g. 2G")
    g.add_argument("--max-num-seqs", type=int, default=128, help="sequences per batch")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument(
        "--weight-quant",
        default="none",
        choices=["auto", "none", "int4"],
        help="CPU 4-bit weights for small batches: auto = a GGUF file's Q4_0/Q4_1 weights as "
        "they are (exact); int4 = also quantize the other projections (lossy); none = dense "
        "only (default: the same greedy text whatever the batch)",
    )


def _engine_config(args: argparse.Namespace, path: str, name: str) -> EngineConfig:
    return EngineConfig(
        model=path,
        name=name,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        num_threads=args.threads,
        weight_quant=args.weight_quant,
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--system", help="a system message")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    from inferhub.engine.sampling_params import SamplingParams

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        stop=list(args.stop),
    )
    params.validate()
    return params


def _default_model() -> tuple[str, str]:
    from inferhub.models.default import DEFAULT_MODEL_NAME, default_model_path

    return DEFAULT_MODEL_NAME, default_model_path()


def _name_of(path: str) -> str:
    p = Path(path)
    return p.stem if p.suffix == ".gguf" else p.name


# -- generate / chat: one engine driven from synchronous code --------------------------------------


class EngineSession:
    """Runs an AsyncEngine and an event loop in background threads, so that a terminal can
    stream one request at a time; leaving `stream()` early aborts the request."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        engine.start()

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[CompletionOutput]:
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()

        async def run() -> None:
            try:
                async for out in self.engine.generate(f"cli-{uuid.uuid4().hex}", prompt, params):
                    for c in out.outputs:
                        items.put(c)
            except BaseException as exc:  # handed to the reading thread
                items.put(exc)
                raise
            finally:
                items.put(None)

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            while (item := items.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            future.cancel()  # a no-op when done; otherwise the engine aborts the request

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def _load(args: argparse.Namespace) -> AsyncEngine:
    from inferhub.engine.async_engine import AsyncEngine

    name, path = (_name_of(args.model), args.model) if args.model else _default_model()
    return AsyncEngine(_engine_config(args, path, name))


def _write_stream(session: EngineSession, prompt: list[int], params: SamplingParams) -> str:
    parts: list[str] = []
    for c in session.stream(prompt, params):
        sys.stdout.write(c.text_delta)
        sys.stdout.flush()
        parts.append(c.text_delta)
        if c.finish_reason == "length":
            print("\n[stopped: max tokens]", file=sys.stderr, end="")
    print()
    return "".join(parts)


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    session = EngineSession(_load(args))
    try:
        tok = session.engine.tokenizer
        if args.raw:
            prompt = tok.encode(args.prompt)
        else:
            system = [{"role": "system", "content": args.system}] if args.system else []
            prompt = tok.apply_chat_template([*system, {"role": "user", "content": args.prompt}])
        _write_stream(session, prompt, params)
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        session.close()


def cmd_chat(args: argparse.Namespace) -> int:
    from inferhub.engine.errors import PromptTooLongError

    params = _sampling_params(args)
    session = EngineSession(_load(args))
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    print(
        f"Chatting with {session.engine.name}. /reset forgets the conversation, /exit or Ctrl-D "
        "quits, Ctrl-C stops an answer.",
        file=sys.stderr,
    )
    try:
        while True:
            try:
                line = input(">>> ")
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                history = list(start)
                continue
            history.append({"role": "user", "content": line})
            try:
                reply = _write_stream(
                    session, session.engine.tokenizer.apply_chat_template(history), params
                )
            except PromptTooLongError as exc:
                history.pop()
                print(f"error: {exc} (/reset starts over)", file=sys.stderr)
                continue
            except KeyboardInterrupt:
                print("\n[stopped]", file=sys.stderr)
                history.pop()
                continue
            history.append({"role": "assistant", "content": reply})
    finally:
        session.close()


# -- serve ---------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _model_specs(values: list[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` or `PATH` (named after the file) -> (name, path); default: the embedded model."""
    if not values:
        return [_default_model()]
    specs = []
    for value in values:
        name, sep, path = value.partition("=")
        specs.append((name, path) if sep and name else (_name_of(value), value))
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a name: {names}")
    return specs


def build_gatekeeper(config: ServerConfig, announce: Callable[[str], None] = print) -> Gatekeeper:
    """Who may call and what it costs: the database gateway (the default; its first start
    creates the admin account and passes its key to `announce` once), or the simple modes,
    a fixed key list or, on loopback, open access."""
    from inferhub.gateway.static import OpenAccess, StaticKeys

    if config.open_access:
        return OpenAccess()
    if config.api_keys:
        return StaticKeys(config.api_keys)
    from inferhub.gateway.factory import REDIS_TOKENS_FLUSH_S, create_gateway
    from inferhub.gateway.gateway import GatewaySettings

    settings = GatewaySettings(
        instance=config.instance,
        tokens_flush_interval_s=REDIS_TOKENS_FLUSH_S if config.redis_url else 0.0,
    )
    return create_gateway(
        config.database_url,
        config.data_dir,
        config.redis_url,
        admin_key=config.admin_key,
        settings=settings,
        announce=announce,
        redis_failure="closed" if config.redis_failure == "closed" else "memory",
    )


def _auth_error(args: argparse.Namespace, keys: list[str]) -> str | None:
    """Why the authentication options do not go together, if they do not."""
    unused = [
        f for f, v in (("--database-url", args.database_url), ("--redis-url", args.redis_url)) if v
    ]
    if args.no_auth and keys:
        return "--no-auth and API keys (--api-key, INFERHUB_API_KEYS) exclude each other"
    if (args.no_auth or keys) and unused:
        mode = "--no-auth" if args.no_auth else "--api-key (or INFERHUB_API_KEYS)"
        return f"{mode} runs without the database gateway; {' and '.join(unused)} would be unused"
    if args.no_auth and not is_loopback(args.host):
        return (
            f"refusing to serve on {args.host} without API keys; drop --no-auth (keys and "
            "billing from the database gateway), pass --api-key, or bind to 127.0.0.1"
        )
    return None


def _describe_auth(config: ServerConfig, gatekeeper: Gatekeeper) -> str:
    if config.open_access:
        return "no API keys: open to this machine only"
    if config.api_keys:
        return f"{len(config.api_keys)} static API key(s), no billing"
    from inferhub.gateway.db import redact_url
    from inferhub.gateway.gateway import DatabaseGateway

    assert isinstance(gatekeeper, DatabaseGateway)
    limits = "rate limits in Redis" if config.redis_url else "rate limits in memory"
    return f"keys and billing in {redact_url(gatekeeper.db.url)}, {limits}"


def cmd_serve(args: argparse.Namespace) -> int:
    keys = list(args.api_key) or env_api_keys()
    args.redis_url = args.redis_url or os.environ.get("INFERHUB_REDIS_URL")
    if (problem := _auth_error(args, keys)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        specs = _model_specs(args.model)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from inferhub.engine.async_engine import AsyncEngine
    from inferhub.engine.engine_process import ProcessEngine
    from inferhub.server.app import create_app
    from inferhub.server.run import run_server

    engine_class = AsyncEngine if args.engine_in_thread else ProcessEngine
    engines: dict[str, AsyncEngine | ProcessEngine] = {}
    for name, path in specs:
        print(f"inferhub: loading {name} from {path}", file=sys.stderr)
        try:
            engines[name] = engine_class(_engine_config(args, path, name))
        except Exception as exc:
            print(f"error: cannot load {name} from {path}: {exc}", file=sys.stderr)
            return 1
    config = ServerConfig(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir),
        api_keys=keys,
        models=[_engine_config(args, path, name) for name, path in specs],
        max_body_bytes=args.max_body_bytes,
        open_access=args.no_auth,
        database_url=args.database_url,
        redis_url=args.redis_url,
        instance=args.instance or socket.gethostname() or "default",
        admin_key=os.environ.get("INFERHUB_ADMIN_KEY") or None,
        redis_failure=args.redis_failure,
        max_queued_requests=args.max_queued_requests,
        request_timeout_s=args.request_timeout or None,
    )
    try:
        # The first start prints the admin key here, on stdout, just before the URL line.
        gatekeeper = build_gatekeeper(config, announce=lambda text: print(text, flush=True))
    except Exception as exc:
        print(f"error: cannot start the database gateway: {exc}", file=sys.stderr)
        return 1
    app = create_app(config, engines, gatekeeper)
    auth = _describe_auth(config, gatekeeper)

    def announce(url: str) -> None:
        print(f"inferhub: serving {', '.join(engines)} at {url} ({auth}; Ctrl-C stops)", flush=True)

    started = run_server(
        app,
        host=args.host,
        port=args.port,
        drain_timeout=args.drain_timeout,
        debug=args.log_level == "debug",
        announce=announce,
    )
    print("inferhub: stopped", file=sys.stderr)
    return 0 if started else 1


# -- the parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferhub", description=__doc__)
    parser.add_argument("--version", action="version", version=f"inferhub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate one answer to a prompt and print it")
    gen.add_argument("--model", help="a Hugging Face folder or .gguf file (default: embedded)")
    gen.add_argument("--raw", action="store_true", help="no chat template: complete the text")
    gen.add_argument("prompt")
    _add_sampling_args(gen)
    _add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("--model", help="a Hugging Face folder or .gguf file (default: embedded)")
    _add_sampling_args(chat)
    _add_engine_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible API server")
    serve.add_argument(
        "--model", action="append", default=[], metavar="NAME=PATH",
        help="a model to serve (repeatable; default: the embedded SmolLM2-135M-Instruct)",
    )  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--data-dir", default="data", help="where the gateway keeps its data")
    auth = serve.add_argument_group(
        "keys and billing",
        "By default the database gateway decides who may call and bills every request; its "
        "first start creates the admin account and prints its key once (or takes "
        "INFERHUB_ADMIN_KEY). --api-key and --no-auth are simple modes without it.",
    )
    auth.add_argument(
        "--database-url", metavar="URL",
        help="postgresql://... (or INFERHUB_DATABASE_URL; default: SQLite in --data-dir)",
    )  # fmt: skip
    auth.add_argument(
        "--redis-url", metavar="URL",
        help="redis://... to share rate limits between replicas (or INFERHUB_REDIS_URL)",
    )  # fmt: skip
    auth.add_argument(
        "--redis-failure", choices=["memory", "closed"], default="memory",
        help="while Redis is unreachable: keep rate limits per replica in memory (default) "
        "or refuse requests with 503",
    )  # fmt: skip
    auth.add_argument(
        "--instance", metavar="NAME",
        help="this replica's name, unique among the replicas sharing a database and stable "
        "across its restarts (default: the host name)",
    )  # fmt: skip
    auth.add_argument(
        "--api-key", action="append", default=[],
        help="simple mode: an accepted API key, no billing (repeatable; or INFERHUB_API_KEYS=k1,k2)",
    )  # fmt: skip
    auth.add_argument(
        "--no-auth", action="store_true",
        help="simple mode: no keys, no billing; anyone on this machine may call (loopback only)",
    )  # fmt: skip
    serve.add_argument("--max-body-bytes", type=_size, default=ServerConfig().max_body_bytes)
    serve.add_argument(
        "--max-queued-requests", type=int, default=ServerConfig().max_queued_requests,
        metavar="N",
        help="requests waiting for a model beyond N get 503 with Retry-After at once",
    )  # fmt: skip
    serve.add_argument(
        "--request-timeout", type=float, default=ServerConfig().request_timeout_s,
        metavar="SECONDS",
        help="abort a request still running after this long (504; 0: no limit)",
    )  # fmt: skip
    serve.add_argument(
        "--drain-timeout", type=int, default=30,
        help="seconds running requests get to finish at shutdown before they are aborted",
    )  # fmt: skip
    serve.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="inferhub's log level (one line per request at info; debug adds HTTP access logs)",
    )  # fmt: skip
    _add_engine_args(serve)
    serve.add_argument(
        "--engine-in-thread", action="store_true",
        help="run each engine in a thread of the server process instead of its own process "
        "(the two then share one GIL: slower under load; see docs/benchmarks.md)",
    )  # fmt: skip
    serve.set_defaults(func=cmd_serve)

    # -- the gateway's subcommands (accounts, keys, prices, ...) register themselves here --
    if importlib.util.find_spec("inferhub.gateway.cli") is not None:
        importlib.import_module("inferhub.gateway.cli").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "database_url"):  # serve and the gateway's commands: the same database
        args.database_url = args.database_url or os.environ.get("INFERHUB_DATABASE_URL")
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.setLevel(getattr(args, "log_level", "warning").upper())
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
