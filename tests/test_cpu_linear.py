"""The CPU matmul kernels (drivers/model/cpu_linear.py): each computes x @ w.T (+ bias) for the
row counts of every regime, and the load-time probe picks, per regime, one of its candidates."""

from __future__ import annotations

import pytest
import torch

from llmasos.drivers.model.cpu_linear import (
    KERNELS,
    REGIMES,
    SMALL_ROWS,
    LinearPlan,
    onednn_usable,
    probe,
)

from conftest import within_fp32_sums


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("rows", [1, 3, SMALL_ROWS, SMALL_ROWS + 1, 130])
def test_every_kernel_is_x_times_w_transposed(name: str, rows: int) -> None:
    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(rows))
    if name == "onednn" and not onednn_usable(w):
        pytest.skip("this PyTorch build has no oneDNN linear on the CPU")
    x = torch.randn(rows, 80, generator=torch.Generator().manual_seed(rows + 1))
    bias = torch.randn(96)
    out = KERNELS[name](x, w, bias)
    assert out.shape == (rows, 96) and out.dtype == torch.float32 and out.is_contiguous()
    assert within_fp32_sums(out, x, w, bias)


def test_probe_picks_a_candidate_of_each_regime_and_the_plan_routes_by_rows() -> None:
    w = torch.randn(256, 64)
    plan = probe([w], [w], torch.device("cpu"))
    for regime, name in zip(REGIMES, (plan.row, plan.few, plan.many), strict=True):
        assert name in regime.candidates
    assert plan.kernel(1) is KERNELS[plan.row]
    assert plan.kernel(2) is KERNELS[plan.few] and plan.kernel(SMALL_ROWS) is KERNELS[plan.few]
    assert plan.kernel(SMALL_ROWS + 1) is KERNELS[plan.many]
    # bf16 on the CPU keeps the defaults; other devices leave the choice to F.linear
    assert probe([w.bfloat16()], [], torch.device("cpu")) == LinearPlan()
    assert probe([], [], torch.device("cuda")) == LinearPlan("mkl", "mkl", "mkl")
