"""RPCs the step loop decides under the table lock and sends after it lets go (no lock is held
across an RPC). Order matters and is fixed here: swap-outs read blocks before anything writes
them, swap-ins and copy-on-write copies fill blocks before the step that reads them, releases
come last. Freed blocks are only reused by a later admission, which precedes the next send."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog

from llmasos.kernel.proctable import Proc, State
from llmasos.proto import inference_pb2
from llmasos.syscalls import SyscallError

log = structlog.get_logger()
RPC_ERRORS = (grpc.RpcError, SyscallError)


@dataclass
class SwapOut:
    proc: Proc
    model: str
    blocks: list[int]


@dataclass
class PendingIo:
    swap_outs: list[SwapOut] = field(default_factory=list)
    swap_ins: list[SwapOut] = field(default_factory=list)      # blocks to fill from the handle
    copies: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    releases: dict[str, list[int]] = field(default_factory=dict)        # model → seq ids
    dropped: dict[str, list[int]] = field(default_factory=dict)         # model → swap handles

    def release(self, model: str, pid: int) -> None:
        self.releases.setdefault(model, []).append(pid)

    def drop(self, model: str, handle: int) -> None:
        if handle:
            self.dropped.setdefault(model, []).append(handle)

    def take(self) -> PendingIo:
        """Hand over everything queued so far and start empty (called under the lock)."""
        taken = PendingIo(self.swap_outs, self.swap_ins, self.copies, self.releases,
                          self.dropped)
        self.swap_outs, self.swap_ins, self.copies = [], [], {}
        self.releases, self.dropped = {}, {}
        return taken

    def take_releases(self) -> PendingIo:
        """Hand over only the releases (swaps wait for the next step's send)."""
        taken = PendingIo(releases=self.releases, dropped=self.dropped)
        self.releases, self.dropped = {}, {}
        return taken

    def __bool__(self) -> bool:
        return bool(self.swap_outs or self.swap_ins or self.copies or self.releases
                    or self.dropped)


Stub = Callable[[], object]   # returns an InferenceStub (raises SyscallError when down)


def send_swaps(io: PendingIo, stub: Stub, lock: object,
               lost: Callable[[Proc], None]) -> set[int]:
    """Swap-outs, then swap-ins, then block copies. A failed swap loses only that job's KV
    (`lost` makes it recompute; the pids whose swap-in failed are returned, to leave them out
    of this step); a failed copy raises: the step cannot run as planned."""
    for s in io.swap_outs:
        if s.proc.state in (State.ZOMBIE, State.REAPED):
            continue   # killed before its KV was saved: nothing to keep
        try:
            handle = stub().SwapOut(inference_pb2.SwapOutRequest(
                model=s.model, blocks=s.blocks), timeout=60).handle
        except RPC_ERRORS as e:
            log.warning("swap_out_failed", pid=s.proc.pid, error=str(e))
            with lock:
                lost(s.proc)
            continue
        log.info("job_swapped_out", pid=s.proc.pid, blocks=len(s.blocks))
        with lock:
            s.proc.swap_handle = handle
            if s.proc.state in (State.ZOMBIE, State.REAPED):   # killed meanwhile
                io.drop(s.model, handle)
                s.proc.swap_handle = 0
    failed: set[int] = set()
    for s in io.swap_ins:
        try:
            if not s.proc.swap_handle:
                raise SyscallError("NOT_FOUND", "its swapped-out copy was never saved")
            stub().SwapIn(inference_pb2.SwapInRequest(
                model=s.model, handle=s.proc.swap_handle, blocks=s.blocks), timeout=60)
            log.info("job_swapped_in", pid=s.proc.pid, blocks=len(s.blocks))
        except RPC_ERRORS as e:
            log.warning("swap_in_failed", pid=s.proc.pid, error=str(e))
            failed.add(s.proc.pid)
            with lock:
                lost(s.proc)
        s.proc.swap_handle = 0
    for model, pairs in io.copies.items():
        src, dst = zip(*pairs, strict=True)
        stub().CopyBlocks(inference_pb2.CopyBlocksRequest(model=model, src=src, dst=dst),
                          timeout=60)
    io.swap_outs, io.swap_ins, io.copies = [], [], {}
    return failed


def send_releases(io: PendingIo, stub: Stub) -> None:
    """Drop ended jobs' sampler state and unused swapped copies; a service that is down has
    dropped them already."""
    models = set(io.releases) | set(io.dropped)
    for model in models:
        with contextlib.suppress(*RPC_ERRORS):
            stub().Release(inference_pb2.ReleaseRequest(
                model=model, seq_ids=io.releases.get(model, []),
                swap_handles=io.dropped.get(model, [])), timeout=30)
    io.releases, io.dropped = {}, {}
