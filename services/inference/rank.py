"""python -m llmasos.services.inference.rank --rank R --world N --store HOST:PORT --host ADDR
--model M: one worker rank of a tensor- or pipeline-parallel model, started by rank 0
(parallel.py) or, for a rank placed on another host, by that host's node agent. It joins the
group at rank 0's c10d store, reads its RankArgs there, loads its shard (or stage) and KV pool,
then runs every operation rank 0 broadcasts until told to exit. It exits when its parent goes
away (its parent changes) or any collective fails."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from collections import deque

import structlog
import torch
import torch.distributed as dist

from llmasos.drivers.loaders.cache import load_weights
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.model.llama import LlamaModel
from llmasos.drivers.parallel.comm import Comm, step_collectives
from llmasos.drivers.parallel.stage import Flight, StageLlama
from llmasos.services.fast_exit import exit_now
from llmasos.services.inference.engine import DTYPES
from llmasos.services.inference.parallel import (
    ARGS_KEY,
    COLLECTIVE_TIMEOUT,
    RENDEZVOUS_TIMEOUT,
    RankArgs,
    rank_device,
    rank_model,
    rank_pool,
)

log = structlog.get_logger()


def watch_parent(ppid: int) -> None:
    """Exit as soon as rank 0 is gone (re-parented: our parent id changes)."""
    while os.getppid() == ppid:
        time.sleep(0.5)
    os._exit(1)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="llmasos.services.inference.rank")
    for flag in ("rank", "world"):
        ap.add_argument(f"--{flag}", type=int, required=True)
    ap.add_argument("--store", required=True, help="rank 0's c10d store, HOST:PORT")
    ap.add_argument("--host", required=True, help="this host's address the other ranks reach")
    ap.add_argument("--model", required=True)
    return ap.parse_args(argv)


def load(comm: Comm, args: RankArgs) -> tuple[LlamaModel, KVPool]:
    cfg, weights, _ = load_weights(args.path, args.cache_dir, progress=False)
    dtype = DTYPES[args.dtype]
    model = rank_model(args, cfg, weights, comm, dtype)
    return model, rank_pool(model.cfg, args, dtype)


MAX_FLIGHTS = 8   # a pp stage's steps whose sends may still be under way


def serve(comm: Comm, model: LlamaModel | None, pool: KVPool | None) -> int:
    """Run rank 0's operations until "exit" (model is None after a failed load)."""
    flights: deque[Flight] = deque()
    while True:
        op, args = comm.broadcast_object()
        if op == "exit":
            return 0
        if op == "ping" or model is None or pool is None:
            continue
        if op == "step" and isinstance(model, StageLlama):
            # pp (batch, parts, seq): the next stage takes this step's hidden states when it is
            # done with the step before, so this stage goes on without waiting for that
            flights.append(model.launch(args[0], pool, *args[1:]))
            while len(flights) > MAX_FLIGHTS:
                flights.popleft().wait()
        elif op == "step":
            model.forward(args[0], pool)
        elif op == "copy_blocks":
            pool.copy_blocks(*args)
        elif op == "read_blocks":
            comm.all_gather(pool.read_blocks(args[0]))
        elif op == "probe":   # bench/parallel.py: the collectives of a step, alone
            step_collectives(comm, *args)
        elif op == "write_blocks":
            blocks = args[0]
            shape = (comm.world, *pool.kv[:, :, blocks].shape)
            full = comm.broadcast(torch.empty(shape, dtype=pool.kv.dtype, device=pool.device))
            pool.write_blocks(blocks, full[comm.rank])
        else:
            raise ValueError(f"unknown tp operation {op!r}")


def main(argv: list[str]) -> int:
    a = parse(argv)
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
    structlog.contextvars.bind_contextvars(tp_rank=a.rank, model=a.model)
    host, _, port = a.store.rpartition(":")
    store = dist.TCPStore(host.strip("[]"), int(port), a.world, is_master=False,
                          timeout=RENDEZVOUS_TIMEOUT)
    args = RankArgs(**json.loads(store.get(ARGS_KEY)))
    args = dataclasses.replace(args, device=rank_device(args.device, a.rank))
    if args.device.startswith("cuda"):
        torch.cuda.set_device(args.device)   # NCCL's communicator takes the current device
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // a.world))  # a share
    comm = Comm(store, a.rank, a.world, torch.device(args.device), COLLECTIVE_TIMEOUT, a.host)
    model, pool = None, None
    try:
        model, pool = load(comm, args)
    except Exception as err:  # noqa: BLE001 - reported to rank 0 through the barrier
        log.error("tp_rank_load_failed", error=str(err))
    if not comm.barrier_ok(model is not None):
        model, pool = None, None
    else:
        comm.all_reduce(torch.tensor([model.weight_bytes], dtype=torch.int64,
                                     device=args.device))
    try:
        return serve(comm, model, pool)
    except Exception as err:  # noqa: BLE001 - rank 0 gone or the group broken
        log.error("tp_rank_failed", error=str(err))
        return 1


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
