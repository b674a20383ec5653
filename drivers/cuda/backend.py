"""Dispatch: which attention and linear functions a device uses.

Triton kernels on CUDA, and on CPU tensors when TRITON_INTERPRET=1 (tests); None otherwise,
which tells the caller to keep its PyTorch path. Triton is imported only when asked for, and
nothing here touches a GPU driver at import time.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

log = structlog.get_logger()


@dataclass(frozen=True)
class Kernels:
    name: str
    write_kv: Callable[..., None]
    decode_attention: Callable[..., torch.Tensor]
    prefill_attention: Callable[..., torch.Tensor]
    linear: Callable[..., torch.Tensor]  # quant_linear(x, QuantWeight) -> y


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _load() -> Kernels:
    from llmasos.drivers.cuda.decode_attention import decode_attention
    from llmasos.drivers.cuda.kv_write import write_kv
    from llmasos.drivers.cuda.prefill_attention import prefill_attention
    from llmasos.drivers.cuda.quant_matmul import quant_linear

    return Kernels("triton", write_kv, decode_attention, prefill_attention, quant_linear)


def _kernels_interpreted() -> bool:
    # @triton.jit reads TRITON_INTERPRET when the kernel module is imported, not at launch
    from triton.runtime.interpreter import InterpretedFunction

    from llmasos.drivers.cuda.decode_attention import _decode_stage1

    return isinstance(_decode_stage1, InterpretedFunction)


def kernels_for(device: torch.device | str) -> Kernels | None:
    """The Triton kernels to use on `device`, or None to use the PyTorch path."""
    device = torch.device(device)
    if not _triton_installed():
        return None
    if device.type == "cuda" and not interpreting():
        return _load()
    if device.type == "cpu" and interpreting():
        kernels = _load()
        if not _kernels_interpreted():
            log.warning("triton_kernels_compiled_before_interpret_was_set", device=str(device))
            return None
        return kernels
    return None
