"""int8 linear on the CPU through this project's own kernel (drivers/cpu/int8_linear.c).

Weights: symmetric int8 per output channel in [-127, 127], in the kernel's block layout (plain
tensors, so what is resident is what nbytes counts). Activations: symmetric int8 per ROW,
quantized inside the kernel's call, so there is no separate per-row scaling pass, no anchor row
and no output rescale; the int8 products add exactly in int32, so a row's result is the same
bits alone or in any batch, on AVX-512 VNNI, AVX2 and the scalar C alike.

Where fbgemm's op costs its own activation pass, a packed-A buffer and a requantization per
call, this is one ctypes call streaming the weights once (measured on the embedded model's
layer shapes: bench/int8_linear.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmasos.drivers.cpu.int8_linear import Norm, PackedInt8, int8_linear, pack, unpack


@dataclass(eq=False)
class NativeInt8Linear:
    """A packed int8 weight [out_features, in_features]; serves interface.Packed."""

    out_features: int
    in_features: int
    packed: PackedInt8
    inv_smooth: torch.Tensor | None  # [K] fp32: x / smooth, folded into W at quantization

    @property
    def nbytes(self) -> int:
        extra = 0 if self.inv_smooth is None else self.inv_smooth.nbytes
        return self.packed.nbytes + extra

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2:   # the model's rows are 2-D already: no reshape on its path
            y = self.matmul(x.reshape(-1, self.in_features), bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        if x.dtype != torch.float32 or x.stride(1) != 1:
            x = x.float().contiguous()
        fused = bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
        y = int8_linear(x, self.packed, self.inv_smooth, bias if fused else None)
        return y if fused or bias is None else y.add_(bias)

    def matmul_silu(self, gate_up: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """silu(gate) * up through this weight, for a gated MLP's fused projection rows
        gate_up [T, 2 * in_features]: the product is formed as the kernel quantizes the rows,
        so the MLP's chunk, silu and multiply cost no passes of their own."""
        if gate_up.dtype != torch.float32 or gate_up.dim() != 2 or gate_up.stride(1) != 1:
            gate, up = gate_up.float().chunk(2, dim=-1)
            return self.matmul(torch.nn.functional.silu(gate) * up, bias)
        fused = bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
        y = int8_linear(gate_up, self.packed, self.inv_smooth, bias if fused else None,
                        gated=True)
        return y if fused or bias is None else y.add_(bias)

    def matmul_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                    eps: float, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """This weight applied to RMSNorm(x + delta) (x += delta in place first, when delta is
        given), the norm folded into the kernel's quantization of the rows; None where the rows
        are not plain fp32 rows [T, in_features] (the caller then norms and multiplies)."""
        rows = (x, weight) if delta is None else (x, weight, delta)
        if not all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in rows) or \
                x.dim() != 2 or weight.shape != (self.in_features,) or \
                (bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous())):
            return None
        return int8_linear(x, self.packed, self.inv_smooth, bias, norm=Norm(weight, eps, delta))

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [N, K], scale fp32 [N]), as quantize_weight made them, for the int8 cache."""
        return unpack(self.packed), self.packed.scale


def pack_native(q: torch.Tensor, scale: torch.Tensor,
                inv_smooth: torch.Tensor | None = None) -> NativeInt8Linear:
    n, k = q.shape
    inv = None if inv_smooth is None else inv_smooth.float().contiguous()
    return NativeInt8Linear(n, k, pack(q, scale), inv)
