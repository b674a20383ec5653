"""Read a Hugging Face model folder: config.json and *.safetensors (weights in fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from llmasos.drivers.loaders.config import ModelConfig, from_hf_config


def read_config(folder: str) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return from_hf_config(json.loads(path.read_text()))


def load_hf(folder: str, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Return the config and fp32 weights of every *.safetensors shard in the folder."""
    cfg = read_config(folder)
    shards = sorted(Path(folder).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    weights: dict[str, torch.Tensor] = {}
    for shard in tqdm(shards, desc="load", unit="shard", disable=not progress):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                weights[name] = f.get_tensor(name).to(torch.float32)
    return cfg, weights
