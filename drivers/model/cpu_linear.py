"""Dense matmuls x @ w.T on the CPU: four ways to compute one, and a probe at load that picks
the fastest for each row regime of a step. MKL and oneDNN rank differently by CPU family (MKL
stays on AVX2 on AMD; with MKL_ENABLE_INSTRUCTIONS / ONEDNN_MAX_CPU_ISA both are capped) and by
shape, so the choice is measured on the machine that runs the model, not assumed.

The probe times what a step does: one pass through the model's weights in the forward's order,
each read from memory once, as a decode step reads them. Timing one weight over and over (it
stays in the caches) ranked them otherwise: measured on 2 AVX-512 cores, such a probe picked
oneDNN for one row (42.8 ms a decode step) where MKL takes 33.1 ms."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmasos.drivers.cpu import packed_linear

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
SMALL_ROWS = 64  # the most rows of the "few" regime (decode batches)


def mkl_transposed(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """(w @ x.T).T through MKL: for few rows MKL's kernels for this orientation can be much
    faster (the LM head with 4 rows: ~2.7 ms vs ~13 ms on one CPU), and a single row is doubled
    because MKL's GEMV runs on one thread."""
    rows = x.shape[0]
    xs = x.repeat(2, 1) if rows == 1 else x
    out = torch.mm(w, xs.t())[:, :rows].t().contiguous()
    return out if bias is None else out + bias


def onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x @ w.T through oneDNN, which uses AVX-512 on AMD CPUs where MKL stays on AVX2."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


KERNELS: dict[str, Linear] = {
    "mkl": F.linear,
    "mkl_transposed": mkl_transposed,
    "onednn": onednn_linear,
    "packed": packed_linear.dense_packed,   # our own, on a panel-packed copy of w
}  # fmt: skip


@dataclass(frozen=True)
class Regime:
    name: str  # row: 1 row; few: 2 to SMALL_ROWS; many: more (LinearPlan.kernel)
    rows: int  # the rows x has in the timed pass
    candidates: tuple[str, ...]  # what the probe may pick; the first is the default


REGIMES = (
    Regime("row", 1, ("mkl_transposed", "mkl", "onednn", "packed")),     # decode at batch 1
    Regime("few", 16, ("mkl_transposed", "mkl", "onednn", "packed")),    # decode batches
    Regime("many", 128, ("mkl", "onednn", "packed")),                    # prefill chunks
)  # fmt: skip


def onednn_usable(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype == torch.float32
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and torch.backends.mkldnn.is_available())


def usable(name: str, weights: list[torch.Tensor]) -> bool:
    if name == "onednn":
        return all(map(onednn_usable, weights))
    if name == "packed":
        return packed_linear.available() and all(w.dim() == 2 and w.device.type == "cpu"
                                                 for w in weights)
    return True


def pass_time(fn: Linear, xs: dict[int, torch.Tensor], weights: list[torch.Tensor]) -> float:
    """One pass through weights, in order: x (of the weight's width) @ w.T for each."""
    t0 = time.perf_counter()
    for w in weights:
        fn(xs[w.shape[1]], w, None)
    return time.perf_counter() - t0


def fastest(regime: Regime, weights: list[torch.Tensor], reps: int = 3) -> str:
    """The candidate with the least best-of-reps time for a pass through weights (the rounds
    take the candidates in turn, so a busy moment of the machine hits them alike)."""
    names = [n for n in regime.candidates if usable(n, weights)]
    if "packed" in names:   # packed before the clock runs: the copy is made once, at load
        for w in weights:
            packed_linear.packed_of(w)
    xs = {k: torch.randn(regime.rows, k, dtype=weights[0].dtype, device=weights[0].device)
          for k in {w.shape[1] for w in weights}}
    best = dict.fromkeys(names, float("inf"))
    try:
        for name in names:   # warm-up: oneDNN builds its primitives, MKL its buffers
            pass_time(KERNELS[name], xs, list({tuple(w.shape): w for w in weights}.values()))
        for _ in range(reps):
            for name in names:
                best[name] = min(best[name], pass_time(KERNELS[name], xs, weights))
    except RuntimeError:   # a build without oneDNN's CPU kernel for the op
        return regime.candidates[0]
    return min(best, key=best.get)


@dataclass(frozen=True)
class LinearPlan:
    """The kernel of each regime, by name (KERNELS)."""

    row: str = "mkl_transposed"
    few: str = "mkl_transposed"
    many: str = "mkl"

    def kernel(self, rows: int) -> Linear:
        name = self.row if rows == 1 else self.few if rows <= SMALL_ROWS else self.many
        return KERNELS[name]


# (regime name, the weights it is timed on, the timing) -> the kernel's name: a hook that may
# answer from an earlier load instead of timing (drivers/model/probe_cache.py)
Remember = Callable[[str, list[torch.Tensor], Callable[[], str]], str]


def timed_now(name: str, weights: list[torch.Tensor], measure: Callable[[], str]) -> str:
    return measure()


def probe(small: list[torch.Tensor], large: list[torch.Tensor],
          device: torch.device, remember: Remember = timed_now) -> LinearPlan:
    """Time each regime once: a pass through `small` (every dense weight of a decode step, in
    the forward's order, the LM head last) for the one- and few-row regimes, through `large`
    (a few layers' weights: a prefill chunk computes more than it reads) for many rows."""
    if device.type != "cpu":
        return LinearPlan("mkl", "mkl", "mkl")   # F.linear: cuBLAS picks for itself
    if not small or any(w.dtype != torch.float32 for w in small + large):
        return LinearPlan()
    row, few, many = REGIMES
    plan = LinearPlan(decide(row, small, remember), decide(few, small, remember),
                      decide(many, large, remember) if large else "mkl")
    # the packed copies exactly where they serve: made at load, not at the first step (its
    # latency, the memory seen early), even where the answer was remembered; else freed
    settle = packed_linear.packed_of if "packed" in (plan.row, plan.few, plan.many) \
        else packed_linear.drop_packed
    for w in small + large:
        settle(w)
    return plan


def decide(regime: Regime, weights: list[torch.Tensor], remember: Remember) -> str:
    """The regime's kernel, timed or remembered (under a key that names the candidates, so a
    new one is timed afresh); a remembered one this process cannot use gives the default."""
    key = f"{regime.name}[{','.join(regime.candidates)}]"
    name = remember(key, weights, lambda: fastest(regime, weights))
    return name if name in KERNELS and usable(name, weights) else regime.candidates[0]
