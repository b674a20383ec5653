"""Choosing the next token: penalties, temperature, top-k, top-p, min-p, seeded draws.

One call samples a whole batch. Every row goes through the same vectorised tensor ops; the only
per-row Python work is one uniform draw per seeded row from its own generator, so that a seeded
row's draw depends only on (seed, step) and never on the batch it sits in.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from llmasos.drivers.cpu.greedy import greedy as native_greedy
from llmasos.proto import common_pb2
from llmasos.syscalls.limits import (  # the ABI's one table of limits and defaults
    DEFAULT_MAX_TOKENS,
    MAX_STOP_BYTES,
    MAX_STOP_STRINGS,
    SAMPLING,
    UINT64_MAX,
    bound_for,
)

TOP_P_WINDOWS = (256, 4096)  # prefix widths tried before a full sort of the vocabulary


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None = fresh randomness
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past end-of-sequence ids (fixed-length benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalises(self) -> bool:
        return bool(
            self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
        )

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first parameter out of its range (proto/common.proto)."""
        for name in SAMPLING:
            b = bound_for(name, vocab_size)
            _check_range(name, getattr(self, name), b.lo, b.hi, b.lo_open, b.hi_open)
        if self.seed is not None:
            _check_range("seed", self.seed, 0, UINT64_MAX)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for s in self.stop:
            size = len(s.encode("utf-8"))
            if not 1 <= size <= MAX_STOP_BYTES:
                raise ValueError(
                    f"stop: each string must be 1 to {MAX_STOP_BYTES} bytes, got {size} ({s!r:.40})"
                )
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise ValueError(f"stop_token_ids: each must be in [0, {vocab_size}), got {t}")

    @classmethod
    def from_proto(cls, msg: common_pb2.SamplingParams) -> SamplingParams:
        """Unset optional fields take the defaults above (proto3 presence)."""
        default = cls()
        values = {
            name: getattr(msg, name) if msg.HasField(name) else getattr(default, name)
            for name in _OPTIONAL_FIELDS
        }
        return cls(
            **values,
            stop=list(msg.stop),
            stop_token_ids=list(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
        )

    def to_proto(self) -> common_pb2.SamplingParams:
        msg = common_pb2.SamplingParams(
            stop=self.stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos
        )
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(msg, name, value)
        return msg


_OPTIONAL_FIELDS = (
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "max_tokens",
)  # fmt: skip


def _check_range(
    name: str,
    value: float,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = (
        isinstance(value, int | float)
        and not math.isnan(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {span}, got {value}")


# ---- the draw ----


def seed_for(seed: int, step: int) -> int:
    """The generator seed of one (job seed, step) pair: stable across processes and runs."""
    digest = hashlib.blake2b(
        seed.to_bytes(8, "little") + step.to_bytes(8, "little"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds must fit in int64


def _uniforms(params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
    """One U[0, 1) draw per row, float64 on the CPU: a seeded row's from its own generator."""
    u = torch.rand(len(params), dtype=torch.float64)
    gen = torch.Generator()
    for b, p in enumerate(params):
        if p.seed is not None:
            gen.manual_seed(seed_for(p.seed, steps[b]))
            u[b] = torch.rand(1, dtype=torch.float64, generator=gen)[0]
    return u


def apply_penalties(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]]
) -> torch.Tensor:
    """Repetition, presence and frequency penalties on the tokens each row has generated.

    Sparse: only (row, token) pairs that occur are touched, so the cost follows the histories'
    length, not the vocabulary.
    """
    active = [b for b, p in enumerate(params) if histories[b] and p.penalises]
    if not active:
        return logits
    rows: list[int] = []
    tokens: list[int] = []
    counts: list[int] = []
    for b in active:
        for token, n in Counter(histories[b]).items():
            rows.append(b)
            tokens.append(token)
            counts.append(n)
    device = logits.device
    row_t = torch.tensor(rows, device=device)
    tok_t = torch.tensor(tokens, device=device)
    count_t = torch.tensor(counts, dtype=logits.dtype, device=device)

    def per_row(name: str) -> torch.Tensor:
        values = [getattr(p, name) for p in params]
        return torch.tensor(values, dtype=logits.dtype, device=device)[row_t]

    seen = logits[row_t, tok_t]
    rep = per_row("repetition_penalty")
    # HF/CTRL rule: a seen token becomes less likely whatever its logit's sign
    seen = torch.where(seen > 0, seen / rep, seen * rep)
    seen = seen - per_row("presence_penalty") - per_row("frequency_penalty") * count_t
    return logits.index_put((row_t, tok_t), seen)


def _needs_filter(p: SamplingParams, vocab: int) -> bool:
    return 0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p > 0.0


def _prefix_thresholds(
    desc: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholds [R, 1] from each row's largest probabilities `desc` (sorted, a prefix of the
    row), and whether that prefix was long enough to hold the cut."""
    width = desc.shape[1]
    has_k = k < vocab
    desc = desc.masked_fill(torch.arange(width, device=desc.device)[None, :] >= k, 0.0)
    cum = desc.cumsum(dim=-1)  # sequential on the CPU, so a prefix sums the same at any width
    last = k.clamp(max=width) - 1
    # top-p is over the top-k renormalised; a softmax row already sums to one
    total = torch.where(has_k, cum.gather(1, last), 1.0)
    kept = ((cum - desc) < top_p * total).sum(dim=-1, keepdim=True).clamp(min=1)
    cutoff = torch.where(top_p < 1.0, desc.gather(1, kept - 1), 0.0)
    kth = torch.where(has_k, desc.gather(1, last), 0.0)
    threshold = torch.maximum(torch.maximum(cutoff, kth), min_p * desc[:, :1])
    nucleus_inside = (top_p >= 1.0) | (kept < width) | (cum[:, -1:] >= top_p * total)
    complete = ((~has_k | (k <= width)) & nucleus_inside) | (width == vocab)
    return threshold, complete.squeeze(1)


def filter_thresholds(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The smallest probability each row keeps after top-k, then top-p, then min-p, [R, 1].

    Looks at a fixed-width top-k prefix first and widens only the rows whose cut lies beyond it
    (a full sort of the vocabulary costs ~12 ms a row on these CPUs). The widths never depend on
    the other rows, so neither does the result. Ties at a threshold are all kept.
    """
    rows, vocab = probs.shape
    device = probs.device

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=device)[:, None]

    k = column([p.top_k if 0 < p.top_k < vocab else vocab for p in params]).long()
    top_p = column([p.top_p for p in params])
    min_p = column([p.min_p for p in params])
    threshold = torch.zeros(rows, 1, device=device)
    pending = torch.arange(rows, device=device)
    for width in [w for w in TOP_P_WINDOWS if w < vocab] + [vocab]:
        sub = probs if len(pending) == rows else probs[pending]
        if width < vocab:
            desc = sub.topk(width, dim=-1).values
        else:
            desc = sub.sort(dim=-1, descending=True).values
        found, complete = _prefix_thresholds(
            desc, k[pending], top_p[pending], min_p[pending], vocab
        )
        threshold[pending] = found
        pending = pending[~complete]
        if not len(pending):
            break
    return threshold


def _draw(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
    """One token per row from softmax(logits / T) after the filters, [R] int64.

    Every op is row-local and no row is renormalised (the inverse CDF scales by the row's own
    total), so a row's result does not depend on which other rows share the batch.
    """
    vocab = logits.shape[1]
    device = logits.device
    temp = torch.tensor([p.temperature for p in params], device=device)[:, None]
    probs = torch.softmax(logits / temp, dim=-1)
    filtered = [b for b, p in enumerate(params) if _needs_filter(p, vocab)]
    if filtered:
        threshold = torch.zeros(len(params), 1, device=device)
        if len(filtered) == len(params):
            threshold = filter_thresholds(probs, params)
        else:
            rows = torch.tensor(filtered, device=device)
            threshold[rows] = filter_thresholds(probs[rows], [params[b] for b in filtered])
        probs = probs.masked_fill_(probs < threshold, 0.0)
    # inverse CDF: one uniform per row, so a seeded row costs one draw, not one per token
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = _uniforms(params, steps).to(device=device)[:, None]
    target = (u * total.double()).to(cdf.dtype)
    # strictly below the total, so the first cdf entry above it is a token with mass
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain greedy rows: one max gives each row's token (its first maximum, as argmax) and the
    shift of its log-softmax; the chosen token's logprob is then -log(sum(exp(logits - max))).
    On the CPU one native call does both (drivers/cpu/greedy.c)."""
    native = native_greedy(logits)
    if native is not None:
        return native
    top, chosen = logits.max(dim=-1)
    return chosen, (logits - top[:, None]).exp_().sum(dim=-1).log_().neg_()


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: list[list[int]],
    steps: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token [B] int64 and its logprob [B] fp32 under the unmodified log-softmax.

    logits: [B, V] fp32; histories: ids generated so far per row (for the penalties);
    steps: per row, the index of the token being chosen (a seeded row's draw depends on it).
    """
    logits = logits.float()
    penalised = apply_penalties(logits, params, histories)
    random_rows = [b for b, p in enumerate(params) if p.temperature > 0]
    if not random_rows and penalised is logits:
        return greedy(logits)
    if len(random_rows) == len(params):
        chosen = _draw(penalised, params, steps)
    else:
        chosen = penalised.argmax(dim=-1)
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            subset = [params[b] for b in random_rows]
            drawn = _draw(penalised[rows], subset, [steps[b] for b in random_rows])
            chosen = chosen.index_copy(0, rows, drawn)
    # log-softmax at the chosen token only: one reduction instead of a [B, V] result
    picked = logits.gather(1, chosen[:, None]).squeeze(1)
    return chosen, picked - torch.logsumexp(logits, dim=-1)
