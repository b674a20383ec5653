"""An int8 embedding table (symmetric, one scale per row) that F.embedding reads as it is.

Not a tensor: it answers F.embedding through __torch_function__ (PyTorch's protocol for
tensor-like objects), so the model's `F.embedding(ids, self.embed)` needs no change."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(eq=False)
class Int8Embedding:
    q: torch.Tensor      # int8 [vocab, hidden]
    scale: torch.Tensor  # fp32 [vocab, 1]

    @classmethod
    def quantize(cls, table: torch.Tensor) -> Int8Embedding:
        t = table.float()
        scale = t.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        return cls(torch.round(t / scale).clamp(-127, 127).to(torch.int8), scale)

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].float() * self.scale[ids]

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func is F.embedding and len(args) == 2 and isinstance(args[1], cls):
            return args[1].rows(args[0])
        return NotImplemented
