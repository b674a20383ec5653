"""Pipeline parallelism: stage s of M holds layers [s*L/M, (s+1)*L/M) and their KV. The first
stage embeds, the last one normalises and computes the logits; hidden states pass between
stages with point-to-point sends, and the last stage sends the logits back to rank 0, which
samples. Each stage runs LlamaModel's forward, unchanged, over its layers: a middle or last
stage feeds the received hidden states in as its "embedding table" (looked up by row index),
and a stage other than the last returns every row's hidden state instead of logits.

With tp > 1 too, each stage is tp ranks (ranks s*tp .. s*tp+tp-1) holding a tensor-parallel
shard of the stage's layers; rank s*tp+t hands its (replicated) hidden states to rank
(s+1)*tp+t."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.model.batch import StepBatch
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.model.llama import LlamaModel
from llmasos.drivers.parallel.comm import Comm
from llmasos.drivers.parallel.micro import micro_batches
from llmasos.drivers.parallel.model import ShardedLlama
from llmasos.drivers.parallel.shard import shard_config, shard_weights

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
MAX_PARTS = 64   # tags: a step's parts are numbered below this (parts <= stages <= layers)


def tag(seq: int, part: int) -> int:
    """The send/recv tag of one part of step seq: steps in flight at once never share one."""
    return (seq % 65536) * MAX_PARTS + part


@dataclass
class Flight:
    """One step launched down the pipeline from this rank: its sends and receives under way,
    the tensors they use, and (rank 0) the logits they fill."""

    works: list[dist.Work] = field(default_factory=list)
    keep: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    def add(self, works: list[dist.Work], tensors: list[torch.Tensor]) -> None:
        """The step descriptor's sends and their tensors, waited for with the step's."""
        self.works += works
        self.keep += tensors

    def wait(self) -> torch.Tensor:
        """Every transfer done: rank 0's logits (the last stage's, the others' hidden states)."""
        for work in self.works:
            work.wait()
        self.works = []
        return self.logits[0] if len(self.logits) == 1 else torch.cat(self.logits)


def valid_stages(cfg: ModelConfig) -> list[int]:
    """Pipeline degrees that split the layers evenly (every stage's KV share the same shape)."""
    return [m for m in range(1, cfg.num_layers + 1) if cfg.num_layers % m == 0]


def check_stages(cfg: ModelConfig, pp: int) -> None:
    if pp < 1 or pp not in valid_stages(cfg):
        raise ValueError(f"pp={pp} does not split this model's {cfg.num_layers} layers evenly; "
                         f"valid pp: {valid_stages(cfg)}")


def stage_weights(cfg: ModelConfig, weights: dict, stage: int, pp: int) -> dict:
    """The stage's layers renumbered from 0; embedding, final norm and LM head kept."""
    per = cfg.num_layers // pp
    out = {}
    for name, t in weights.items():
        m = LAYER.match(name)
        if m is None:
            out[name] = t
        elif stage * per <= int(m.group(1)) < (stage + 1) * per:
            out[f"model.layers.{int(m.group(1)) - stage * per}.{name[m.end():]}"] = t
    return out


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n for the block (rank 0's process serves other models
    with its own count)."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


class StageLlama(ShardedLlama):
    def __init__(self, cfg: ModelConfig, weights: dict, comm: Comm, tp_comm: Comm,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        """cfg and weights are the whole model's; comm spans every rank, tp_comm this stage's
        ranks. This rank keeps its stage's layers (and its tp shard of them)."""
        tp = tp_comm.world
        pp, stage = comm.world // tp, comm.rank // tp
        check_stages(cfg, pp)
        LlamaModel.__init__(
            self, dataclasses.replace(shard_config(cfg, tp), num_layers=cfg.num_layers // pp),
            stage_weights(cfg, shard_weights(cfg, weights, tp_comm.rank, tp), stage, pp),
            dtype, device)
        self.full_cfg, self.comm, self.pipe, self.tp = cfg, tp_comm, comm, tp
        self.row_parallel = {id(w) for layer in self.layers for w in (layer.o, layer.down)
                             } if tp > 1 else set()
        self.first, self.last = stage == 0, stage == pp - 1
        self.table = self.embed   # the real embedding table (first stage)
        self.part_rows: list[int] = []   # the last step's micro-batches' rows (tests, bench)
        # while stages overlap, each rank one share of the host's cores, rank 0 too (rank.py
        # sets the workers'): 2 threads beside a busy stage on 2 cores run slower than 1
        self.threads = max(1, (os.cpu_count() or 1) // comm.world)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        if weight is self.norm and not self.last:   # the final norm belongs to the last stage
            return x
        return super().rms_norm(x, weight, bias)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(h) if self.last else h

    def forward(self, batch: StepBatch, pool: KVPool, parts: int = 1, seq: int = 0
                ) -> torch.Tensor:
        """The step, waited for: logits on rank 0 (launch, then Flight.wait)."""
        return self.launch(batch, pool, parts, seq, overlap=parts > 1).wait()

    def launch(self, batch: StepBatch, pool: KVPool, parts: int = 1, seq: int = 0,
               overlap: bool = False) -> Flight:
        """Run this stage's share of step `seq` as `parts` micro-batches (micro.py), sending
        each part's hidden states on as soon as they are computed (isend), and return without
        waiting for the later stages: rank 0 launches the next step (another job's) while they
        compute this one. Rank 0 posts the receives of the logits here, before any later step's
        sends, so the last stage never waits on it. overlap: other stages compute meanwhile,
        so this rank keeps to its share of the cores."""
        runs = micro_batches(batch, parts) if parts > 1 else [batch]
        if not overlap:   # no overlap: this rank may use what its process has
            return self.pipeline(runs, pool, seq)
        with cpu_threads(self.threads):
            return self.pipeline(runs, pool, seq)

    def pipeline(self, parts: list[StepBatch], pool: KVPool, seq: int) -> Flight:
        pipe, rank = self.pipe, self.pipe.rank
        self.part_rows = [p.input_ids.shape[0] for p in parts]
        last_head = pipe.world - self.tp   # the last stage's first rank sends the logits back
        flight = Flight()
        early = self.device.type != "cuda"   # gloo: a receive posted early blocks nothing
        if early:
            self.receive_logits(flight, parts, seq)
        for i, part in enumerate(parts):
            out = self.stage_forward(part, pool, tag(seq, i)).contiguous()
            flight.keep.append(out)   # an isend's tensor must outlive it
            if not self.last:
                flight.works.append(pipe.isend(out, rank + self.tp, tag(seq, i)))
        if rank == last_head and not self.first:
            flight.works += [pipe.isend(out, 0, tag(seq, i))
                             for i, out in enumerate(flight.keep) if out.numel()]
        if not early:   # NCCL runs a pair's sends and receives in order: after the sends
            self.receive_logits(flight, parts, seq)
        if not flight.logits:
            flight.logits = flight.keep
        return flight

    def receive_logits(self, flight: Flight, parts: list[StepBatch], seq: int) -> None:
        """Rank 0 samples: it receives each part's logits from the last stage."""
        if self.pipe.rank != 0 or self.last:
            return
        for i, p in enumerate(parts):
            logits = torch.empty(p.sample_rows.shape[0], self.full_cfg.vocab_size,
                                 dtype=torch.float32, device=self.device)
            flight.logits.append(logits)
            if logits.numel():
                flight.works.append(self.pipe.irecv(logits, self.pipe.world - self.tp,
                                                    tag(seq, i)))

    def stage_forward(self, batch: StepBatch, pool: KVPool, tag: int) -> torch.Tensor:
        """This stage's layers over one micro-batch: logits on the last stage, every row's
        hidden state on the others."""
        t = batch.input_ids.shape[0]
        rows = torch.arange(t, device=self.device)
        run = batch
        if not self.first:   # the previous stage's hidden states, looked up by row
            x = torch.empty(t, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            self.pipe.recv(x, self.pipe.rank - self.tp, tag)
            self.embed = x
            run = dataclasses.replace(run, input_ids=rows)
        if not self.last:
            run = dataclasses.replace(run, sample_rows=rows)
        try:
            return super().forward(run, pool)
        finally:
            self.embed = self.table
