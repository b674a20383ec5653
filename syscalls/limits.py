"""The ABI's numbers in one place: limits, defaults and signal numbers.

The kernel's argument checks (validate.py), its handlers, the step loop, the inference engine's
own checks and the clients all read these; nothing else writes them down. Model-dependent bounds
(vocabulary, context length) are checked by `check_sampling` against the model's real values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# --- signals (numbers as on Linux; kernel.proto's Signal enum) -------------------------------
SIGKILL, SIGPIPE, SIGTERM, SIGCONT, SIGSTOP = 9, 13, 15, 18, 19
SIGNALS: dict[str, int] = {"KILL": SIGKILL, "TERM": SIGTERM, "CONT": SIGCONT, "STOP": SIGSTOP}
PIPE_INPUT = "{input}"   # where piped text goes in a reader's prompt

# --- requests --------------------------------------------------------------------------------
DEFAULT_MAX_TOKENS = 256          # a Spawn that names no max_tokens
MAX_TOKENS = 65536
MAX_PROMPT_BYTES = 1_000_000
MAX_N = 16                        # samples per Spawn
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_NAME_BYTES = 64
NICE_MIN, NICE_MAX = -20, 19
UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class Bound:
    """One sampling field's range; `lo_open`/`hi_open` exclude the end."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, value: float) -> bool:
        if value != value:   # NaN
            return False
        low_ok = value > self.lo if self.lo_open else value >= self.lo
        high_ok = value < self.hi if self.hi_open else value <= self.hi
        return low_ok and high_ok

    def text(self) -> str:
        return (("(" if self.lo_open else "[") + f"{self.lo}, {self.hi}"
                + (")" if self.hi_open else "]"))


VOCAB = -1.0   # a bound that is the model's vocabulary size, filled in by check_sampling

#                      field                 bound                              default
SAMPLING: dict[str, tuple[Bound, float]] = {
    "temperature":        (Bound(0.0, 10.0),                             0.0),
    "top_k":              (Bound(0, VOCAB),                              0),
    "top_p":              (Bound(0.0, 1.0, lo_open=True),                1.0),
    "min_p":              (Bound(0.0, 1.0, hi_open=True),                0.0),
    "repetition_penalty": (Bound(0.0, 10.0, lo_open=True),               1.0),
    "presence_penalty":   (Bound(-2.0, 2.0),                             0.0),
    "frequency_penalty":  (Bound(-2.0, 2.0),                             0.0),
    "max_tokens":         (Bound(1, MAX_TOKENS),                         DEFAULT_MAX_TOKENS),
}


def bound_for(name: str, vocab_size: int | None) -> Bound:
    b = SAMPLING[name][0]
    if b.hi == VOCAB:
        return Bound(b.lo, vocab_size if vocab_size else 1 << 20, b.lo_open, b.hi_open)
    return b


def sampling_errors(s: Any, vocab_size: int | None = None) -> list[str]:
    """Every problem with a SamplingParams message (present fields only), as messages that say
    what to fix. With vocab_size, the model-dependent bounds are checked too."""
    errors = []
    for name in SAMPLING:
        if s.HasField(name):
            value, bound = getattr(s, name), bound_for(name, vocab_size)
            if not bound.holds(value):
                errors.append(f"sampling.{name} must be in {bound.text()}, got {value}")
    if len(s.stop) > MAX_STOP_STRINGS:
        errors.append(f"at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}")
    errors += [f"each stop string must be 1..{MAX_STOP_BYTES} bytes, got {len(x.encode())}"
               for x in s.stop if not 1 <= len(x.encode()) <= MAX_STOP_BYTES]
    if vocab_size:
        errors += [f"sampling.stop_token_ids: {t} is outside the vocabulary [0, {vocab_size})"
                   for t in s.stop_token_ids if not 0 <= t < vocab_size]
    return errors
