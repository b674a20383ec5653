"""Where llmosd is and who we are: the address and the bearer token, found the same way by
every userland program (client, shell, tools)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from llmasos.errors import InvalidArgument

DEFAULT_ADDR = "127.0.0.1:7070"
TOKEN_FILE_NAME = "root.token"


def address(explicit: str | None = None) -> str:
    """The kernel's address: the argument, else $LLMASOS_ADDR, else 127.0.0.1:7070."""
    return explicit or os.environ.get("LLMASOS_ADDR") or DEFAULT_ADDR


def home() -> Path:
    """The state directory: $LLMASOS_HOME, else ~/.local/state/llmasos."""
    env = os.environ.get("LLMASOS_HOME")
    return Path(env) if env else Path.home() / ".local" / "state" / "llmasos"


def _read_token(path: Path) -> str | None:
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return token or None


def find_token(explicit: str | None = None) -> str | None:
    """The token, in order: the argument, $LLMASOS_TOKEN, the file named by $LLMASOS_TOKEN_FILE,
    $LLMASOS_HOME/root.token when readable. None when there is none (the kernel will answer
    UNAUTHENTICATED)."""
    if explicit:
        return explicit
    if os.environ.get("LLMASOS_TOKEN"):
        return os.environ["LLMASOS_TOKEN"].strip()
    if os.environ.get("LLMASOS_TOKEN_FILE"):
        return _read_token(Path(os.environ["LLMASOS_TOKEN_FILE"]))
    return _read_token(home() / TOKEN_FILE_NAME)


def token_hint() -> str:
    """What to do when we have no (valid) token; appended to UNAUTHENTICATED errors."""
    return (f"set LLMASOS_TOKEN or LLMASOS_TOKEN_FILE, or run as the user who started llmosd "
            f"(its token is {home() / TOKEN_FILE_NAME})")


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries our identity."""
    return (("authorization", f"Bearer {token}"),) if token else ()


DEFAULT_RETRY_S = 30.0
KERNEL_SERVICE = "llmasos.v1.Kernel"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
# Reconnect to a restarted llmosd within half a second (a connect attempt costs one SYN on an
# outage), not gRPC's default of up to 2 minutes.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 500)]


def retry_seconds(explicit: float | None = None) -> float:
    """How long a call waits for llmosd to come back: the argument, else $LLMASOS_RETRY_S,
    else 30 s; 0 turns retrying off."""
    if explicit is not None:
        return max(float(explicit), 0.0)
    text = os.environ.get("LLMASOS_RETRY_S") or str(DEFAULT_RETRY_S)
    try:
        return max(float(text), 0.0)
    except ValueError:
        raise InvalidArgument(f"LLMASOS_RETRY_S={text!r} is not a number of seconds; "
                              f"set it to e.g. 30, or 0 to turn retrying off") from None


def service_config(retried: Iterable[str]) -> str:
    """gRPC's retry policy for the idempotent calls: UNAVAILABLE (llmosd gone or restarting)
    is tried again with backoff, by the channel itself. The other calls get gRPC's
    transparent retry only, which resends a call solely when it never reached the server."""
    policy = {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "1s",
              "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    names = [{"service": KERNEL_SERVICE, "method": m} for m in retried]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def tls_credentials() -> grpc.ChannelCredentials | None:
    """TLS when $LLMASOS_CA names the PEM file of the CA (or self-signed certificate) that
    signed llmosd's --tls-cert; None (plain text) otherwise."""
    path = os.environ.get("LLMASOS_CA")
    if not path:
        return None
    try:
        return grpc.ssl_channel_credentials(root_certificates=Path(path).read_bytes())
    except OSError as e:
        raise ValueError(f"LLMASOS_CA={path}: cannot read the CA certificate: {e}") from None


def channel(addr: str, retried: Iterable[str] = (), aio: bool = False) -> Any:
    """The one way userland opens a channel to llmosd (grpc.Channel, or grpc.aio.Channel when
    aio): TLS when $LLMASOS_CA is set; `retried` names the methods the channel retries on
    UNAVAILABLE."""
    options = CHANNEL_OPTIONS + RECONNECT_OPTIONS
    retried = list(retried)
    if retried:
        options = options + [("grpc.enable_retries", 1),
                             ("grpc.service_config", service_config(retried))]
    grpc_ = grpc.aio if aio else grpc
    creds = tls_credentials()
    if creds is not None:
        return grpc_.secure_channel(addr, creds, options=options)
    return grpc_.insecure_channel(addr, options=options)


def aio_channel(addr: str, retried: Iterable[str] = ()) -> grpc.aio.Channel:
    return channel(addr, retried, aio=True)
