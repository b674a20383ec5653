"""int8 linear on the CPU: this project's kernel (cpu_native.py, engine "native") or PyTorch's
quantized linear (fbgemm / x86 / onednn), whichever this CPU's probe picks (choose_engine).
The rest of this docstring is about PyTorch's engines.

Weights: symmetric int8 per output channel, packed once by the engine's prepack.
Activations: quantized per ROW, batch-invariantly. The ops take one (scale, zero point) for
their whole input, so every row is scaled to an absolute maximum of 1 and quantized to uint8
over [-1, 1] (scale 2/255, zero point 128), and each output row is scaled back by its own
maximum. fbgemm and x86 take that fixed (scale, zero point) directly (the static-input op); the
dynamic op (onednn) picks its own from the input's min and max, so one anchor row [-1, 1, 0, ...]
pins the range to [-1, 1] whatever the batch. Both give the same bits. The int8 products
accumulate exactly in int32, so a row's result is bit-identical alone or in any batch (checked
by the probe below and by tests/test_quant.py).

What a packed weight keeps resident is measured as it is packed (footprint.py): fbgemm pads K
to its K block, and oneDNN keeps the unpacked int8 weight beside its packed copy.

PyTorch marks its quantized-tensor constructors deprecated: this file is the only user.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from llmasos.drivers.cpu import int8_linear
from llmasos.drivers.cpu.row_scale import row_scale
from llmasos.drivers.model import probe_cache
from llmasos.drivers.quant.cpu_native import NativeInt8Linear, pack_native
from llmasos.drivers.quant.footprint import Footprint, measured

log = structlog.get_logger()

NATIVE = "native"   # drivers/cpu/int8_linear.c, on x86 CPUs with AVX2 or AVX-512 VNNI
# in order of preference; probed for speed. The native kernel comes first: its packed weight is
# a plain tensor of 1 byte a weight, and its rows need no scaling pass around the call.
ENGINES = (NATIVE, "x86", "fbgemm", "onednn")
# A later engine wins the probe only if this much faster: sub-ms timings on shared cores are
# noisy, and onednn's packed weight keeps a second int8 copy (2.07 bytes a weight, measured,
# against fbgemm's 1.15).
PREFER_MARGIN = 1.5
# An engine whose error against fp32 is this much above the best one's is not used: on CPUs
# without VNNI, u8 x s8 pair sums can saturate int16 (measured: oneDNN limited to AVX2 errs
# 2.0% RMS on the probe where fbgemm and VNNI oneDNN err 1.05%, the int8 rounding alone).
ERROR_MARGIN = 1.3
# Activations over [-1, 1] as uint8: (scale, zero point) per width, what the dynamic op picks
# for that range. Without VNNI the u8 x s8 kernels add products in pairs into int16, which
# saturates at 8 bits (measured on an AVX2 EPYC: 2.4% RMS error at 8 bits, 1.7% at 7; with VNNI
# 8 bits err ~1.05%), so activation_bits() keeps the width that errs least on this CPU.
X_RANGE = {8: (2 / 255, 128), 7: (2 / 127, 64)}
STATIC_ENGINES = ("x86", "fbgemm")  # those whose packed weight serves the static-input op


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 [N, K], scale fp32 [N]); w ~ q * scale."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def prepack(q: torch.Tensor, scale: torch.Tensor) -> torch.ScriptObject:
    """The engine's packed weight; the quantized tensor made here lives on only if the engine
    keeps it (oneDNN does), so footprint.measured around this call sees all it holds."""
    zero = torch.zeros(q.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():  # the deprecation notice: this is the one place we use it
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
    return torch.ops.quantized.linear_prepack(qw, None)


def static_op() -> Callable | None:
    """fbgemm's linear taking fp32 input with a given (scale, zero point): no anchor row, no
    min/max pass; None where this PyTorch lacks it or the engine's packed weight cannot serve it."""
    if torch.backends.quantized.engine not in STATIC_ENGINES:
        return None
    return getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32", None)


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
    footprint: Footprint            # resident bytes of `packed`, measured (footprint.py)
    static: Callable | None         # static_op(), or None: the dynamic op with an anchor row
    anchor: torch.Tensor | None     # [1, K], for the dynamic op
    inv_smooth: torch.Tensor | None  # [K]: x / smooth, folded into W at quantization
    bits: int = 8                   # activation width (X_RANGE), as activation_bits() found

    @property
    def nbytes(self) -> int:
        extra = [t.nbytes for t in (self.anchor, self.inv_smooth) if t is not None]
        return self.footprint.bytes + sum(extra)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2:   # the model's rows are 2-D already: no reshape on its path
            y = self.matmul(x.reshape(-1, self.in_features), bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        rows, amax = row_scale(x, self.inv_smooth)   # x / smooth / max|row|, and max|row|
        if self.static is not None:
            y = self.static(rows, *X_RANGE[self.bits], self.packed)
        else:
            y = torch.ops.quantized.linear_dynamic(torch.cat((rows, self.anchor)), self.packed,
                                                   self.bits == 7)[:-1]
        y.mul_(amax)
        return y if bias is None else y.add_(bias)


Linear = Int8Linear | NativeInt8Linear


def current_engine() -> str:
    """The engine packing uses: the probe's pick once choose_engine ran, else PyTorch's."""
    return _chosen or torch.backends.quantized.engine


def use_engine(engine: str) -> None:
    if engine != NATIVE:
        torch.backends.quantized.engine = engine


def pack_int8(w: torch.Tensor, smooth: torch.Tensor | None = None,
              engine: str | None = None) -> Linear:
    """Quantize an fp32 weight [N, K]; with smooth [K], computes (x / smooth) @ (W * smooth).T."""
    w = w.float() if smooth is None else w.float() * smooth[None, :]
    q, scale = quantize_weight(w)
    inv = None if smooth is None else (1.0 / smooth).float().contiguous()
    return pack_quantized(q, scale, inv, engine=engine)


def pack_quantized(q: torch.Tensor, scale: torch.Tensor, inv_smooth: torch.Tensor | None = None,
                   bits: int = 0, engine: str | None = None) -> Linear:
    """Pack int8 weights q [N, K] with per-channel scale [N] (as quantize_weight made them) for
    `engine` (current_engine() when None)."""
    engine = engine or current_engine()
    if engine == NATIVE:
        return pack_native(q, scale, inv_smooth)
    use_engine(engine)
    n, k = q.shape
    packed, footprint = measured((engine, n, k), q.nbytes, lambda: prepack(q, scale))
    static = static_op()
    return Int8Linear(n, k, packed, footprint, static, None if static else anchor_row(k),
                      inv_smooth, bits or activation_bits())


_bits: dict[str, int] = {}


def activation_bits(shape: tuple[int, int] = (1536, 576)) -> int:
    """The activation width (8 or 7) that errs least for the current engine on this CPU,
    measured once per engine and process on a random layer of the model's shape."""
    engine = torch.backends.quantized.engine
    if engine not in _bits:
        g = torch.Generator().manual_seed(1)
        w = torch.randn(*shape, generator=g) * 0.05
        x = torch.randn(16, shape[1], generator=g)
        ref = x @ w.T
        lin = pack_quantized(*quantize_weight(w), bits=8)
        errors = {}
        for bits in X_RANGE:
            lin.bits = bits
            errors[bits] = ((lin.matmul(x) - ref).pow(2).mean() / ref.pow(2).mean()).item()
        _bits[engine] = min(errors, key=errors.__getitem__)
    return _bits[engine]


def unpack(lin: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale fp32 [N]) back from the packed weight, for the int8 cache."""
    if isinstance(lin, NativeInt8Linear):
        return lin.unpack()
    qw, _ = torch.ops.quantized.linear_unpack(lin.packed)
    return qw.int_repr().contiguous(), qw.q_per_channel_scales().float()


ROUNDS = 30  # timing rounds, each engine once a round: a burst of load slows them all alike


@dataclass(frozen=True)
class Candidate:
    lin: Linear      # the probe's weight packed by this engine
    error: float     # relative RMS error against fp32 on the probe's rows


def _candidate(engine: str, w: torch.Tensor, xs: list[torch.Tensor]) -> Candidate | None:
    """`engine` on the probe's weight and rows, or None if it fails or is not batch-invariant."""
    try:
        lin = pack_int8(w, engine=engine)
        alone = lin.matmul(xs[-1][:1])
        y = lin.matmul(xs[-1])
        if not torch.equal(alone, y[:1]):
            log.info("quant_engine_not_invariant", engine=engine)
            return None
        ref = xs[-1] @ w.T
        return Candidate(lin, ((y - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item())
    except (RuntimeError, AttributeError) as err:
        log.info("quant_engine_unusable", engine=engine, error=str(err)[:120])
        return None


def _race(candidates: dict[str, Candidate], xs: list[torch.Tensor]) -> dict[str, float]:
    """Best seconds per engine for all of `xs`, the engines interleaved round by round (timed
    one after another, a busy spell could land on one engine's whole series and flip the pick)."""
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(ROUNDS):
        for engine, c in candidates.items():
            use_engine(engine)
            t0 = time.perf_counter()
            for x in xs:
                c.lin.matmul(x)
            best[engine] = min(best[engine], time.perf_counter() - t0)
    return best


_chosen: str | None = None


def choose_engine(shape: tuple[int, int] = (1536, 576), rows: tuple[int, ...] = (1, 8)) -> str:
    """The engine this CPU's probe picked (measure_engine), remembered on disk: engines round
    apart in the last bit, so a restart timed on a busy machine must not switch them."""
    global _chosen
    if _chosen is None:
        supported = supported_engines()
        w = torch.empty(shape)
        key = probe_cache.probe_key(f"quant_engine/{','.join(supported)}/{rows}", w)
        remembered = probe_cache.remembered(key, lambda: measure_engine(shape, rows, supported))
        _chosen = (remembered if remembered in supported    # a damaged file: measured anew
                   else measure_engine(shape, rows, supported))
    use_engine(_chosen)
    return _chosen


def supported_engines() -> list[str]:
    """ENGINES this process can run: the native kernel where it built for AVX2 or AVX-512 VNNI
    (its scalar C is slower than PyTorch's engines), and PyTorch's quantized engines."""
    torch_engines = torch.backends.quantized.supported_engines
    return [e for e in ENGINES
            if (e == NATIVE and int8_linear.isa() > 0) or e in torch_engines]


def measure_engine(shape: tuple[int, int], rows: tuple[int, ...], supported: list[str]) -> str:
    """Among the batch-invariant quantized engines of `supported` within ERROR_MARGIN of the
    most accurate, the first in ENGINES within PREFER_MARGIN of the fastest."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * 0.05
    xs = [torch.randn(r, shape[1], generator=g) for r in rows]
    candidates = {e: c for e in supported if (c := _candidate(e, w, xs)) is not None}
    if not candidates:
        raise RuntimeError(f"no usable quantized engine among {supported}: int8 needs fbgemm "
                           "or onednn in this PyTorch build; deploy with --quant none")
    best_error = min(c.error for c in candidates.values())
    exact = {e: c for e, c in candidates.items() if c.error <= best_error * ERROR_MARGIN}
    seconds = _race(exact, xs)
    fastest = min(seconds.values())
    chosen = next(e for e in exact if seconds[e] <= fastest * PREFER_MARGIN)
    use_engine(chosen)   # activation_bits() measures PyTorch's current one
    log.info("quant_engine", engine=chosen,
             activation_bits=None if chosen == NATIVE else activation_bits(),
             ms={e: round(t * 1e3, 3) for e, t in seconds.items()},
             error={e: round(c.error, 4) for e, c in candidates.items()})
    return chosen


class CpuInt8:
    """The CPU driver (interface.QuantDriver)."""

    name = "cpu-int8"
    formats = ("int8",)

    def __init__(self) -> None:
        self.engine = choose_engine()

    def quantize(self, w: torch.Tensor, fmt: str, smooth: torch.Tensor | None = None
                 ) -> Linear:
        if fmt != "int8":
            raise ValueError(f"quant format {fmt!r} is not served on the CPU; use one of "
                             f"{list(self.formats)}")
        return pack_int8(w, smooth, self.engine)
