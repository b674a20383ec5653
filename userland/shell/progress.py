"""The progress of long work the kernel streams (a deploy's load), drawn on stderr: on a
terminal one line redrawn in place and erased at the end; on a pipe or file, a plain line at
the start, each quarter and the end of every stage (logs stay short and readable)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO


def percent(done: int, total: int) -> int:
    return 100 * done // total if total else 100


def bar_line(stage: str, done: int, total: int, unit: str, columns: int) -> str:
    """`dequantize [#####.....] 120/272 tensors  44%`, cut to the terminal's width."""
    counts = f"{done}/{total} {unit}  {percent(done, total):3d}%"
    width = max(10, min(40, columns - len(stage) - len(counts) - 6))
    filled = width * done // total if total else width
    return f"{stage} [{'#' * filled}{'.' * (width - filled)}] {counts}"[:columns - 1]


@dataclass
class ProgressBar:
    """Call it with each LoadProgress (a deploy's progress=); close() when the work ends."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    prefix: str = "deploy"
    tty: bool | None = None          # None: whether `stream` is a terminal
    shown: tuple[str, int] = ("", -1)  # (stage, quarter) of the last plain line
    drawn: bool = False              # a terminal line is on screen

    def __post_init__(self) -> None:
        if self.tty is None:
            self.tty = self.stream.isatty()

    def __call__(self, p: Any) -> None:
        if self.tty:
            columns = shutil.get_terminal_size().columns
            line = bar_line(f"{self.prefix}: {p.stage}", p.done, p.total, p.unit, columns)
            self.stream.write(f"\r{line}\033[K")
            self.drawn = True
        else:
            quarter = percent(p.done, p.total) // 25
            if (p.stage, quarter) == self.shown:
                return
            self.shown = (p.stage, quarter)
            self.stream.write(f"{self.prefix}: {p.stage} {p.done}/{p.total} {p.unit} "
                              f"({percent(p.done, p.total)}%)\n")
        self.stream.flush()

    def close(self) -> None:
        """Erase the terminal line, so what follows starts on a clean one."""
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False
