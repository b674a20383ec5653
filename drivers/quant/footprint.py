"""What a packed weight keeps resident, measured as it is made.

PyTorch's packed linear weights are opaque objects: Python sees neither their buffers nor their
padding (fbgemm rounds K up to a multiple of its K block, 512: a 576-wide weight packs into 1024
bytes a row, of which only the written part ever becomes resident). So the resident set is read
before and after each pack, with freed heap pages handed back first (glibc's malloc_trim), and
the growth is that weight's footprint. Weights of one shape share the mean of their
measurements, which evens out where one pack reused heap pages an earlier one left."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TypeVar

T = TypeVar("T")
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@cache
def _trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim (hands free heap pages back to the OS), or None on other libcs."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def resident_bytes() -> int | None:
    """This process's resident anonymous memory (resident minus file-backed and shared pages,
    which a concurrent read of an mmapped weights file would add), after trimming the heap;
    None where /proc is absent."""
    trim = _trim()
    if trim is not None:
        trim(0)
    try:
        with open("/proc/self/statm") as f:
            _, resident, shared = f.read().split()[:3]
    except OSError:
        return None
    return (int(resident) - int(shared)) * PAGE


@dataclass
class Footprint:
    """Resident bytes measured for each pack of one weight shape; `floor` is what the packed
    weight holds at the least (its int8 payload), used when nothing could be measured."""

    floor: int
    samples: list[int] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        if not self.samples:
            return self.floor
        return max(self.floor, sum(self.samples) // len(self.samples))


_footprints: dict[tuple, Footprint] = {}


def measured(key: tuple, floor: int, make: Callable[[], T]) -> tuple[T, Footprint]:
    """make() and the footprint shared by every object made under key (engine and shape)."""
    fp = _footprints.setdefault(key, Footprint(floor))
    before = resident_bytes()
    obj = make()
    after = resident_bytes()
    if before is not None and after is not None:
        fp.samples.append(after - before)
    return obj, fp
