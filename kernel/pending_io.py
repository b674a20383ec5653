"""RPCs the step loop decides under the table lock and sends after it lets go (no lock is held
across an RPC). Order matters and is fixed here: swap-outs read blocks before anything writes
them, swap-ins and copy-on-write copies fill blocks before the step that reads them, releases
come last. Freed blocks are only reused by a later admission, which precedes the next send.
Everything is keyed by lane (one replica of a model, kernel/replicas.py); a step takes its own
lane's descriptors, and each goes to the service that holds that replica."""

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
    lane: str
    blocks: list[int]


@dataclass
class PendingIo:
    swap_outs: list[SwapOut] = field(default_factory=list)
    swap_ins: list[SwapOut] = field(default_factory=list)      # blocks to fill from the handle
    copies: dict[str, list[tuple[int, int]]] = field(default_factory=dict)   # lane → pairs
    releases: dict[str, list[int]] = field(default_factory=dict)        # lane → seq ids
    dropped: dict[str, list[int]] = field(default_factory=dict)         # lane → swap handles

    def release(self, lane: str, pid: int) -> None:
        self.releases.setdefault(lane, []).append(pid)

    def drop(self, lane: str, handle: int) -> None:
        if handle:
            self.dropped.setdefault(lane, []).append(handle)

    def take(self, lane: str) -> PendingIo:
        """Hand over what is queued for one lane; the rest stays (called under the lock)."""
        def mine(xs: list[SwapOut]) -> list[SwapOut]:
            return [x for x in xs if x.lane == lane]
        taken = PendingIo(mine(self.swap_outs), mine(self.swap_ins),
                          _pop(self.copies, lane), _pop(self.releases, lane),
                          _pop(self.dropped, lane))
        self.swap_outs = [x for x in self.swap_outs if x.lane != lane]
        self.swap_ins = [x for x in self.swap_ins if x.lane != lane]
        return taken

    def take_releases(self) -> PendingIo:
        """Hand over only the releases (swaps wait for the next step's send)."""
        taken = PendingIo(releases=self.releases, dropped=self.dropped)
        self.releases, self.dropped = {}, {}
        return taken

    def __bool__(self) -> bool:
        return bool(self.swap_outs or self.swap_ins or self.copies or self.releases
                    or self.dropped)


def _pop(d: dict[str, list], lane: str) -> dict[str, list]:
    return {lane: d.pop(lane)} if lane in d else {}


# lane → (the InferenceStub of the service holding it, the model's name there); raises
# SyscallError when that service is down
Route = Callable[[str], tuple[object, str]]


def send_swaps(io: PendingIo, route: Route, lock: object,
               lost: Callable[[Proc], None]) -> set[int]:
    """Swap-outs, then swap-ins, then block copies. A failed swap loses only that job's KV
    (`lost` makes it recompute; the pids whose swap-in failed are returned, to leave them out
    of this step); a failed copy raises: the step cannot run as planned."""
    for s in io.swap_outs:
        if s.proc.state in (State.ZOMBIE, State.REAPED):
            continue   # killed before its KV was saved: nothing to keep
        try:
            stub, model = route(s.lane)
            handle = stub.SwapOut(inference_pb2.SwapOutRequest(
                model=model, blocks=s.blocks), timeout=60).handle
        except RPC_ERRORS as e:
            log.warning("swap_out_failed", pid=s.proc.pid, error=str(e))
            with lock:
                lost(s.proc)
            continue
        log.info("job_swapped_out", pid=s.proc.pid, blocks=len(s.blocks))
        with lock:
            s.proc.swap_handle = handle
            if s.proc.state in (State.ZOMBIE, State.REAPED):   # killed meanwhile
                io.drop(s.lane, handle)
                s.proc.swap_handle = 0
    failed: set[int] = set()
    for s in io.swap_ins:
        try:
            if not s.proc.swap_handle:
                raise SyscallError("NOT_FOUND", "its swapped-out copy was never saved")
            stub, model = route(s.lane)
            stub.SwapIn(inference_pb2.SwapInRequest(
                model=model, handle=s.proc.swap_handle, blocks=s.blocks), timeout=60)
            log.info("job_swapped_in", pid=s.proc.pid, blocks=len(s.blocks))
        except RPC_ERRORS as e:
            log.warning("swap_in_failed", pid=s.proc.pid, error=str(e))
            failed.add(s.proc.pid)
            with lock:
                lost(s.proc)
        s.proc.swap_handle = 0
    for lane, pairs in io.copies.items():
        src, dst = zip(*pairs, strict=True)
        stub, model = route(lane)
        stub.CopyBlocks(inference_pb2.CopyBlocksRequest(model=model, src=src, dst=dst),
                        timeout=60)
    io.swap_outs, io.swap_ins, io.copies = [], [], {}
    return failed


def send_releases(io: PendingIo, route: Route) -> None:
    """Drop ended jobs' sampler state and unused swapped copies; a service that is down has
    dropped them already."""
    for lane in set(io.releases) | set(io.dropped):
        with contextlib.suppress(*RPC_ERRORS):
            stub, model = route(lane)
            stub.Release(inference_pb2.ReleaseRequest(
                model=model, seq_ids=io.releases.get(lane, []),
                swap_handles=io.dropped.get(lane, [])), timeout=30)
            if io.dropped.get(lane):
                log.info("swap_copies_dropped", model=lane, copies=len(io.dropped[lane]))
    io.releases, io.dropped = {}, {}
