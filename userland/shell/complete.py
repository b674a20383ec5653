"""Tab completion: command names first, then PIDs (from Ps) and model names (from Models),
fetched from the kernel and kept for a couple of seconds."""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable

from llmasos.client import LLMClient
from llmasos.errors import LLMError

PID_COMMANDS = ("kill", "wait", "fg", "nice")
MODEL_FLAGS = ("-m", "--model")
CACHE_S = 2.0


class Completer:
    def __init__(self, client: LLMClient, commands: list[str]) -> None:
        self.client = client
        self.commands = sorted(commands)
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._matches: list[str] = []

    def _cached(self, key: str, fetch: Callable[[], list[str]]) -> list[str]:
        at, values = self._cache.get(key, (0.0, []))
        if time.monotonic() - at > CACHE_S:
            try:
                values = fetch()
            except LLMError:  # completion must never break the prompt
                values = []
            self._cache[key] = (time.monotonic(), values)
        return values

    def pids(self) -> list[str]:
        return self._cached("pids", lambda: [str(p.pid) for p in self.client.ps(all=True)])

    def models(self) -> list[str]:
        return self._cached("models", lambda: [m.name for m in self.client.models()])

    def candidates(self, before: str, text: str) -> list[str]:
        """What may complete `text`, given the line before it."""
        words = before.replace(";", " ; ").split()
        if ";" in words:
            words = words[len(words) - words[::-1].index(";"):]
        if not words:
            options = self.commands
        elif words[-1] in MODEL_FLAGS or words[0] == "undeploy":
            options = self.models()
        elif words[0] in PID_COMMANDS:
            options = self.pids()
        elif words[0] == "help":
            options = self.commands
        elif words[0] == "deploy":
            return [p + ("/" if os.path.isdir(p) else " ") for p in glob.glob(text + "*")]
        else:
            options = []
        # Python's readline appends nothing after a match; a space lets the next word start.
        return [o + " " for o in options if o.startswith(text)]

    def complete(self, text: str, state: int) -> str | None:
        """readline's completer protocol: called with state 0, 1, 2... until None."""
        if state == 0:
            import readline

            line = readline.get_line_buffer()
            self._matches = self.candidates(line[:readline.get_begidx()], text)
        return self._matches[state] if state < len(self._matches) else None
