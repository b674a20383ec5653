"""One sequence's output text: streaming detokenization, stop ids, stop strings, max tokens.

Text is emitted as soon as it is final: complete UTF-8 characters that cannot be the start of a
stop string. A sequence rebuilt from its generated ids (after a recompute) replays them silently,
so `.text` holds what was already emitted and later appends emit only what is new.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmasos.drivers.tokenizer import IncrementalDetokenizer, Tokenizer
from llmasos.services.inference.sampler import SamplingParams

FINISH_STOP = "stop"  # a stop token id, an end-of-sequence id or a stop string
FINISH_LENGTH = "length"  # max_tokens reached (or the engine ran out of context)


class SequenceOutput:
    def __init__(
        self,
        tokenizer: Tokenizer,
        params: SamplingParams,
        eos_token_ids: Iterable[int],
        generated_ids: Iterable[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.params = params
        eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.stop_ids = eos | frozenset(params.stop_token_ids)
        self.token_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self.finish_reason: str | None = None
        self.stopped_by: int | str | None = None  # the stop id or stop string that ended it
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self._held = ""  # text that may still be the start of a stop string
        for token_id in generated_ids:
            self.append(token_id)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def stopped(self) -> bool:
        """Ended by a stop id, an end-of-sequence id or a stop string (not by length)."""
        return self.finish_reason == FINISH_STOP

    def append(self, token_id: int) -> tuple[str, bool]:
        """Take the next generated id; return the new text to emit and whether it stopped.

        At max_tokens the held-back text is flushed and finish_reason becomes "length", but the
        flag stays False: reaching the length is not a stop, and the kernel counts it itself.
        """
        if self.finished:
            return "", self.stopped
        self.token_ids.append(token_id)
        if token_id in self.stop_ids:
            self.stopped_by = token_id
            return self.finish(FINISH_STOP), True
        text = self._scan(self._detok.push(token_id))
        if not self.finished and len(self.token_ids) >= self.params.max_tokens:
            text += self.finish(FINISH_LENGTH)
        return text, self.stopped

    def finish(self, reason: str = FINISH_LENGTH) -> str:
        """End the sequence now and return the text still held back (none after a stop string)."""
        if self.finished:
            return ""
        text = self._scan(self._detok.flush())
        if not self.finished:
            text += self._emit(self._held)
            self._held = ""
            self.finish_reason = reason
        return text

    def _scan(self, new: str) -> str:
        """Emit what can no longer be part of a stop string; stop at the first stop string."""
        pending = self._held + new
        hit = _first_stop(pending, self.params.stop)
        if hit is not None:
            index, stop = hit
            self._held = ""
            self.stopped_by = stop
            self.finish_reason = FINISH_STOP
            return self._emit(pending[:index])
        keep = _partial_stop(pending, self.params.stop)
        self._held = pending[len(pending) - keep :] if keep else ""
        return self._emit(pending[: len(pending) - keep])

    def _emit(self, text: str) -> str:
        self.text += text
        return text


def _first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string in text, as (index, stop)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
