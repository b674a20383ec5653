"""ShardedLlama: one tensor-parallel rank's LlamaModel. The forward is LlamaModel's, unchanged,
over the rank's shard (drivers/parallel/shard.py); the only two differences are collectives:
the O and down projections are row-parallel (their outputs are partial sums: one all-reduce
each), and the LM head holds a slice of the vocabulary (logits: one all-gather)."""

from __future__ import annotations

import torch

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.model.llama import LlamaModel, Weight
from llmasos.drivers.parallel.comm import Comm
from llmasos.drivers.parallel.shard import shard_config, shard_weights


class ShardedLlama(LlamaModel):
    def __init__(self, cfg: ModelConfig, weights: dict, comm: Comm,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        """cfg and weights are the whole model's; this rank keeps its shard."""
        super().__init__(shard_config(cfg, comm.world),
                         shard_weights(cfg, weights, comm.rank, comm.world), dtype, device)
        self.full_cfg, self.comm = cfg, comm
        # identity of the row-parallel weights: linear() reduces exactly their outputs
        self.row_parallel = {id(w) for layer in self.layers for w in (layer.o, layer.down)
                             } if comm.world > 1 else set()

    def linear(self, x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        y = super().linear(x, w, bias)
        return self.comm.all_reduce(y.contiguous()) if id(w) in self.row_parallel else y

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.comm.world == 1:
            return super().logits(h)
        parts = self.comm.all_gather(super().logits(h))
        return torch.cat(parts, dim=-1)[:, : self.full_cfg.vocab_size]
