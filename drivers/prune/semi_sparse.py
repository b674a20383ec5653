"""Serving a 2:4 folder: on CUDA GPUs of compute capability 8.0 or newer (sparse tensor cores),
each linear weight with the 2:4 pattern becomes a torch semi-structured sparse tensor at load,
which runs the matmul on half the weights; elsewhere the weights stay dense (the zeros multiply
as any value would). The model calls w.matmul(x, bias) on a weight that is not a plain tensor
(drivers/quant/interface.py's Packed), so SemiSparse wraps the sparse tensor that way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
import torch
import torch.nn.functional as F

from llmasos.drivers.prune.unstructured import is_two_four

log = structlog.get_logger()
LAYER_KINDS = ("qkv", "o", "gate_up", "down")
MIN_CAPABILITY = (8, 0)


def supported(device: torch.device) -> bool:
    """Does this device run semi-structured sparse matmuls?"""
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY
            and hasattr(torch.sparse, "to_sparse_semi_structured"))


def sparse_class(dtype: torch.dtype) -> Any | None:
    """cuSPARSELt where it serves the dtype (fp16, bf16, int8), else CUTLASS (also fp32)."""
    lt = torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    if torch.backends.cusparselt.is_available() and dtype in lt._DTYPE_SHAPE_CONSTRAINTS:
        return lt
    cutlass = torch.sparse.SparseSemiStructuredTensorCUTLASS
    return cutlass if dtype in cutlass._DTYPE_SHAPE_CONSTRAINTS else None


@dataclass
class SemiSparse:
    """A 2:4 weight [out_features, in_features] as a semi-structured sparse tensor."""

    w: torch.Tensor
    out_features: int
    in_features: int
    dense_nbytes: int

    @classmethod
    def pack(cls, w: torch.Tensor) -> SemiSparse:
        kind = sparse_class(w.dtype)
        if kind is None:
            raise ValueError(f"no semi-structured sparse kernel for {w.dtype}")
        return cls(kind.from_dense(w), w.shape[0], w.shape[1], w.nbytes)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.w, bias)

    @property
    def nbytes(self) -> int:
        """Half the values plus the 2-bit-per-value metadata: ~9/16 of dense in fp16."""
        parts = [getattr(self.w, n, None) for n in ("packed", "meta")]
        return sum(p.nbytes for p in parts if isinstance(p, torch.Tensor)) or self.dense_nbytes


def apply(model: Any) -> int:
    """Pack the model's 2:4 linear weights where the device runs them; returns how many.
    A weight whose shape or dtype the kernels refuse stays dense (and is logged)."""
    if not supported(model.device):
        return 0
    packed = 0
    for i, layer in enumerate(model.layers):
        for kind in LAYER_KINDS:
            w = getattr(layer, kind)
            if not isinstance(w, torch.Tensor) or not is_two_four(w):
                continue
            try:
                setattr(layer, kind, SemiSparse.pack(w))
                packed += 1
            except (RuntimeError, ValueError) as err:
                log.warning("semi_sparse_dense", layer=i, kind=kind, error=str(err))
    log.info("semi_sparse_packed", weights=packed)
    if packed and hasattr(model, "weights_changed"):
        model.weights_changed()
    return packed
