"""OpenAI request bodies → SpawnRequest, with OpenAI's ranges checked here so that a bad
parameter is a 400 that names it. vLLM's extra sampling parameters are accepted too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmasos.http.errors import bad_param
from llmasos.proto import common_pb2, kernel_pb2

MAX_N = 16
NUM = (int, float)

#   body key              SamplingParams field    types        low    high
SAMPLING: tuple[tuple[str, str, tuple, float, float], ...] = (
    ("temperature",        "temperature",          NUM,         0.0,   2.0),
    ("top_p",              "top_p",                NUM,         0.0,   1.0),
    ("presence_penalty",   "presence_penalty",     NUM,         -2.0,  2.0),
    ("frequency_penalty",  "frequency_penalty",    NUM,         -2.0,  2.0),
    ("seed",               "seed",                 (int,),      0,     2**64 - 1),
    ("top_k",              "top_k",                (int,),      -1,    1 << 20),   # vLLM extra
    ("min_p",              "min_p",                NUM,         0.0,   1.0),       # vLLM extra
    ("repetition_penalty", "repetition_penalty",   NUM,         0.0,   10.0),      # vLLM extra
)
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "logit_bias",
               "response_format", "audio", "modalities", "prediction"}


@dataclass
class Parsed:
    """What a request asks for beyond the SpawnRequest itself."""

    spawn: kernel_pb2.SpawnRequest
    prompts: list[str | None]   # one job group per prompt (None: the chat messages)
    n: int
    stream: bool
    include_usage: bool
    logprobs: int               # -1: none; else how many top alternatives were asked for


def number(body: dict, key: str, kinds: tuple, lo: float, hi: float) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad_param(key, f"{key} must be a {'number' if float in kinds else 'integer'}, "
                        f"got {value!r}")
    if not lo <= value <= hi:
        raise bad_param(key, f"{key} must be in [{lo}, {hi}], got {value}")
    return value


def sampling(body: dict) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams()
    for key, field, kinds, lo, hi in SAMPLING:
        value = number(body, key, kinds, lo, hi)
        if value is not None and not (key == "top_k" and value == -1):   # vLLM's -1: off
            setattr(p, field, value)
    if p.HasField("top_p") and p.top_p == 0:
        raise bad_param("top_p", "top_p must be in (0, 1]")
    limit = number(body, "max_completion_tokens", (int,), 1, 65536)
    limit = limit if limit is not None else number(body, "max_tokens", (int,), 1, 65536)
    if limit is not None:
        p.max_tokens = limit
    p.stop.extend(strings(body, "stop", 16))
    p.stop_token_ids.extend(number_list(body, "stop_token_ids"))
    ignore = body.get("ignore_eos", False)
    if not isinstance(ignore, bool):
        raise bad_param("ignore_eos", "ignore_eos must be true or false")
    p.ignore_eos = ignore
    return p


def strings(body: dict, key: str, most: int) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_param(key, f"{key} must be a non-empty string or a list of them")
    if len(items) > most:
        raise bad_param(key, f"{key} takes at most {most} strings, got {len(items)}")
    return items


def number_list(body: dict, key: str) -> list[int]:
    value = body.get(key) or []
    if not isinstance(value, list) or not all(isinstance(i, int) and i >= 0 for i in value):
        raise bad_param(key, f"{key} must be a list of token ids")
    return value


def content(value: Any, i: int) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        if any(p.get("type") != "text" for p in value):
            raise bad_param(f"messages[{i}].content", "only text content parts are supported")
        return "".join(str(p.get("text", "")) for p in value)
    if value is None:
        return ""
    raise bad_param(f"messages[{i}].content", "content must be a string or a list of parts")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def messages(body: dict) -> common_pb2.ChatMessages:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_param("messages", "messages must be a non-empty list of {role, content}")
    out = common_pb2.ChatMessages()
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad_param(f"messages[{i}].role",
                            f"role must be one of {sorted(ROLES)}, got {m!r:.80}")
        out.messages.add(role=ROLES[m["role"]], content=content(m.get("content"), i))
    return out


def prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    items = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise bad_param("prompt", "prompt must be a string or a list of strings "
                        "(token-id prompts are not supported)")
    return items


def common(body: Any) -> tuple[str, int, bool, bool]:
    if not isinstance(body, dict):
        raise bad_param("body", "the request body must be a JSON object")
    for key in UNSUPPORTED & body.keys():
        if body[key] not in (None, [], {}, "none", "auto") and \
                body[key] != {"type": "text"}:
            raise bad_param(key, f"{key} is not supported by LLMasOS")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_param("model", "model is required: one of GET /v1/models")
    n = number(body, "n", (int,), 1, MAX_N) or 1
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_param("stream", "stream must be true or false")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad_param("stream_options", "stream_options must be an object")
    return model, n, stream, bool(opts.get("include_usage"))


def chat(body: Any, name: str) -> Parsed:
    model, n, stream, usage = common(body)
    want = body.get("logprobs", False)
    if not isinstance(want, bool):
        raise bad_param("logprobs", "logprobs must be true or false for chat completions")
    top = number(body, "top_logprobs", (int,), 0, 20) or 0
    req = kernel_pb2.SpawnRequest(model=model, sampling=sampling(body), n=n, name=name)
    req.messages.CopyFrom(messages(body))
    return Parsed(req, [None], n, stream, usage, top if want else -1)


def completion(body: Any, name: str) -> Parsed:
    model, n, stream, usage = common(body)
    lp = number(body, "logprobs", (int,), 0, 5)
    req = kernel_pb2.SpawnRequest(model=model, sampling=sampling(body), n=n, name=name)
    return Parsed(req, list(prompts(body)), n, stream, usage, -1 if lp is None else lp)
