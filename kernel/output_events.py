"""Wake-ups for output streams on the server's event loop (kernel/server_loop.py). A Read
waits on an asyncio.Event for its job; ProcessTable.touch, on any thread and under the table
lock, sets it through the loop. Only jobs someone reads cost a call."""

from __future__ import annotations

import asyncio

from llmasos.kernel.proctable import Proc


class OutputEvents:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: dict[int, set[asyncio.Event]] = {}   # pid → its readers' (loop thread)

    def watch(self, pid: int) -> asyncio.Event:
        """On the loop: an event set whenever the job has news (output, its end)."""
        event = asyncio.Event()
        self.events.setdefault(pid, set()).add(event)
        return event

    def unwatch(self, pid: int, event: asyncio.Event) -> None:
        watchers = self.events.get(pid)
        if watchers is not None:
            watchers.discard(event)
            if not watchers:
                del self.events[pid]

    def fire(self, proc: Proc) -> None:
        """From any thread (ProcessTable.touch). A reader registers before it looks at the
        job under the table lock, so news that misses it here was there when it looked."""
        if proc.pid in self.events and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._set, proc.pid)

    def _set(self, pid: int) -> None:
        for event in self.events.get(pid, ()):
            event.set()
