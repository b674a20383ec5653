"""The remote-model driver against a tiny OpenAI-compatible server started here on loopback:
streaming, retries on 429/5xx with Retry-After, resuming a cut stream, errors mapped to gRPC
codes, cancellation, and the API key kept out of reprs and logs."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import structlog
import structlog.testing

from llmasos.drivers.remote.client import (
    ApiKey,
    Completion,
    RemoteError,
    RemoteModel,
    load_api_key,
)

KEY = "sk-test-0123456789abcdef"
WORDS = [" jumps", " over", " the", " lazy", " dog", "."]


class Endpoint:
    """A scripted /v1/completions: `plan` says what each successive request gets."""

    def __init__(self) -> None:
        # "ok", "429", "503", "cut" (stream 2 words then drop), "400", "slow" (0.1 s a word)
        self.plan: list[str] = []
        self.requests: list[dict] = []
        self.closed = threading.Event()   # a client hung up mid-stream
        self.headers: list[dict[str, str]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append(body)
                endpoint.headers.append(dict(self.headers))
                step = endpoint.plan.pop(0) if endpoint.plan else "ok"
                if self.path != "/v1/completions":
                    return self.error(404, "no such route")
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self.error(401, "bad key")
                if step in ("429", "503"):
                    return self.error(int(step), "busy", retry_after="0")
                if step == "400":
                    return self.error(400, "max_tokens too large")
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                done = len(body["prompt"]) - len("The quick brown fox")
                start = sum(1 for w in WORDS if done > 0 and (done := done - len(w)) >= 0)
                words = WORDS[start:][: body["max_tokens"]]
                try:
                    self.stream(step, start, words)
                except (BrokenPipeError, ConnectionResetError):
                    endpoint.closed.set()

            def stream(self, step: str, start: int, words: list[str]) -> None:
                for i, word in enumerate(words):
                    if step == "cut" and i == 2:
                        self.wfile.flush()
                        self.connection.shutdown(2)  # the connection drops mid-stream
                        return
                    last = i == len(words) - 1
                    event = {"choices": [{"text": word, "index": 0, "finish_reason":
                                          ("stop" if start + i == len(WORDS) - 1 else "length")
                                          if last else None}]}
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                    if step == "slow":
                        time.sleep(0.1)
                self.wfile.write(b"data: [DONE]\n\n")

            def error(self, code: int, message: str, retry_after: str | None = None) -> None:
                data = json.dumps({"error": {"message": message}}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    e = Endpoint()
    yield e
    e.server.shutdown()
    e.server.server_close()


def model(endpoint: Endpoint, **kw: object) -> RemoteModel:
    return RemoteModel(endpoint.url, "gpt-3.5-turbo-instruct", ApiKey(KEY), backoff_s=0.0, **kw)


def text_of(chunks: list) -> str:
    return "".join(c.text for c in chunks)


def test_streams_a_completion(endpoint: Endpoint) -> None:
    chunks = list(model(endpoint).stream(Completion("The quick brown fox", max_tokens=16,
                                                    temperature=0.0, stop=["\n"], seed=7)))
    assert text_of(chunks) == "".join(WORDS) and chunks[-1].finish_reason == "stop"
    (req,) = endpoint.requests
    assert req["model"] == "gpt-3.5-turbo-instruct" and req["stream"] is True
    assert (req["temperature"], req["stop"], req["seed"], req["max_tokens"]) == (0.0, ["\n"], 7,
                                                                                  16)


def test_retries_429_and_5xx_then_succeeds(endpoint: Endpoint) -> None:
    endpoint.plan = ["429", "503"]
    chunks = list(model(endpoint).stream(Completion("The quick brown fox")))
    assert text_of(chunks) == "".join(WORDS) and len(endpoint.requests) == 3


def test_gives_up_after_the_retry_budget(endpoint: Endpoint) -> None:
    endpoint.plan = ["503"] * 10
    with pytest.raises(RemoteError) as info:
        list(model(endpoint, retries=2).stream(Completion("The quick brown fox")))
    assert info.value.code == "UNAVAILABLE" and len(endpoint.requests) == 3


def test_a_cut_stream_resumes_from_the_text_so_far(endpoint: Endpoint) -> None:
    endpoint.plan = ["cut"]
    chunks = list(model(endpoint).stream(Completion("The quick brown fox", max_tokens=16)))
    assert text_of(chunks) == "".join(WORDS)
    first, second = endpoint.requests
    assert second["prompt"] == first["prompt"] + "".join(WORDS[:2])
    assert second["max_tokens"] == 16 - 2


def test_client_errors_are_not_retried_and_keep_their_meaning(endpoint: Endpoint) -> None:
    endpoint.plan = ["400"]
    with pytest.raises(RemoteError) as info:
        list(model(endpoint).stream(Completion("The quick brown fox")))
    assert info.value.code == "INVALID_ARGUMENT" and "max_tokens" in str(info.value)
    assert len(endpoint.requests) == 1
    bad_key = RemoteModel(endpoint.url, "m", ApiKey("wrong"), backoff_s=0.0)
    with pytest.raises(RemoteError) as info:
        list(bad_key.stream(Completion("x")))
    assert info.value.code == "UNAUTHENTICATED"


def test_cancel_stops_the_stream(endpoint: Endpoint) -> None:
    """The stream ends at the next chunk, and the driver hangs up: the server's next writes
    fail (it does not go on generating for no one)."""
    endpoint.plan = ["slow"]
    cancel = threading.Event()
    got = []
    for chunk in model(endpoint).stream(Completion("The quick brown fox"), cancel):
        got.append(chunk)
        cancel.set()
    assert len(got) == 1
    assert endpoint.closed.wait(10)


def test_key_from_env_or_private_file_and_never_shown(
        endpoint: Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("REMOTE_KEY", KEY)
    key = load_api_key(env_var="REMOTE_KEY")
    with pytest.raises(RemoteError, match="NOPE_KEY"):
        load_api_key(env_var="NOPE_KEY")
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(RemoteError, match="chmod 600"):
        load_api_key(key_file=str(path))
    os.chmod(path, 0o600)
    assert load_api_key(key_file=str(path)).header() == key.header() == {
        "Authorization": f"Bearer {KEY}"}
    endpoint.plan = ["429"]
    remote = RemoteModel(endpoint.url, "m", key, backoff_s=0.0)
    with structlog.testing.capture_logs() as logs:
        list(remote.stream(Completion("The quick brown fox")))
    out = capsys.readouterr()
    assert [e["event"] for e in logs] == ["remote_retry"]  # the retry was logged ...
    assert KEY not in str(logs) + out.out + out.err + repr(remote) + str(key)  # ... not the key
