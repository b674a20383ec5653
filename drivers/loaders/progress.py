"""How long work reports how far it got: a Report callback gets (stage, done, total, unit) as
each unit of a stage ends, beside (or instead of) a tqdm bar on stderr.

Stages of a model load, in the order they may come: read (tensors of a safetensors file),
dequantize (GGUF tensors), write (the weights cache entry), load (layers onto the device),
calibrate (text a smoothing recipe reads), quantize (weights packed by the deploy recipe).
A Report may raise LoadCancelled to stop the load between two units (a caller that went away)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from tqdm import tqdm

Report = Callable[[str, int, int, str], None]   # (stage, done, total, unit)
T = TypeVar("T")


class LoadCancelled(Exception):
    """Raised by a Report to stop a load whose caller went away; nothing is kept."""


def tracked(items: Sequence[T], stage: str, unit: str, bar: bool = False,
            report: Report | None = None) -> Iterator[T]:
    """Yield items, reporting 0 of N first and i of N after the i-th; a tqdm bar when `bar`."""
    total = len(items)
    mark(report, stage, 0, total, unit)
    for done, item in enumerate(tqdm(items, desc=stage, unit=unit, disable=not bar), 1):
        yield item
        mark(report, stage, done, total, unit)


def mark(report: Report | None, stage: str, done: int, total: int, unit: str) -> None:
    """One report, for work that is not a loop over items (a file written in one call)."""
    if report is not None:
        report(stage, done, total, unit)
