"""The CUDA side of the interface: the Triton int8/int4/Q8_0/Q4_1 weight-only matmuls
(drivers/cuda/quant_matmul.py) served as Packed weights. Triton is imported on first matmul."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmasos.drivers.cuda.quant import FORMATS, QuantWeight, quantize


@dataclass(eq=False)
class TritonLinear:
    qweight: QuantWeight
    inv_smooth: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.out_features

    @property
    def in_features(self) -> int:
        return self.qweight.in_features

    @property
    def nbytes(self) -> int:
        q = self.qweight
        return sum(t.nbytes for t in (q.qweight, q.scale, q.offset) if t is not None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        from llmasos.drivers.cuda.quant_matmul import quant_linear

        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        y = quant_linear(x, self.qweight)
        return y if bias is None else y + bias


class TritonQuant:
    """interface.QuantDriver for CUDA (or the CPU under TRITON_INTERPRET=1)."""

    name = "triton"
    formats = FORMATS

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)

    def quantize(self, w: torch.Tensor, fmt: str, smooth: torch.Tensor | None = None
                 ) -> TritonLinear:
        if fmt not in self.formats:
            raise ValueError(f"quant format {fmt!r} is not one of {list(self.formats)}")
        w = w.float() if smooth is None else w.float() * smooth[None, :]
        inv = None if smooth is None else (1.0 / smooth).to(self.device)
        return TritonLinear(quantize(w, fmt).to(self.device), inv)
