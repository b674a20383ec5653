"""Held-out English that needs no download: the prose of CPython's pydoc_data/topics.py.

Fixed, disjoint character slices of the topics in sorted order: the calibration slice feeds
SmoothQuant's activation statistics; the evaluation slice is what perplexity is measured on."""

from __future__ import annotations

from functools import cache

CALIBRATION = slice(0, 4_000)           # ~1k tokens
EVALUATION = slice(100_000, 120_000)    # ~4-5k tokens, far from the calibration slice


@cache
def _text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calibration_text() -> str:
    return _text()[CALIBRATION]


def calibration_prose() -> str:
    """All the prose before the evaluation slice (~25k tokens), for calibrations longer than
    CALIBRATION's (pruning's --calib-tokens); it starts with CALIBRATION."""
    return _text()[: EVALUATION.start]


def evaluation_text() -> str:
    return _text()[EVALUATION]
