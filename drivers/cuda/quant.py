"""Weight-only quantized formats: pack/quantize helpers and PyTorch references.

Layouts (W is [N out, K in], y = x @ W.T):
  int8  qweight int8 [N, K]; scale fp32 [N];            w = q * scale[n]            (symmetric)
  int4  qweight uint8 [N, K/2] (k even: low nibble, k odd: high nibble);
        scale fp16 [N, K/G]; offset fp16 [N, K/G];   w = q * scale + offset      (asymmetric)
  q8_0  GGUF bytes uint8 [N, K/32*34]: per 32 values {fp16 d, int8 qs[32]};   w = d * q
  q4_1  GGUF bytes uint8 [N, K/32*20]: per 32 values {fp16 d, fp16 m, u8 qs[16]};
        value j < 16 is qs[j] & 0xF, value j >= 16 is qs[j-16] >> 4;        w = d * q + m
No Triton here: the CPU path and tests use these without importing triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("int8", "int4", "q8_0", "q4_1")
GGUF_BLOCK = 32
GGUF_BLOCK_BYTES = {"q8_0": 34, "q4_1": 20}
INT4_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class QuantWeight:
    fmt: str
    out_features: int
    in_features: int
    qweight: torch.Tensor
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    group_size: int = 0

    def to(self, device: torch.device | str) -> QuantWeight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantWeight(self.fmt, self.out_features, self.in_features, move(self.qweight),
                           move(self.scale), move(self.offset), self.group_size)


def quantize_int8(w: torch.Tensor) -> QuantWeight:
    n, k = w.shape
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return QuantWeight("int8", n, k, q.contiguous(), scale.contiguous())


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> QuantWeight:
    n, k = w.shape
    assert group_size in INT4_GROUPS and k % group_size == 0, (k, group_size)
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).half()
    offset = lo.half()
    q = torch.round((g - offset.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    q = q.to(torch.uint8).reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return QuantWeight("int4", n, k, packed.contiguous(), scale.contiguous(),
                       offset.contiguous(), group_size)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    # C roundf (half away from zero), written as ggml's numpy reference writes it
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.half().contiguous().view(torch.uint8).reshape(*x.shape[:-1], 2 * x.shape[-1])


def quantize_q8_0(w: torch.Tensor) -> QuantWeight:
    n, k = w.shape
    assert k % GGUF_BLOCK == 0, k
    b = w.float().reshape(n * k // GGUF_BLOCK, GGUF_BLOCK)
    d = b.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    qs = _roundf(b * inv).to(torch.int8).view(torch.uint8)
    raw = torch.cat([_f16_bytes(d), qs], dim=1)
    return QuantWeight("q8_0", n, k, raw.reshape(n, -1).contiguous())


def quantize_q4_1(w: torch.Tensor) -> QuantWeight:
    n, k = w.shape
    assert k % GGUF_BLOCK == 0, k
    b = w.float().reshape(n * k // GGUF_BLOCK, GGUF_BLOCK)
    lo, hi = b.amin(dim=1, keepdim=True), b.amax(dim=1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc((b - lo) * inv + 0.5).to(torch.uint8).clamp(0, 15)
    qs = q[:, :16] | (q[:, 16:] << 4)
    raw = torch.cat([_f16_bytes(d), _f16_bytes(lo), qs], dim=1)
    return QuantWeight("q4_1", n, k, raw.reshape(n, -1).contiguous())


def from_gguf(raw: torch.Tensor, fmt: str, out_features: int, in_features: int) -> QuantWeight:
    """Wrap a GGUF tensor's bytes (rows of blocks, as the file stores them) without copying."""
    row_bytes = in_features // GGUF_BLOCK * GGUF_BLOCK_BYTES[fmt]
    return QuantWeight(fmt, out_features, in_features, raw.view(torch.uint8).reshape(out_features,
                                                                                     row_bytes))


def quantize(w: torch.Tensor, fmt: str, group_size: int = 128) -> QuantWeight:
    if fmt == "int4":
        return quantize_int4(w, group_size)
    return {"int8": quantize_int8, "q8_0": quantize_q8_0, "q4_1": quantize_q4_1}[fmt](w)


def _gguf_blocks(qw: QuantWeight) -> torch.Tensor:
    return qw.qweight.reshape(-1, GGUF_BLOCK_BYTES[qw.fmt])


def _f16_from(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """The weight as fp32 [N, K]: the reference every kernel is checked against."""
    n, k = qw.out_features, qw.in_features
    if qw.fmt == "int8":
        return qw.qweight.float() * qw.scale.float()[:, None]
    if qw.fmt == "int4":
        p = qw.qweight
        q = torch.stack([p & 0xF, p >> 4], dim=2).reshape(n, k).float()
        rep = lambda t: t.float().repeat_interleave(qw.group_size, dim=1)  # noqa: E731
        return q * rep(qw.scale) + rep(qw.offset)
    blocks = _gguf_blocks(qw)
    d = _f16_from(blocks[:, 0:2])
    if qw.fmt == "q8_0":
        return (blocks[:, 2:].view(torch.int8).float() * d).reshape(n, k)
    m = _f16_from(blocks[:, 2:4])
    qs = blocks[:, 4:]
    q = torch.cat([qs & 0xF, qs >> 4], dim=1).float()
    return (q * d + m).reshape(n, k)


def linear_ref(x: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
    """y = x @ dequantize(W).T in fp32, returned in x's dtype."""
    return (x.float() @ dequantize(qw).to(x.device).T).to(x.dtype)
