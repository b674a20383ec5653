"""Argument checks, one function per syscall. They look only at the request, never at kernel
state, so they run before anything changes (state-dependent errors are the handler's)."""

from __future__ import annotations

import re
from typing import Any

from llmasos.syscalls.errors import invalid
from llmasos.syscalls.limits import (
    MAX_N,
    MAX_NAME_BYTES,
    MAX_PROMPT_BYTES,
    NICE_MAX,
    NICE_MIN,
    SIGNALS,
    sampling_errors,
)

MODEL_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
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


def sampling(s: Any) -> None:
    """Ranges of limits.SAMPLING; vocabulary-dependent bounds are checked at Spawn against the
    model (kernel/handlers.py) and again by the engine."""
    errors = sampling_errors(s)
    if errors:
        raise invalid(errors[0])


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
    if req.signal not in SIGNALS.values():
        raise invalid(f"unknown signal {req.signal}; use SIGTERM, SIGKILL, SIGSTOP or SIGCONT")


def nice(req: Any) -> None:
    pid(req)
    nice_value(req.nice)


def ps(req: Any) -> None:
    if req.user and len(req.user) > 32:
        raise invalid("user must be at most 32 chars")


def deploy(req: Any) -> None:
    model_name(req.name)
    if req.replicas < 0:
        raise invalid(f"replicas must be at least 1 (0 means 1), got {req.replicas}")
    if req.remote_url:
        remote_deploy(req)
        return
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


USER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_AUDIT_LINES = 10_000


def setquota(req: Any) -> None:
    if not USER_NAME.match(req.user):
        raise invalid(f"user must be a user name (1..32 chars of [a-z0-9_-]), got {req.user!r}")
    if req.HasField("kv_share") and not 0.0 <= req.kv_share <= 1.0:
        raise invalid(f"kv_share must be in [0, 1] (0: no limit), got {req.kv_share}")
    fields = ("max_jobs", "max_tokens", "kv_share")
    if not req.reset and not any(req.HasField(f) for f in fields):
        raise invalid("give at least one of max_jobs, max_tokens, kv_share, or reset")


def audit(req: Any) -> None:
    if req.limit > MAX_AUDIT_LINES:
        raise invalid(f"limit must be at most {MAX_AUDIT_LINES}, got {req.limit}")
# --- mailboxes (the IPC service re-checks everything; these fail fast with the same words) ---

MBOX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,63}")
MBOX_MODES = {0, 1, 2}                 # kernel.proto MboxMode: owner, group, all
MBOX_MAX_MESSAGES = 65536
MBOX_MAX_TEXT = 1 << 20                # bytes per message
MBOX_MAX_WAIT_MS = 600_000


def mbox_name(name: str) -> None:
    if MBOX_NAME.fullmatch(name) is None:
        raise invalid(f"bad mailbox name {name!r}: 1..64 chars of [A-Za-z0-9_.:@/-], "
                      "starting with a letter or digit")


def mbox_create(req: Any) -> None:
    mbox_name(req.name)
    if req.mode not in MBOX_MODES:
        raise invalid(f"mode must be owner (0), group (1) or all (2), got {req.mode}")
    if req.max_messages > MBOX_MAX_MESSAGES:
        raise invalid(f"max_messages must be at most {MBOX_MAX_MESSAGES}")


def mbox_send(req: Any) -> None:
    mbox_name(req.name)
    if len(req.text.encode()) > MBOX_MAX_TEXT:
        raise invalid(f"text must be at most {MBOX_MAX_TEXT} bytes")


def mbox_recv(req: Any) -> None:
    mbox_name(req.name)
    if req.timeout_ms > MBOX_MAX_WAIT_MS:
        raise invalid(f"timeout_ms must be at most {MBOX_MAX_WAIT_MS} (10 minutes); loop "
                      "for longer waits")


def mbox_list(req: Any) -> None:
    if req.name:
        mbox_name(req.name)


def mbox_remove(req: Any) -> None:
    mbox_name(req.name)


# --- shared KV segments -----------------------------------------------------------------------

def shm_name(req: Any) -> None:
    mbox_name(req.name)


def shm_create(req: Any) -> None:
    mbox_name(req.name)
    model_name(req.model)
    if not 1 <= len(req.text.encode()) <= MAX_PROMPT_BYTES:
        raise invalid(f"text must be 1..{MAX_PROMPT_BYTES} bytes")
    if req.mode not in MBOX_MODES:
        raise invalid(f"mode must be owner (0), group (1) or all (2), got {req.mode}")


def remote_deploy(req: Any) -> None:
    """A hosted model: an http(s) URL and at most one key source."""
    if not req.remote_url.startswith(("http://", "https://")) or len(req.remote_url) > 2048:
        raise invalid("remote_url must be an http:// or https:// URL like https://host/v1")
    if req.path:
        raise invalid("a remote model has no path; give either path or remote_url")
    if req.quant or req.tp > 1 or req.pp > 1 or req.replicas > 1:
        raise invalid("a remote model is served by its endpoint: no quant, tp, pp or replicas")
    if req.api_key_env and req.api_key_file:
        raise invalid("give api_key_env or api_key_file, not both")
    if req.remote_model and len(req.remote_model) > 256:
        raise invalid("remote_model must be at most 256 chars")
