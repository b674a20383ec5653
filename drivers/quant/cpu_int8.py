"""int8 linear on the CPU through PyTorch's quantized dynamic linear (fbgemm / x86 / onednn).

Weights: symmetric int8 per output channel, packed once by the engine's prepack.
Activations: quantized per ROW, batch-invariantly. The dynamic op picks one (scale, zero point)
from the min and max of its whole input, so a row's result would depend on its batch-mates.
Instead every row is scaled to an absolute maximum of 1, one anchor row [-1, 1, 0, ...] pins the
tensor's range to [-1, 1] whatever the batch, and each output row is scaled back by its own
maximum. The int8 products accumulate exactly in int32, so a row's result is bit-identical alone
or in any batch (checked by the probe below and by tests/test_quant.py).

PyTorch marks its quantized-tensor constructors deprecated: this file is the only user.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import structlog
import torch

log = structlog.get_logger()

ENGINES = ("x86", "fbgemm", "onednn")  # probed in this order; the fastest invariant one wins
REDUCE_RANGE = False  # 7-bit activations only help CPUs without VNNI (int16 saturation)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 [N, K], scale fp32 [N]); w ~ q * scale."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def prepack(q: torch.Tensor, scale: torch.Tensor) -> torch.ScriptObject:
    zero = torch.zeros(q.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():  # the deprecation notice: this is the one place we use it
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
    return torch.ops.quantized.linear_prepack(qw, None)


def anchor_row(k: int) -> torch.Tensor:
    row = torch.zeros(1, k)
    row[0, 0], row[0, min(1, k - 1)] = -1.0, 1.0
    return row


@dataclass(eq=False)
class Int8Linear:
    """A packed int8 weight [out_features, in_features]; serves interface.Packed."""

    out_features: int
    in_features: int
    packed: torch.ScriptObject
    anchor: torch.Tensor            # [1, K]
    inv_smooth: torch.Tensor | None  # [K]: x / smooth, folded into W at quantization

    @property
    def nbytes(self) -> int:
        # int8 weights + per-channel scale, zero point and column offsets (fbgemm keeps all 3)
        n, k = self.out_features, self.in_features
        extra = 0 if self.inv_smooth is None else self.inv_smooth.nbytes
        return n * k + n * (8 + 8 + 4) + extra + self.anchor.nbytes

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        n = x.shape[0]
        amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_(min=1e-30)
        rows = torch.empty(n + 1, self.in_features)
        torch.div(x, amax, out=rows[:n])
        rows[n:] = self.anchor
        y = torch.ops.quantized.linear_dynamic(rows, self.packed, REDUCE_RANGE)[:n].mul_(amax)
        if bias is not None:
            y += bias
        return y.reshape(*lead, self.out_features)


def pack_int8(w: torch.Tensor, smooth: torch.Tensor | None = None) -> Int8Linear:
    """Quantize an fp32 weight [N, K]; with smooth [K], computes (x / smooth) @ (W * smooth).T."""
    n, k = w.shape
    w = w.float() if smooth is None else w.float() * smooth[None, :]
    q, scale = quantize_weight(w)
    inv = None if smooth is None else (1.0 / smooth).float().contiguous()
    return Int8Linear(n, k, prepack(q, scale), anchor_row(k), inv)


def _best_time(fn: object, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _engine_time(engine: str, w: torch.Tensor, xs: list[torch.Tensor]) -> float | None:
    """Seconds for the rows in xs on `engine`, or None if it fails or is not batch-invariant."""
    try:
        torch.backends.quantized.engine = engine
        lin = pack_int8(w)
        alone = lin.matmul(xs[-1][:1])
        if not torch.equal(alone, lin.matmul(xs[-1])[:1]):
            log.info("quant_engine_not_invariant", engine=engine)
            return None
        return sum(_best_time(lambda x=x: lin.matmul(x)) for x in xs)
    except (RuntimeError, AttributeError) as err:
        log.info("quant_engine_unusable", engine=engine, error=str(err)[:120])
        return None


_chosen: str | None = None


def choose_engine(shape: tuple[int, int] = (1536, 576), rows: tuple[int, ...] = (1, 8)) -> str:
    """Probe once per process: the fastest batch-invariant quantized engine; sets it."""
    global _chosen
    if _chosen is not None:
        torch.backends.quantized.engine = _chosen
        return _chosen
    supported = [e for e in ENGINES if e in torch.backends.quantized.supported_engines]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * 0.05
    xs = [torch.randn(r, shape[1], generator=g) for r in rows]
    times = {e: t for e in supported if (t := _engine_time(e, w, xs)) is not None}
    if not times:
        raise RuntimeError(f"no usable quantized engine among {supported}: int8 needs fbgemm "
                           "or onednn in this PyTorch build; deploy with --quant none")
    _chosen = min(times, key=times.get)
    torch.backends.quantized.engine = _chosen
    log.info("quant_engine", engine=_chosen, ms={e: round(t * 1e3, 3) for e, t in times.items()})
    return _chosen


class CpuInt8:
    """The CPU driver (interface.QuantDriver)."""

    name = "cpu-int8"
    formats = ("int8",)

    def __init__(self) -> None:
        self.engine = choose_engine()

    def quantize(self, w: torch.Tensor, fmt: str, smooth: torch.Tensor | None = None
                 ) -> Int8Linear:
        if fmt != "int8":
            raise ValueError(f"quant format {fmt!r} is not served on the CPU; use one of "
                             f"{list(self.formats)}")
        return pack_int8(w, smooth)
