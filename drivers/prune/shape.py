"""A pruned checkpoint: HF-named weights plus the config keys that changed, and what to say."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class Pruned:
    weights: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)  # HF config.json keys that changed
    notes: dict[str, Any] = field(default_factory=dict)   # what was removed, for the record


def layer_of(name: str) -> tuple[int, str] | None:
    """(layer index, the rest of the name) of a per-layer tensor, else None."""
    m = LAYER.match(name)
    return None if m is None else (int(m.group(1)), m.group(2))
