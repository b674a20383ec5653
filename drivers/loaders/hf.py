"""Read a Hugging Face model folder: config.json and *.safetensors (weights in fp32)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llmasos.drivers.loaders.config import ModelConfig, from_hf_config
from llmasos.drivers.loaders.progress import Report, tracked


def read_config(folder: str) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return from_hf_config(json.loads(path.read_text()))


def load_hf(folder: str, progress: bool = True,
            report: Report | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Return the config and fp32 weights of every *.safetensors shard in the folder;
    `report` hears each tensor read."""
    cfg = read_config(folder)
    shards = sorted(Path(folder).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    return cfg, read_safetensors([str(s) for s in shards], progress, report)


def read_safetensors(files: list[str], progress: bool = False,
                     report: Report | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the files, in fp32, one "read" report per tensor (headers first: the
    total is known before any data is read)."""
    names: list[tuple[str, str]] = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            names += [(file, n) for n in f.keys()]  # noqa: SIM118 - safe_open has no __iter__
    weights: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        opened: dict[str, Any] = {}
        for file, name in tracked(names, "read", "tensors", progress, report):
            if file not in opened:
                opened[file] = stack.enter_context(safe_open(file, framework="pt"))
            weights[name] = opened[file].get_tensor(name).to(torch.float32)
    return weights
