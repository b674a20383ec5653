"""The OpenAI response shapes: chat completions and text completions, whole or as stream chunks.

Per-token logprobs come from the kernel's ReadChunk; the engine reports the chosen token's only,
so top_logprobs lists are empty. A chunk may carry several tokens: its text goes with its first
token, so the tokens' texts still join to the output."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from llmasos.http.jobs import Piece, Usage


def token_texts(p: Piece) -> list[str]:
    return [p.text] + [""] * (len(p.token_ids) - 1) if p.token_ids else []


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


@dataclass
class Choice:
    """One choice as it accumulates (the non-streaming reply is built from these)."""

    text: str = ""
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None

    def add(self, p: Piece) -> None:
        self.text += p.text
        self.tokens += token_texts(p)
        self.logprobs += p.logprobs
        self.finish = p.finish or self.finish


@dataclass
class Shape:
    """One endpoint's reply shapes; `chat` picks chat.completion vs text_completion."""

    chat: bool
    model: str
    rid: str
    logprobs: int            # -1: none asked for
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    # --- logprobs ---------------------------------------------------------------------

    def chat_logprobs(self, tokens: list[str], lps: list[float]) -> dict | None:
        if self.logprobs < 0:
            return None
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": []} for t, lp in zip(tokens, lps, strict=False)]}

    def text_logprobs(self, tokens: list[str], lps: list[float], offset: int) -> dict | None:
        if self.logprobs < 0:
            return None
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": lps,
                "top_logprobs": [{} for _ in tokens] if self.logprobs else None,
                "text_offset": offsets}

    def logprobs_of(self, tokens: list[str], lps: list[float], offset: int = 0) -> dict | None:
        return self.chat_logprobs(tokens, lps) if self.chat \
            else self.text_logprobs(tokens, lps, offset)

    # --- whole replies ----------------------------------------------------------------

    def reply(self, choices: list[Choice], usage: Usage) -> dict:
        out = self.head("chat.completion" if self.chat else "text_completion")
        out["choices"] = [self.choice(i, c) for i, c in enumerate(choices)]
        out["usage"] = usage.as_dict()
        return out

    def choice(self, i: int, c: Choice) -> dict:
        lps = self.logprobs_of(c.tokens, c.logprobs)
        if self.chat:
            return {"index": i, "message": {"role": "assistant", "content": c.text,
                                            "refusal": None},
                    "logprobs": lps, "finish_reason": c.finish}
        return {"index": i, "text": c.text, "logprobs": lps, "finish_reason": c.finish}

    # --- stream chunks ----------------------------------------------------------------

    def chunk(self, choices: list[dict], usage: bool) -> dict:
        out = self.head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = choices
        if usage:
            out["usage"] = None
        return out

    def first(self, i: int) -> dict:
        """A chat stream opens each choice with the assistant role."""
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, p: Piece, offset: int) -> dict:
        lps = self.logprobs_of(token_texts(p), p.logprobs, offset)
        if self.chat:
            delta = {"content": p.text} if p.text else {}
            return {"index": p.index, "delta": delta, "logprobs": lps,
                    "finish_reason": p.finish}
        return {"index": p.index, "text": p.text, "logprobs": lps, "finish_reason": p.finish}

    def usage_chunk(self, usage: Usage) -> dict:
        out = self.chunk([], False)
        out["usage"] = usage.as_dict()
        return out
