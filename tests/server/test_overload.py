"""Overload and time limits: a full queue answers 503 with Retry-After at once, a request
over its time limit is aborted (504 or an error event) and billed for what it generated, and a
client that reads slowly neither blocks the server nor its own stream."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from fakes import (
    AUTH,
    KEY,
    FakeEngine,
    RecordingGatekeeper,
    chat,
    error,
    parse_sse,
    post,
    running_server,
)

from inferhub.config import ServerConfig


def stream_body(url: str, body: dict[str, object]) -> str:
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30
    ) as r:
        assert r.status_code == 200
        return r.read().decode()


def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_full_queue_refuses_at_once_with_retry_after_and_recovers() -> None:
    hold = threading.Event()
    engine = FakeEngine(hold=hold)
    gatekeeper = RecordingGatekeeper(keys=[KEY])
    config = ServerConfig(max_queued_requests=3)
    with running_server({"fake": engine}, gatekeeper, config) as url, ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(stream_body, url, chat(stream=True)) for _ in range(3)]
        wait_for(lambda: len(engine.requests) == 3)

        started = time.monotonic()
        r = post(url, "/v1/chat/completions", chat(), timeout=10)
        elapsed = time.monotonic() - started
        err = error(r, 503)
        assert err["type"] == "server_error" and err["code"] == "server_overloaded"
        assert "3 requests are already waiting" in err["message"]
        assert r.headers["retry-after"] == "2"
        assert elapsed < 1.0  # refused at once, not after waiting in the queue
        assert len(gatekeeper.admitted) == 3  # the refused request reserved nothing
        metrics = httpx.get(url + "/metrics").text
        assert 'inferhub_overload_refusals_total{model="fake"} 1.0' in metrics

        hold.set()  # the engine drains its queue: everyone waiting is served
        for future in waiting:
            assert parse_sse(future.result())[-1] == "[DONE]"
        r = post(url, "/v1/chat/completions", chat(), timeout=10)
        assert r.status_code == 200, r.text
    assert [s.end_state for s in gatekeeper.wait_settled(4)] == ["completed"] * 4


def test_requests_that_started_generating_no_longer_count_as_queued() -> None:
    engine = FakeEngine(endless=True, delay=0.01)
    gatekeeper = RecordingGatekeeper(keys=[KEY])
    config = ServerConfig(max_queued_requests=2)
    with running_server({"fake": engine}, gatekeeper, config) as url, ThreadPoolExecutor(4) as pool:
        running = []
        for i in range(3):  # one after the other: each has had outputs before the next comes
            running.append(pool.submit(stream_body, url, chat(stream=True, max_tokens=150)))
            wait_for(lambda i=i: len(engine.running) == i + 1)
            time.sleep(0.1)
        r = post(url, "/v1/chat/completions", chat(max_tokens=3), timeout=10)
        assert r.status_code == 200, r.text
        for future in running:
            assert parse_sse(future.result())[-1] == "[DONE]"


def test_non_stream_request_over_its_time_limit_is_aborted_with_504_and_billed() -> None:
    engine = FakeEngine(endless=True, delay=0.01, max_model_len=10_000)
    gatekeeper = RecordingGatekeeper(keys=[KEY])
    config = ServerConfig(request_timeout_s=0.5)
    with running_server({"fake": engine}, gatekeeper, config) as url:
        started = time.monotonic()
        r = post(url, "/v1/chat/completions", chat(max_tokens=10_000 - 20), timeout=10)
        elapsed = time.monotonic() - started
        err = error(r, 504)
        assert err["code"] == "request_timeout" and err["type"] == "server_error"
        assert "0.5 seconds" in err["message"]
        assert 0.5 <= elapsed < 2.0
        (settled,) = gatekeeper.wait_settled(1)
    assert settled.end_state == "timeout"
    assert settled.completion_tokens > 10  # what it generated is billed ...
    assert settled.completion_tokens == gatekeeper.recorded[settled.request_id]  # ... exactly
    assert engine.aborted == [settled.request_id] and not engine.running


def test_stream_over_its_time_limit_ends_with_an_error_event() -> None:
    engine = FakeEngine(endless=True, delay=0.01, max_model_len=10_000)
    gatekeeper = RecordingGatekeeper(keys=[KEY])
    config = ServerConfig(request_timeout_s=0.5)
    with running_server({"fake": engine}, gatekeeper, config) as url:
        events = parse_sse(stream_body(url, chat(stream=True, max_tokens=10_000 - 20)))
        (settled,) = gatekeeper.wait_settled(1)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["code"] == "request_timeout"
    content = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[1:-2]]
    assert settled.end_state == "timeout"
    # Billed: every token the engine generated, the ones sent and any still queued.
    assert settled.completion_tokens >= len("".join(content)) > 0
    assert settled.completion_tokens == gatekeeper.recorded[settled.request_id]
    assert not engine.running


def _raw_stream_request(port: int, body: dict[str, object], rcvbuf: int = 4096) -> socket.socket:
    """A client that sends a streaming request and then does not read (tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def _read_all(sock: socket.socket, timeout: float = 30.0) -> bytes:
    sock.settimeout(timeout)
    data = bytearray()
    while not data.endswith(b"0\r\n\r\n"):  # the chunked body's last chunk
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_a_client_that_does_not_read_blocks_nobody_and_still_gets_everything() -> None:
    reply = "abcdefghij" * 1500  # 15,000 chunks, megabytes of SSE: far over the socket buffers
    engine = FakeEngine(reply=reply, max_model_len=20_000)
    gatekeeper = RecordingGatekeeper(keys=[KEY])
    with running_server({"fake": engine}, gatekeeper) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = _raw_stream_request(port, chat(stream=True))
        wait_for(lambda: len(engine.requests) == 1)
        time.sleep(1.0)  # the slow client reads nothing; its server side waits on the socket
        assert not gatekeeper.settled  # not done: its stream is blocked in send
        # Meanwhile the server serves others at once.
        for _ in range(3):
            started = time.monotonic()
            r = post(url, "/v1/chat/completions", chat(max_tokens=5), timeout=10)
            assert r.status_code == 200 and time.monotonic() - started < 2.0
        # The slow client now reads: the whole stream, in order, then [DONE].
        raw = _read_all(slow)
        slow.close()
    text = raw.decode(errors="replace")
    assert text.startswith("HTTP/1.1 200")
    deltas = []
    for line in text.split("\n"):
        line = line.strip()
        if line.startswith("data: {"):
            choice = json.loads(line[len("data: ") :])["choices"][0]
            deltas.append(choice["delta"].get("content", ""))
    assert "".join(deltas) == reply
    assert "data: [DONE]" in text
    settled = gatekeeper.wait_settled(4)
    assert sorted(s.end_state for s in settled) == ["completed"] * 4


def test_a_client_that_never_reads_is_cut_at_the_time_limit_and_billed() -> None:
    reply = "abcdefghij" * 1500
    engine = FakeEngine(reply=reply, max_model_len=20_000)
    gatekeeper = RecordingGatekeeper(keys=[KEY])
    config = ServerConfig(request_timeout_s=1.0)
    with running_server({"fake": engine}, gatekeeper, config) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = _raw_stream_request(port, chat(stream=True))
        # Cut after its time limit plus the grace for the error event (5 s).
        (settled,) = gatekeeper.wait_settled(1, timeout=15)
        slow.close()
    assert settled.end_state == "timeout"
    assert 0 < settled.completion_tokens <= len(reply)
    assert not engine.running
