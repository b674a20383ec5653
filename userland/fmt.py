"""Output as people expect it: aligned tables, human sizes and durations, colour on a TTY."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message


def size(n: float) -> str:
    """Bytes, as ls -h writes them: 512B, 1.5K, 20M, 3.0G."""
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            if unit == "B":
                return f"{int(n)}B"
            return f"{n:.1f}{unit}" if abs(n) < 10 else f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.0f}P"  # unreachable; keeps type checkers calm


def duration(seconds: float) -> str:
    """Seconds, as ps and docker write ages: 0.4s, 42s, 3m05s, 2h07m, 4d03h."""
    s = max(seconds, 0.0)
    if s < 10:
        return f"{s:.1f}s"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def count(n: float) -> str:
    """Large counts compactly: 999, 1.2k, 35k, 4.1M."""
    if abs(n) < 1000:
        return f"{n:g}" if isinstance(n, float) else str(n)
    for unit in ("k", "M", "G"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if abs(n) < 10 else f"{n:.0f}{unit}"
    return f"{n:.0f}G"


def table(header: Sequence[str], rows: Sequence[Sequence[object]],
          right: Sequence[str] = ()) -> str:
    """Columns padded to their widest cell; the columns named in `right` align right."""
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if h in right else c.ljust(w)
                 for c, w, h in zip(r, widths, header, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def as_dict(msg: Message) -> dict:
    """A proto message as JSON-ready dict with the .proto's field names and zeros kept."""
    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True)


# ANSI colours, only when writing to a terminal and NO_COLOR is unset (no-color.org).
COLOURS = {"red": 31, "green": 32, "yellow": 33, "blue": 34, "magenta": 35, "cyan": 36,
           "bold": 1, "dim": 2}


def use_colour(stream: TextIO = sys.stdout) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def paint(text: str, colour: str, stream: TextIO = sys.stdout) -> str:
    return f"\033[{COLOURS[colour]}m{text}\033[0m" if use_colour(stream) else text


def prompt(text: str, colour: str) -> str:
    """A coloured readline prompt: \001..\002 mark the escapes as zero-width, so line
    editing stays aligned."""
    if not use_colour():
        return text
    return f"\001\033[{COLOURS[colour]}m\002{text}\001\033[0m\002"


def error(prog: str, message: str) -> None:
    """An error line on stderr, as Unix tools write them: 'prog: message'."""
    print(f"{prog}: {paint(message, 'red', sys.stderr)}", file=sys.stderr)
