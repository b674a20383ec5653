"""The one interface every quantized-matmul driver serves: quantize once at load, then
matmul per step. A model holds Packed weights where it held fp32 tensors and calls .matmul."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Packed(Protocol):
    """A weight W [out_features, in_features] in a driver's own layout; y = x @ W.T + bias."""

    out_features: int
    in_features: int

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...


class QuantDriver(Protocol):
    """Turns fp32 weights into Packed ones. `smooth` (optional, [in_features]) is the
    SmoothQuant factor: the driver computes (x / smooth) @ (W * smooth).T."""

    name: str
    formats: tuple[str, ...]

    def quantize(self, w: torch.Tensor, fmt: str, smooth: torch.Tensor | None = None
                 ) -> Packed: ...
