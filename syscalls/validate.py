"""Argument checks, one function per syscall. They look only at the request, never at kernel
state, so they run before anything changes (state-dependent errors are the handler's)."""

from __future__ import annotations

import re
from typing import Any

from llmasos.syscalls.errors import invalid

MAX_PROMPT_BYTES = 1_000_000
MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_NAME_BYTES = 64
MAX_TOKENS = 65536
NICE_MIN, NICE_MAX = -20, 19
MODEL_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
SIGNALS = {9, 15, 18, 19}
ROLES = {"system", "user", "assistant"}
DTYPES = {"", "float32", "float16", "bfloat16"}


def pid(req: Any) -> None:
    if req.pid <= 0:
        raise invalid("pid must be a positive process id (see `llm-ps`)")


def nice_value(value: int) -> None:
    if not NICE_MIN <= value <= NICE_MAX:
        raise invalid(f"nice must be in [{NICE_MIN}, {NICE_MAX}], got {value}")


def model_name(name: str) -> None:
    if not MODEL_NAME.match(name):
        raise invalid(f"model name must be 1..64 chars of [A-Za-z0-9._:-], got {name!r}")


def _range(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> None:
    if value != value or value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise invalid(f"sampling.{name} must be in {bracket}{lo}, {hi}], got {value}")


def sampling(s: Any) -> None:
    """Ranges as documented in common.proto; vocab-dependent checks are the engine's."""
    if s.HasField("temperature"):
        _range("temperature", s.temperature, 0.0, 10.0)
    if s.HasField("top_k"):
        _range("top_k", s.top_k, 0, 1 << 20)
    if s.HasField("top_p"):
        _range("top_p", s.top_p, 0.0, 1.0, lo_open=True)
    if s.HasField("min_p"):
        _range("min_p", s.min_p, 0.0, 0.999999)
    if s.HasField("repetition_penalty"):
        _range("repetition_penalty", s.repetition_penalty, 0.0, 10.0, lo_open=True)
    if s.HasField("presence_penalty"):
        _range("presence_penalty", s.presence_penalty, -2.0, 2.0)
    if s.HasField("frequency_penalty"):
        _range("frequency_penalty", s.frequency_penalty, -2.0, 2.0)
    if s.HasField("max_tokens"):
        _range("max_tokens", s.max_tokens, 1, MAX_TOKENS)
    if len(s.stop) > MAX_STOP_STRINGS:
        raise invalid(f"at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}")
    for stop in s.stop:
        if not stop or len(stop.encode()) > MAX_STOP_BYTES:
            raise invalid(f"each stop string must be 1..{MAX_STOP_BYTES} bytes")


def spawn(req: Any) -> None:
    model_name(req.model)
    kind = req.WhichOneof("input")
    if kind is None:
        raise invalid("give a prompt or chat messages")
    if kind == "prompt" and not 1 <= len(req.prompt.encode()) <= MAX_PROMPT_BYTES:
        raise invalid(f"prompt must be 1..{MAX_PROMPT_BYTES} bytes")
    if kind == "messages":
        msgs = req.messages.messages
        if not msgs:
            raise invalid("messages must hold at least one message")
        if sum(len(m.content.encode()) for m in msgs) > MAX_PROMPT_BYTES:
            raise invalid(f"messages must total at most {MAX_PROMPT_BYTES} bytes")
        for m in msgs:
            if m.role not in ROLES:
                raise invalid(f"message role must be one of {sorted(ROLES)}, got {m.role!r}")
    nice_value(req.nice)
    if req.n > MAX_N:
        raise invalid(f"n must be in [1, {MAX_N}], got {req.n}")
    if len(req.name.encode()) > MAX_NAME_BYTES:
        raise invalid(f"name must be at most {MAX_NAME_BYTES} bytes")
    sampling(req.sampling)


def kill(req: Any) -> None:
    pid(req)
    if req.signal not in SIGNALS:
        raise invalid(f"unknown signal {req.signal}; use SIGTERM, SIGKILL, SIGSTOP or SIGCONT")


def nice(req: Any) -> None:
    pid(req)
    nice_value(req.nice)


def ps(req: Any) -> None:
    if req.user and len(req.user) > 32:
        raise invalid("user must be at most 32 chars")


def deploy(req: Any) -> None:
    model_name(req.name)
    if not req.path:
        raise invalid("path must name a GGUF file or a Hugging Face folder")
    if req.dtype not in DTYPES:
        raise invalid(f"dtype must be one of {sorted(DTYPES)}, got {req.dtype!r}")


def undeploy(req: Any) -> None:
    model_name(req.name)


def alias(req: Any) -> None:
    model_name(req.name)
    if req.target:
        model_name(req.target)


def nothing(req: Any) -> None:
    """Syscalls without arguments."""
