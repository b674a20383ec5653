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

import torch

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.model.batch import StepBatch
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.model.llama import LlamaModel
from llmasos.drivers.parallel.comm import Comm
from llmasos.drivers.parallel.micro import micro_batches
from llmasos.drivers.parallel.model import ShardedLlama
from llmasos.drivers.parallel.shard import shard_config, shard_weights

LAYER = re.compile(r"^model\.layers\.(\d+)\.")


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

    def forward(self, batch: StepBatch, pool: KVPool, parts: int = 1) -> torch.Tensor:
        """Run the step as `parts` micro-batches (micro.py): each part's hidden states go on to the
        next stage as soon as they are computed (isend), so the stages overlap. The logits
        travel back after every hidden state has gone out, on both sides in part order: no
        pair of ranks ever waits on each other in opposite orders (NCCL serialises a pair's
        sends and receives)."""
        if parts == 1:   # no overlap: this rank may use what its process has
            return self.pipeline([batch], pool)
        with cpu_threads(self.threads):   # stages run at once: each keeps to its share
            return self.pipeline(micro_batches(batch, parts), pool)

    def pipeline(self, parts: list[StepBatch], pool: KVPool) -> torch.Tensor:
        pipe, rank = self.pipe, self.pipe.rank
        self.part_rows = [p.input_ids.shape[0] for p in parts]
        last_head = pipe.world - self.tp   # the last stage's first rank sends the logits back
        sends, outs = [], []
        for i, part in enumerate(parts):
            out = self.stage_forward(part, pool, i).contiguous()
            outs.append(out)   # an isend's tensor must outlive it
            if not self.last:
                sends.append(pipe.isend(out, rank + self.tp, i))
        if rank == last_head and not self.first:
            sends += [pipe.isend(out, 0, i) for i, out in enumerate(outs) if out.numel()]
        back = []
        if rank == 0 and not self.last:   # rank 0 samples: the logits come back
            back = [torch.empty(p.sample_rows.shape[0], self.full_cfg.vocab_size,
                                dtype=torch.float32, device=self.device) for p in parts]
            for i, logits in enumerate(back):
                if logits.numel():
                    pipe.recv(logits, last_head, i)
        for work in sends:
            work.wait()
        res = back or outs
        return res[0] if len(res) == 1 else torch.cat(res)

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
