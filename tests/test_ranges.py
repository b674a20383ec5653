"""The step's named profiler ranges (drivers/model/ranges.py): recorded under a profiler, free
without one."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from llmasos.drivers.model import ranges


def test_a_range_is_recorded_under_the_profiler() -> None:
    with profile(activities=[ProfilerActivity.CPU]) as p:
        assert ranges.profiler_on()
        with ranges.named_range("step_part"):
            torch.ones(4).sum()
    names = [e.name for e in p.events()]
    assert "step_part" in names


def test_without_a_profiler_a_range_is_the_shared_null_context() -> None:
    assert not ranges.profiler_on()
    first, second = ranges.named_range("a"), ranges.named_range("b")
    assert first is second is ranges._OFF
    with first:
        pass
