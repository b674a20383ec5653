"""llm-top: a live view of LLM jobs, tokens/s, KV usage and services, as top(1) shows.

    llm-top            refresh every 2 s; q quits
    llm-top -d 0.5     refresh every half second
    llm-top -b -n 3    three frames as plain text (for logs and scripts)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field

from llmasos import fmt
from llmasos.client import LLMClient
from llmasos.names import state_name
from llmasos.proto import kernel_pb2
from llmasos.tools import common, ps

CLEAR = "\033[H\033[2J"
ALT_SCREEN_ON, ALT_SCREEN_OFF = "\033[?1049h\033[?25l", "\033[?25h\033[?1049l"
FIELDS = ["pid", "user", "state", "model", "prio", "tok_in", "tok_out", "kv", "age", "name"]


@dataclass
class Rates:
    """Tokens per second per job, from the change in generated tokens between two frames."""

    last: dict[int, tuple[int, float]] = field(default_factory=dict)

    def update(self, procs: list[kernel_pb2.ProcessInfo], now: float) -> dict[int, float]:
        rates = {}
        for p in procs:
            before = self.last.get(p.pid)
            if before and now > before[1]:
                rates[p.pid] = max(p.generated_tokens - before[0], 0) / (now - before[1])
        self.last = {p.pid: (p.generated_tokens, now) for p in procs}
        return rates


def frame(snapshot: kernel_pb2.PsResponse, services: list[kernel_pb2.ServiceInfo],
          rates: dict[int, float], now: float, width: int = 120) -> str:
    """One screen: a summary, the services, then the job table with TOK/S."""
    procs = list(snapshot.processes)
    states: dict[str, int] = {}
    for p in procs:
        states[state_name(p.state)] = states.get(state_name(p.state), 0) + 1
    kv = snapshot.kv
    used = kv.total_blocks - kv.free_blocks
    pct = 100.0 * used / kv.total_blocks if kv.total_blocks else 0.0
    lines = [
        f"llm-top - {time.strftime('%H:%M:%S', time.localtime(now))}   jobs: "
        + ", ".join([f"{len(procs)} total"]
                    + [f"{n} {s.lower()}" for s, n in sorted(states.items())]),
        f"tokens/s: {sum(rates.values()):.1f}   KV: {used}/{kv.total_blocks} blocks "
        f"({pct:.1f}%), {fmt.size(used * kv.block_bytes)} of "
        f"{fmt.size(kv.total_blocks * kv.block_bytes)}, {kv.block_size} tokens/block",
        "services: " + (", ".join(f"{s.name} {s.state.lower()}"
                                  + (f" (restarts {s.restarts})" if s.restarts else "")
                                  for s in services) or "none"),
        "",
    ]
    table = ps.render(procs, FIELDS, now).splitlines()
    rate_col = ["TOK/S"] + [f"{rates[p.pid]:.1f}" if p.pid in rates else "-" for p in procs]
    width_r = max(len(r) for r in rate_col)
    width_t = max(len(row) for row in table)
    lines += [f"{row.ljust(width_t)}  {r.rjust(width_r)}"
              for row, r in zip(table, rate_col, strict=True)]
    return "\n".join(line[:width] for line in lines)


def frames(c: LLMClient, interval: float, iterations: int = 0) -> Iterator[str]:
    """Snapshots every `interval` seconds; iterations=0 means forever."""
    rates, n = Rates(), 0
    while not iterations or n < iterations:
        snap, services, now = c.ps_full(all=True), c.services(), time.time()
        yield frame(snap, services, rates.update(list(snap.processes), now), now,
                    _columns())
        n += 1


def _columns() -> int:
    """The terminal's width; no truncation when it is unknown (a pipe, or a size of 0)."""
    try:
        return os.get_terminal_size().columns or 1000
    except OSError:
        return 1000


@contextlib.contextmanager
def keys() -> Iterator[None]:
    """The terminal in cbreak mode (keys arrive unbuffered, unechoed), restored afterwards."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def quit_pressed(timeout: float) -> bool:
    """Wait up to `timeout` for a key; True when it was q (or Q)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sys.stdin], [], [], left)
        if ready:
            key = os.read(sys.stdin.fileno(), 32).decode(errors="replace")
            if "q" in key.lower() or not key:
                return True
    return False


def live(c: LLMClient, interval: float) -> int:
    """Full-screen view until q (or Ctrl-C)."""
    out = sys.stdout
    with keys():
        out.write(ALT_SCREEN_ON)
        try:
            for text in frames(c, interval):
                out.write(CLEAR + text + "\n\n(q to quit)")
                out.flush()
                if quit_pressed(interval):
                    break
        except KeyboardInterrupt:
            pass
        finally:
            out.write(ALT_SCREEN_OFF)
            out.flush()
    return common.EXIT_OK


def batch(c: LLMClient, interval: float, iterations: int) -> int:
    for i, text in enumerate(frames(c, interval, iterations)):
        print(text + "\n", flush=True)
        if i + 1 != iterations:
            time.sleep(interval)
    return common.EXIT_OK


def run(c: LLMClient, interval: float, iterations: int = 0, plain: bool = False) -> int:
    """Live when on a terminal, frames as text otherwise; llmsh's `top` calls this too."""
    if plain or iterations or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return batch(c, interval, iterations)
    return live(c, interval)


def build_parser() -> argparse.ArgumentParser:
    ap = common.parser("llm-top", "Live view of LLM jobs, tokens/s, KV usage and services.")
    ap.add_argument("-d", "--delay", type=float, default=2.0, metavar="SECONDS",
                    help="refresh interval (default 2)")
    ap.add_argument("-n", "--iterations", type=int, default=0, help="frames to show, then exit")
    ap.add_argument("-b", "--batch", action="store_true", help="plain text frames, no screen")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.delay <= 0 or args.iterations < 0:
        ap.error("-d must be > 0 and -n >= 0")

    def body() -> int:
        with common.client(args) as c:
            return run(c, args.delay, args.iterations, args.batch)
    return common.run("llm-top", body)


if __name__ == "__main__":
    sys.exit(main())

