"""Pipeline parallelism: stage s of M holds layers [s*L/M, (s+1)*L/M) and their KV. The first
stage embeds, the last one normalises and computes the logits; hidden states pass between
stages with point-to-point sends, and the last stage sends the logits back to stage 0, which
samples. Each stage runs LlamaModel's forward, unchanged, over its layers: a middle or last
stage feeds the received hidden states in as its "embedding table" (looked up by row index),
and a stage other than the last returns every row's hidden state instead of logits."""

from __future__ import annotations

import dataclasses
import re

import torch

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.model.batch import StepBatch
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.model.llama import LlamaModel
from llmasos.drivers.parallel.comm import Comm

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


class StageLlama(LlamaModel):
    def __init__(self, cfg: ModelConfig, weights: dict, comm: Comm,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        """cfg and weights are the whole model's; this rank (stage comm.rank) keeps its layers."""
        check_stages(cfg, comm.world)
        stage, pp = comm.rank, comm.world
        super().__init__(dataclasses.replace(cfg, num_layers=cfg.num_layers // pp),
                         stage_weights(cfg, weights, stage, pp), dtype, device)
        self.full_cfg, self.comm = cfg, comm
        self.first, self.last = stage == 0, stage == pp - 1
        self.table = self.embed   # the real embedding table (first stage)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if weight is self.norm and not self.last:   # the final norm belongs to the last stage
            return x
        return super().rms_norm(x, weight)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return super().logits(h) if self.last else h

    def forward(self, batch: StepBatch, pool: KVPool) -> torch.Tensor:
        comm, rank, t = self.comm, self.comm.rank, batch.input_ids.shape[0]
        rows = torch.arange(t, device=self.device)
        run = batch
        if not self.first:   # the previous stage's hidden states, looked up by row
            x = torch.empty(t, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            comm.recv(x, rank - 1)
            self.embed = x
            run = dataclasses.replace(run, input_ids=rows)
        if not self.last:
            run = dataclasses.replace(run, sample_rows=rows)
        out = super().forward(run, pool)
        self.embed = self.table
        if not self.last:
            comm.send(out.contiguous(), rank + 1)
        if self.first and not self.last:   # stage 0 samples: the logits come back
            out = torch.empty(batch.sample_rows.shape[0], self.full_cfg.vocab_size,
                              dtype=torch.float32, device=self.device)
            comm.recv(out, comm.world - 1)
        elif self.last and not self.first:
            comm.send(out.contiguous(), 0)
        return out
