"""Where llmosd is and who we are: the address and the bearer token, found the same way by
every userland program (client, shell, tools)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc

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


CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]


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


def channel(addr: str) -> grpc.Channel:
    creds = tls_credentials()
    if creds is not None:
        return grpc.secure_channel(addr, creds, options=CHANNEL_OPTIONS)
    return grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)


def aio_channel(addr: str) -> grpc.aio.Channel:
    creds = tls_credentials()
    if creds is not None:
        return grpc.aio.secure_channel(addr, creds, options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
