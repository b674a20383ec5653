"""Building syscall requests from Python arguments; shared by LLMClient and AsyncLLMClient."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from llmasos.errors import InvalidArgument
from llmasos.proto import common_pb2, kernel_pb2

Message = Mapping[str, str] | tuple[str, str] | common_pb2.ChatMessage


def sampling(max_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None,
             stop: str | Sequence[str] | None = None, seed: int | None = None,
             **extra: float) -> common_pb2.SamplingParams:
    """SamplingParams with only the given fields set (the kernel applies its defaults to the
    rest); extra takes min_p, repetition_penalty, presence_penalty, frequency_penalty."""
    p = common_pb2.SamplingParams(**{k: v for k, v in extra.items() if v is not None})
    for field, value in (("max_tokens", max_tokens), ("temperature", temperature),
                         ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(p, field, value)
    if stop:
        p.stop.extend([stop] if isinstance(stop, str) else stop)
    return p


def chat_messages(messages: Iterable[Message]) -> common_pb2.ChatMessages:
    """Chat turns from dicts {"role", "content"}, (role, content) pairs or ChatMessage."""
    out = common_pb2.ChatMessages()
    for m in messages:
        if isinstance(m, common_pb2.ChatMessage):
            out.messages.append(m)
        elif isinstance(m, tuple):
            out.messages.add(role=m[0], content=m[1])
        else:
            out.messages.add(role=m["role"], content=m["content"])
    if not out.messages:
        raise InvalidArgument("chat needs at least one message")
    return out


def spawn(model: str, prompt: str | None = None, messages: Iterable[Message] | None = None,
          params: common_pb2.SamplingParams | None = None, priority: int = 0, n: int = 1,
          name: str = "", ipc: Mapping[str, object] | None = None) -> kernel_pb2.SpawnRequest:
    """A SpawnRequest for a raw prompt or for chat turns (exactly one of the two); ipc holds
    stdin_pid, shm, stdout_mailbox, ignore_sigpipe (see IPC_OPTIONS)."""
    if (prompt is None) == (messages is None):
        raise InvalidArgument("give either a prompt or chat messages")
    req = kernel_pb2.SpawnRequest(model=model, sampling=params, nice=priority, n=n, name=name,
                                  **{k: v for k, v in (ipc or {}).items() if v})
    if prompt is not None:
        req.prompt = prompt
    else:
        req.messages.CopyFrom(chat_messages(messages))
    return req


# Spawn's IPC options: a pipe's writer (its output is this job's {input}), a named KV segment to
# attach, a mailbox for the output, and whether a writer outlives its reader.
IPC_OPTIONS = ("stdin_pid", "shm", "stdout_mailbox", "ignore_sigpipe")


def pipe_step(step: str | Mapping[str, object]) -> dict[str, object]:
    """One stage of client.pipe(): a prompt template, or the keyword arguments of spawn()."""
    return {"prompt": step} if isinstance(step, str) else dict(step)


def shm_create(name: str, model: str, text: str, mode: str = "owner"
               ) -> kernel_pb2.ShmCreateRequest:
    """mode: owner, all, or group:alice,bob (as mailboxes)."""
    kind, _, members = mode.partition(":")
    modes = {"owner": kernel_pb2.MBOX_MODE_OWNER, "group": kernel_pb2.MBOX_MODE_GROUP,
             "all": kernel_pb2.MBOX_MODE_ALL}
    if kind not in modes:
        raise InvalidArgument(f"mode must be owner, all or group:USER,..., got {mode!r}")
    return kernel_pb2.ShmCreateRequest(name=name, model=model, text=text, mode=modes[kind],
                                       members=[m for m in members.split(",") if m])
