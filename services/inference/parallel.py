"""Tensor and pipeline parallelism, rank 0's side. A model loaded with tp=N (or pp=N) runs as
N ranks: this process (rank 0, the one the kernel talks to) and N-1 worker processes (rank.py)
it starts and owns.
Every operation on the model's KV pool or forward pass is first broadcast to the workers as a
small descriptor, then run by every rank on its shard, with the collectives inside the forward.

Faults: a worker that exits, or a collective that fails or times out, leaves the group broken;
this process then exits non-zero, so the kernel's supervisor restarts the inference service
and recomputes the jobs (the workers exit when they see their parent gone)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import structlog
import torch
import torch.distributed as dist

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.model.batch import StepBatch
from llmasos.drivers.model.kv_pool import KVPool, PoolGeometry
from llmasos.drivers.parallel.comm import LOOPBACK, Comm, step_collectives
from llmasos.drivers.parallel.micro import MIN_PART_ROWS, micro_count
from llmasos.drivers.parallel.model import ShardedLlama
from llmasos.drivers.parallel.shard import check_degree
from llmasos.drivers.parallel.stage import Flight, StageLlama, check_stages

log = structlog.get_logger()

RENDEZVOUS_TIMEOUT = timedelta(seconds=300)  # workers import torch and load on a busy host
COLLECTIVE_TIMEOUT = timedelta(seconds=300)  # a rank silent this long is declared hung
HEARTBEAT_S = 10.0  # an idle group pings its workers well inside the collective timeout
BROKEN_EXIT = 75  # this process's exit status when a group breaks
ARGS_KEY = "rank_args"   # the store key rank 0 publishes RankArgs under, for every worker


@dataclass(frozen=True)
class RankArgs:
    """What a worker rank needs to load its shard: passed on its command line."""

    path: str
    cache_dir: str   # the converted-weights cache the engine reads
    dtype: str
    device: str
    block_size: int
    kv_budget_bytes: int  # this rank's share
    mode: str = "tp"  # "tp": heads split across ranks; "pp": layers split into stages
    tp: int = 1  # with mode "pp": tensor-parallel ranks per stage
    threads: int = 0  # torch threads of each rank (0: the host's cores // world)


@dataclass(frozen=True)
class Spread:
    """Where a group's ranks run. All here by default; a group across hosts binds its c10d
    store and gloo to this host's address the others reach, on the port the kernel chose, and
    the `remote` ranks are started by the nodes the kernel asks (kernel/nodes.py)."""

    address: str = LOOPBACK
    port: int = 0   # 0: any free port (every rank is started here and told it)
    remote: tuple[int, ...] = ()


ALL_HERE = Spread()   # every rank on this host, on loopback


def rank_device(device: str, rank: int) -> str:
    """One GPU per rank where the process sees several: rank r takes cuda:(r mod GPUs), so
    rank 0 keeps the service's cuda:0 and the others the GPUs after it (a replica's service
    sees its own first: kernel/replicas.gpu_env). On the CPU every rank takes a share of the
    cores instead (RankArgs.threads)."""
    if device != "cuda":
        return device
    n = torch.cuda.device_count()
    return f"cuda:{rank % n}" if n > 1 else device


def rank_pool(cfg: ModelConfig, a: RankArgs, dtype: torch.dtype) -> KVPool:
    """One rank's KV pool: its KV heads' share of every block (cfg is the rank's)."""
    return KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, a.kv_budget_bytes,
                  a.block_size, dtype, a.device)


def rank_model(args: RankArgs, cfg: ModelConfig, weights: dict, comm: Comm,
               dtype: torch.dtype) -> ShardedLlama | StageLlama:
    """This rank's part of the model: its heads' shard (tp) or its stage's layers (pp)."""
    if args.mode == "pp":
        return StageLlama(cfg, weights, comm, comm.split(args.tp), dtype, args.device)
    return ShardedLlama(cfg, weights, comm, dtype, args.device)


def rank_argv(model: str, rank: int, world: int, store: str, host: str) -> list[str]:
    """rank.py's command line: the rest of what it needs it reads from the store (ARGS_KEY)."""
    return [f"--rank={rank}", f"--world={world}", f"--store={store}", f"--host={host}",
            f"--model={model}"]


EXIT_ON_BREAK = False   # set by the service's __main__: a broken group exits the process


class GroupBroken(RuntimeError):
    """A rank group cannot go on (an engine composed in-process, e.g. by tests)."""


def broken(what: str, err: BaseException | None = None) -> None:
    """The group cannot go on: in the service, exit so the supervisor restarts it; composed
    in-process (tests, benches), raise instead of taking the host process down."""
    log.error("tp_group_broken", what=what, error=str(err) if err else "")
    if not EXIT_ON_BREAK:
        raise GroupBroken(f"{what}: {err}" if err else what)
    sys.stderr.flush()
    os._exit(BROKEN_EXIT)


class RankGroup:
    """The workers of one tp model, their lifetime, and the broadcast of every operation."""

    def __init__(self, name: str, tp: int, args: RankArgs, spread: Spread = ALL_HERE) -> None:
        self.name, self.tp, self.args, self.spread = name, tp, args, spread
        self.lock = threading.Lock()  # one operation at a time on the group
        self.closing = False
        self.ready = False  # no heartbeat before every rank has loaded (it would interleave)
        self.last_op = time.monotonic()
        self.store = dist.TCPStore(spread.address, spread.port, tp, is_master=True,
                                   timeout=RENDEZVOUS_TIMEOUT, wait_for_workers=False)
        self.store.set(ARGS_KEY, json.dumps(dataclasses.asdict(args)))  # workers read it
        self.procs = [self._start(r) for r in range(1, tp) if r not in spread.remote]
        self.comm = self._rendezvous(torch.device(args.device))
        threading.Thread(target=self._watch, daemon=True, name=f"tp-watch-{name}").start()

    def _start(self, rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "llmasos.services.inference.rank", *rank_argv(
            self.name, rank, self.tp, f"{self.spread.address}:{self.store.port}",
            self.spread.address)]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def _rendezvous(self, device: torch.device) -> Comm:
        """Join the group, giving up early if a worker dies before it joins."""
        box: dict[str, object] = {}

        def join() -> None:
            try:
                box["comm"] = Comm(self.store, 0, self.tp, device, COLLECTIVE_TIMEOUT,
                                   self.spread.address)
            except Exception as err:  # noqa: BLE001 - reported below
                box["error"] = err
        t = threading.Thread(target=join, daemon=True)
        t.start()
        while t.is_alive():
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                self.kill()
                raise RuntimeError(f"tp rank process exited with {dead[0].returncode} "
                                   "before joining the group (see the service log)")
            t.join(0.2)
        if "error" in box:
            self.kill()
            raise RuntimeError(f"tp rendezvous failed: {box['error']}")
        return box["comm"]  # type: ignore[return-value]

    def _watch(self) -> None:
        """A worker that exits breaks the group; an idle group is pinged (see HEARTBEAT_S)."""
        while not self.closing:
            if any(p.poll() is not None for p in self.procs) and not self.closing:
                broken(f"a rank of model {self.name!r} exited")
            if self.ready and time.monotonic() - self.last_op > HEARTBEAT_S:
                self.send("ping")
            time.sleep(0.2)

    def send(self, op: str, *args: object) -> None:
        """Broadcast one operation to the workers (the caller holds self.lock for ops that
        run collectives after it, so nothing interleaves)."""
        with self.lock:
            self._send(op, args)

    def _send(self, op: str, args: tuple) -> None:
        if self.closing and op != "exit":
            return
        try:
            self.comm.broadcast_object((op, args))
        except Exception as err:  # noqa: BLE001 - any collective failure breaks the group
            broken(f"broadcast of {op} for {self.name!r}", err)
        self.last_op = time.monotonic()

    def collective(self, op: str, args: tuple, local: object) -> object:
        """Broadcast op, then run local() (rank 0's part, with its collectives) under the
        lock; a failure in either breaks the group."""
        with self.lock:
            self._send(op, args)
            try:
                return local()  # type: ignore[operator]
            except Exception as err:  # noqa: BLE001
                broken(f"{op} on {self.name!r}", err)
            finally:
                self.last_op = time.monotonic()
        return None

    def launch(self, op: str, args: tuple, local: Callable[[], Flight]) -> Flight:
        """Send op to the workers without waiting for them to take it, then run local() (rank
        0's stage, which posts its transfers and returns): a pipeline's next step goes out
        while later stages compute earlier ones. The flight's wait covers the send of op."""
        with self.lock:
            if self.closing:
                raise GroupBroken(f"model {self.name!r} is being unloaded")
            try:
                sent = self.comm.broadcast_object_async((op, args))
                flight = local()
            except Exception as err:  # noqa: BLE001 - any failure breaks the group
                broken(f"{op} on {self.name!r}", err)
                raise
            finally:
                self.last_op = time.monotonic()
            flight.add(*sent)
            return flight

    def probe(self, rows: int, sampled: int, hidden: int, vocab_part: int, layers: int
              ) -> float:
        """Seconds one step's collectives take on their own (bench/parallel.py)."""
        shape = (rows, sampled, hidden, vocab_part, layers)
        t0 = time.perf_counter()
        self.collective("probe", shape, lambda: step_collectives(self.comm, *shape))
        return time.perf_counter() - t0

    def close(self) -> None:
        with self.lock:
            self.closing = True
            with contextlib.suppress(Exception):  # a broken group is killed below anyway
                self.comm.broadcast_object(("exit", ()))
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def kill(self) -> None:
        self.closing = True
        for p in self.procs:
            p.kill()
            p.wait()


class TPModel:
    """Rank 0's model as the engine sees it: each forward is broadcast first."""

    def __init__(self, local: ShardedLlama | StageLlama, group: RankGroup) -> None:
        self.local, self.group = local, group
        self.cfg, self.kernels = local.cfg, local.kernels
        self.min_part_rows = MIN_PART_ROWS   # pp: a step is cut only into parts this big
        self.stages = group.tp // group.args.tp if group.args.mode == "pp" else 1
        self.pipelined = self.stages > 1 and torch.device(group.args.device).type != "cuda"
        self.count_lock = threading.Lock()
        self.seq = 0   # steps launched: each one's transfers are tagged with its number
        self.in_flight = self.peak_in_flight = 0   # launched, not yet landed (tests, bench)

    def forward(self, batch: StepBatch, pool: TPPool) -> torch.Tensor:
        if self.stages > 1:
            return self.launch(batch, pool).wait()
        return self.group.collective("step", (batch,), lambda: self.local.forward(
            batch, pool.local))  # type: ignore[return-value]

    def launch(self, batch: StepBatch, pool: TPPool) -> StepFlight:
        """pp: start the step down the pipeline and return; wait() gives its logits. Steps of
        different jobs launched one after another are in flight at once, each in its own
        stage (the kernel keeps one step in flight per slot of the model: kernel/replicas.py).
        On CUDA a step is waited for before the next one goes out (NCCL orders a pair's sends
        and receives: two steps in flight would wait on each other)."""
        k = micro_count(batch, self.stages, self.min_part_rows)   # every rank gets rank 0's
        if k == 1:   # the layout only serves to cut the batch: not worth pickling
            batch = dataclasses.replace(batch, layout=None)
        with self.count_lock:
            self.seq += 1
            seq, overlap = self.seq, k > 1 or self.in_flight > 0
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            flight = self.group.launch("step", (batch, k, seq), lambda: self.local.launch(
                batch, pool.local, k, seq, overlap))
        except BaseException:
            self.landed()
            raise
        out = StepFlight(self, flight)
        if not self.pipelined:   # waited for here: nothing of it is left in flight
            out = StepFlight(self, Flight(logits=[out.wait()]), done=True)
        return out

    def landed(self) -> None:
        with self.count_lock:
            self.in_flight -= 1

    def close(self) -> None:
        self.group.close()


class StepFlight:
    """One pp step in flight, as the engine holds it: wait() (on any thread) gives the logits;
    a transfer that fails breaks the group."""

    def __init__(self, model: TPModel, flight: Flight, done: bool = False) -> None:
        self.model, self.flight, self.done = model, flight, done

    def wait(self) -> torch.Tensor:
        try:
            return self.flight.wait()
        except Exception as err:  # noqa: BLE001 - a rank gone mid-step
            broken(f"step of {self.model.group.name!r}", err)
            raise
        finally:
            if not self.done:
                self.done = True
                self.model.landed()


class TPPool:
    """Rank 0's KV pool as the engine sees it: the whole model's geometry (every rank holds
    its heads' or its layers' share of each block); copies and swaps run on every rank."""

    def __init__(self, local: KVPool, group: RankGroup) -> None:
        self.local, self.group = local, group
        g, n = local.geometry, group.tp
        tp = n if group.args.mode == "tp" else group.args.tp
        self.geometry: PoolGeometry = dataclasses.replace(
            g, block_bytes=g.block_bytes * n, kv_heads=g.kv_heads * tp,
            num_layers=g.num_layers * (n // tp))

    def check(self, blocks: list[int]) -> None:
        self.local.check(blocks)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        if len(src) != len(dst):
            raise ValueError("src and dst must have the same length")
        self.check(src + dst)
        self.group.collective("copy_blocks", (src, dst),
                              lambda: self.local.copy_blocks(src, dst))

    def read_blocks(self, blocks: list[int]) -> torch.Tensor:
        """Every rank's share, gathered here: [tp, layers, 2, n, block, kv_heads/tp, dim]."""
        self.check(blocks)
        comm = self.group.comm
        return self.group.collective("read_blocks", (blocks,), lambda: torch.stack(
            comm.all_gather(self.local.read_blocks(blocks))).cpu())  # type: ignore[return-value]

    def write_blocks(self, blocks: list[int], data: torch.Tensor) -> None:
        self.check(blocks)
        if data.shape[3] != len(blocks):
            raise ValueError(f"swap handle holds {data.shape[3]} blocks, got {len(blocks)}")
        comm = self.group.comm

        def local() -> None:
            full = comm.broadcast(data.to(self.local.device).contiguous())
            self.local.write_blocks(blocks, full[0])
        self.group.collective("write_blocks", (blocks,), local)


def load_parallel(name: str, tp: int, pp: int, cfg: ModelConfig, weights: dict,
                  dtype: torch.dtype, args: RankArgs, spread: Spread = ALL_HERE
                  ) -> tuple[TPModel, TPPool, int]:
    """Start the workers, build rank 0's part and pool; (model, pool, weight bytes over all
    ranks). ValueError when the degree does not split the model; RuntimeError when a rank
    fails to load."""
    check_degree(cfg, tp)
    check_stages(cfg, pp)
    world = tp * pp   # ranks s*tp .. s*tp+tp-1 are stage s's tensor-parallel shards
    args = dataclasses.replace(args, mode="pp" if pp > 1 else "tp", tp=tp)
    if any(not 0 < r < world for r in spread.remote):
        raise ValueError(f"remote ranks {list(spread.remote)} are not worker ranks of "
                         f"{world} (rank 0 runs here)")
    group = RankGroup(name, world, args, spread)
    ok, model, pool = True, None, None
    try:
        model = rank_model(args, cfg, weights, group.comm, dtype)
        pool = rank_pool(model.cfg, args, dtype)
    except Exception as err:  # noqa: BLE001 - every rank must reach the check below
        ok, failure = False, err
    with group.lock:
        all_ok = group.comm.barrier_ok(ok)
    if not all_ok:
        group.close()
        if not ok:
            raise failure
        raise RuntimeError(f"a tp rank of {name!r} failed to load (see the service log)")
    total = torch.tensor([model.weight_bytes], dtype=torch.int64, device=args.device)
    with group.lock:
        group.comm.all_reduce(total)
    group.last_op, group.ready = time.monotonic(), True
    log.info("parallel_loaded", name=name, tp=tp, pp=pp, pids=[p.pid for p in group.procs],
             remote=list(spread.remote), address=spread.address)
    return TPModel(model, group), TPPool(pool, group), int(total.item())
