"""The pruning methods as a table, and the checks on a request (method, ratio, calibration).

Structured methods shrink the shapes (fewer layers, MLP channels or heads: less compute on any
device); unstructured ones zero weights in place (the shapes stay; 2:4 runs sparse on GPUs with
semi-structured sparse kernels, dense elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    what: str                  # one line for --help and the summary
    structured: bool           # shrinks shapes (vs zeroes weights)
    calibrated: bool           # reads activation statistics from the calibration text
    fixed_ratio: float = 0.0   # 2:4 always zeroes exactly half


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("layers", "drop whole decoder layers of least block influence (ShortGPT)", True, True),
    Method("mlp", "drop MLP channels of least |a_j|·|W_down[:, j]| (same count per layer)",
           True, True),
    Method("heads", "drop query heads / whole KV groups of least output energy", True, True),
    Method("magnitude", "zero the smallest |W| of each linear weight", False, False),
    Method("wanda", "zero the lowest |W_ij|·|X_j| of each output row (Wanda)", False, True),
    Method("2:4", "zero 2 of every 4 inputs by |W_ij|·|X_j| (semi-structured sparse)", False,
           True, fixed_ratio=0.5),
)}
DEFAULT_CALIB_TOKENS = 512   # ranks a 135M model's parts; 10-40 s of prefill on 2 shared cores
MAX_CALIB_TOKENS = 8192


@dataclass(frozen=True)
class Request:
    method: Method
    ratio: float              # share removed: of layers, channels, heads, or weights
    calib_tokens: int


def request(method: str, ratio: float | None, calib_tokens: int = DEFAULT_CALIB_TOKENS
            ) -> Request:
    """The checked request; ValueError naming what is wrong."""
    m = METHODS.get(method)
    if m is None:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if m.fixed_ratio:
        if ratio is not None and ratio != m.fixed_ratio:
            raise ValueError(f"{m.name} removes exactly {m.fixed_ratio:g} of the weights; "
                             "leave --ratio out")
        ratio = m.fixed_ratio
    if ratio is None:
        raise ValueError(f"{m.name} needs --ratio, the share to remove (0 < R < 1)")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio {ratio:g} is out of range: give 0 < R < 1 (the share removed)")
    if not 1 <= calib_tokens <= MAX_CALIB_TOKENS:
        raise ValueError(f"calibration tokens {calib_tokens} out of range 1..{MAX_CALIB_TOKENS}")
    return Request(m, ratio, calib_tokens)


def removed(count: int, ratio: float) -> int:
    """How many of `count` units a ratio removes: rounded half up (25% of 30 layers: 8)."""
    return int(count * ratio + 0.5)
