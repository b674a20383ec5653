"""A hosted model as a driver: streaming /v1/completions of an OpenAI-compatible endpoint.

Hosted GPT models, vLLM, Ollama, llama.cpp's server or another LLMasOS's HTTP gateway all speak
it. The API key comes from an environment variable or a 0600 file, is sent only in the
Authorization header and is never logged or shown (repr masks it). 429 and 5xx answers and
dropped connections are retried with exponential backoff (Retry-After honoured); a stream cut
after some text is resumed by asking again with the prompt plus the text so far.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger()

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# HTTP status -> the gRPC status name an error is reported with (whose move it is)
STATUS_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 422: "INVALID_ARGUMENT",
                429: "RESOURCE_EXHAUSTED"}


class RemoteError(Exception):
    """The endpoint refused or failed; `code` is the gRPC status name to report."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ApiKey:
    """A secret that never prints."""

    def __init__(self, value: str) -> None:
        self._value = value

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._value}"} if self._value else {}

    def __repr__(self) -> str:
        return "ApiKey(****)" if self._value else "ApiKey(none)"

    __str__ = __repr__


def load_api_key(env_var: str = "", key_file: str = "") -> ApiKey:
    """From $env_var, else from key_file, which must be private (0600 or stricter)."""
    if env_var:
        value = os.environ.get(env_var)
        if not value:
            raise RemoteError("FAILED_PRECONDITION",
                              f"environment variable {env_var} is not set in the service")
        return ApiKey(value.strip())
    if key_file:
        mode = os.stat(key_file).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise RemoteError("FAILED_PRECONDITION", f"{key_file} is readable by others "
                              f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
        with open(key_file, encoding="utf-8") as f:
            return ApiKey(f.read().strip())
    return ApiKey("")


@dataclass(frozen=True)
class Chunk:
    text: str
    finish_reason: str | None = None  # "stop", "length" on the last chunk


@dataclass
class Completion:
    """One request's parameters (OpenAI's /v1/completions fields)."""

    prompt: str
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def body(self, model: str, text_so_far: str, chunks_so_far: int) -> dict[str, object]:
        body: dict[str, object] = {
            "model": model, "prompt": self.prompt + text_so_far, "stream": True,
            "max_tokens": max(1, self.max_tokens - chunks_so_far),
            "temperature": self.temperature, "top_p": self.top_p}
        if self.stop:
            body["stop"] = self.stop
        if self.seed is not None:
            body["seed"] = self.seed
        return body


@dataclass
class RemoteModel:
    """An OpenAI-compatible endpoint: base_url like http://host:8000/v1, the remote model name."""

    base_url: str
    model: str
    key: ApiKey = field(default_factory=lambda: ApiKey(""))
    retries: int = 5
    backoff_s: float = 0.5  # first wait; doubles each retry, capped at max_backoff_s
    max_backoff_s: float = 30.0
    timeout_s: float = 120.0

    def stream(self, req: Completion, cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """The completion's text as it arrives. Retries before and resumes after a failure,
        up to `retries` times; stops quietly when `cancel` is set (a killed or stopped job)."""
        text, chunks, failures = "", 0, 0
        while True:
            try:
                for chunk in self._one_request(req.body(self.model, text, chunks), cancel):
                    if chunk.text:
                        text += chunk.text
                        chunks += 1
                    yield chunk
                    if chunk.finish_reason:
                        return
                return  # the stream ended (or was cancelled) without a finish reason
            except _Retryable as e:
                failures += 1
                if failures > self.retries:
                    raise RemoteError("UNAVAILABLE", f"{self.base_url}: {e.reason} after "
                                      f"{self.retries} retries") from None
                wait = e.retry_after if e.retry_after is not None else min(
                    self.max_backoff_s, self.backoff_s * 2 ** (failures - 1))
                log.info("remote_retry", url=self.base_url, model=self.model, reason=e.reason,
                         attempt=failures, wait_s=wait, resumed_chars=len(text))
                if cancel is not None and cancel.wait(wait):
                    return
                if cancel is None:
                    time.sleep(wait)

    def _one_request(self, body: dict[str, object], cancel: threading.Event | None
                     ) -> Iterator[Chunk]:
        request = urllib.request.Request(
            self.base_url.rstrip("/") + "/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Accept": "text/event-stream",
                     **self.key.header()}, method="POST")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)  # noqa: S310
        except urllib.error.HTTPError as e:
            detail = _error_detail(e)
            if e.code in RETRY_STATUS:
                raise _Retryable(f"HTTP {e.code} {detail}", _retry_after(e)) from None
            raise RemoteError(STATUS_CODES.get(e.code, "UNAVAILABLE"),
                              f"{self.base_url}: HTTP {e.code} {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise _Retryable(f"connection failed: {getattr(e, 'reason', e)}", None) from None
        with response:
            try:
                yield from _events(response, cancel)
            except (OSError, ValueError) as e:  # cut mid-stream: resume from the text so far
                raise _Retryable(f"stream broken: {e}", None) from None


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def _events(response: object, cancel: threading.Event | None) -> Iterator[Chunk]:
    """Server-sent events: `data: {json}` lines, ending with `data: [DONE]`."""
    for raw in response:  # type: ignore[attr-defined]
        if cancel is not None and cancel.is_set():
            return
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise ValueError(str(event["error"]))
        choice = (event.get("choices") or [{}])[0]
        yield Chunk(choice.get("text") or "", choice.get("finish_reason"))
    raise ValueError("the stream ended without [DONE]")


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    value = e.headers.get("Retry-After") if e.headers else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        return str((body.get("error") or {}).get("message") or body.get("error") or "")
    except (ValueError, AttributeError, OSError):
        return ""
