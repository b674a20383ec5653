"""Comm: one tensor-parallel group's collectives on a torch.distributed c10d process group of
its own (gloo on CPU, NCCL on CUDA), so one service process can hold several groups (one per
model) beside each other. Nothing here moves a tensor by hand: every transfer is a c10d call."""

from __future__ import annotations

import pickle
from datetime import timedelta

import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"   # a group whose ranks all run on one host

class Comm:
    def __init__(self, store: dist.Store, rank: int, world: int, device: torch.device,
                 timeout: timedelta = timedelta(seconds=120), host: str = LOOPBACK) -> None:
        self.rank, self.world, self.device = rank, world, device
        self.store, self.timeout, self.host = store, timeout, host
        if device.type == "cuda":
            self.pg = dist.ProcessGroupNCCL(store, rank, world)
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            # the address the other ranks reach this one at: loopback when all share a host
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self.pg = dist.ProcessGroupGloo(store, rank, world, opts)

    def split(self, size: int) -> Comm:
        """The sub-group of `size` consecutive ranks this rank belongs to (a pipeline stage's
        tensor-parallel ranks); every rank of the group must call it."""
        color = self.rank // size
        store = dist.PrefixStore(f"split{size}/{color}", self.store)
        return Comm(store, self.rank % size, size, self.device, self.timeout, self.host)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place (the row-parallel projections' partial sums)."""
        self.pg.allreduce([t]).wait()
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.pg.allgather([out], [t.contiguous()]).wait()
        return out

    def broadcast(self, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        self.pg.broadcast([t], opts).wait()
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        self.pg.send([t], dst, 0).wait()

    def recv(self, t: torch.Tensor, src: int, tag: int = 0) -> torch.Tensor:
        self.pg.recv([t], src, tag).wait()
        return t

    def isend(self, t: torch.Tensor, dst: int, tag: int = 0) -> dist.Work:
        """A send that returns at once; keep t alive until .wait() (pipeline micro-batches)."""
        return self.pg.send([t], dst, tag)

    def irecv(self, t: torch.Tensor, src: int, tag: int = 0) -> dist.Work:
        return self.pg.recv([t], src, tag)

    def broadcast_object(self, obj: object = None, root: int = 0) -> object:
        """Rank root's obj on every rank: its pickled length, then its bytes, as two
        broadcasts (the step descriptor: small, and the same size on every rank after)."""
        if self.rank == root:
            works, _ = self.broadcast_object_async(obj)
            for work in works:
                work.wait()
            return obj
        size = self.broadcast(torch.empty(1, dtype=torch.int64, device=self.device), root)
        buf = self.broadcast(torch.empty(int(size.item()), dtype=torch.uint8,
                                         device=self.device), root)
        return pickle.loads(buf.cpu().numpy().tobytes())

    def broadcast_object_async(self, obj: object) -> tuple[list[dist.Work], list[torch.Tensor]]:
        """This rank's obj sent as broadcast_object sends it, without waiting for the others to
        take it (a pipeline's next step goes out while later stages still compute the one
        before): the works, and the tensors they send, which must outlive them."""
        payload = pickle.dumps(obj)
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        opts = dist.BroadcastOptions()
        opts.rootRank = self.rank
        return [self.pg.broadcast([size], opts), self.pg.broadcast([buf], opts)], [size, buf]

    def barrier_ok(self, ok: bool) -> bool:
        """True when every rank reports ok (a load that failed on one rank fails on all)."""
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=self.device)
        return int(self.all_reduce(flag).item()) == 0


def step_collectives(comm: Comm, rows: int, sampled: int, hidden: int, vocab_part: int,
                     layers: int) -> None:
    """One forward step's collectives without its compute (2 all-reduces of [rows, hidden]
    per layer, one all-gather of the sampled rows' logits): what tensor parallelism adds to a
    step, measured alone."""
    for _ in range(2 * layers):
        comm.all_reduce(torch.zeros(rows, hidden, device=comm.device))
    comm.all_gather(torch.zeros(sampled, vocab_part, device=comm.device))
