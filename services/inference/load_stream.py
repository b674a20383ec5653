"""One model load as a stream of DeployEvents: the load runs on its own thread, reporting into
a queue that the RPC's thread relays; the ModelInfo comes last, or the load's exception.

Reports are thinned to one per percent of a stage (and the first and last of each), so a
model of thousands of tensors sends at most ~100 messages a stage."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llmasos.proto import common_pb2

Load = Callable[..., common_pb2.ModelInfo]   # load(report=..., cancelled=...) -> the model


@dataclass
class Thinner:
    """Passes on the first and last report of each stage and one per percent between."""

    last: tuple[str, int] = ("", -1)   # (stage, percent) of the last report passed on

    def keep(self, stage: str, done: int, total: int) -> bool:
        percent = 100 * done // total if total else 100
        if (stage, percent) == self.last and done not in (0, total):
            return False
        self.last = (stage, percent)
        return True


@dataclass
class LoadStream:
    load: Load
    cancelled: Callable[[], bool]
    events: queue.Queue = field(default_factory=queue.Queue)
    thinner: Thinner = field(default_factory=Thinner)

    def report(self, stage: str, done: int, total: int, unit: str) -> None:
        if self.thinner.keep(stage, done, total):
            self.events.put(common_pb2.DeployEvent(progress=common_pb2.LoadProgress(
                stage=stage, done=done, total=total, unit=unit)))

    def _run(self) -> None:
        try:
            info = self.load(report=self.report, cancelled=self.cancelled)
            self.events.put(common_pb2.DeployEvent(model=info))
        except BaseException as err:  # noqa: BLE001 - handed to the RPC's thread to answer
            self.events.put(err)

    def __iter__(self) -> Iterator[common_pb2.DeployEvent]:
        """Progress events, then the ModelInfo event; raises what the load raised."""
        threading.Thread(target=self._run, name="load", daemon=True).start()
        while True:
            item = self.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.HasField("model"):
                return
