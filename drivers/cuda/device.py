"""Device facts the launch configs need, read lazily (never at import)."""

from __future__ import annotations

import functools

import torch

CPU_SMS = 4  # the interpreter runs on the CPU: a small grid keeps it quick


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
