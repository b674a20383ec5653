"""Check a model file before any weight is read: config and tokenizer from the metadata alone.

A GGUF's key/value section and a HF folder's JSON files are read (a tenth of a second), the
architecture, its RoPE scaling and the tokenizer are built; anything we cannot run raises
ValueError here, so an unsupported file fails at once and nothing (no weights cache) is written.
"""

from __future__ import annotations

import os

from llmasos.drivers.loaders.config import ModelConfig, from_gguf_metadata
from llmasos.drivers.loaders.gguf import check_gguf_arch
from llmasos.drivers.loaders.hf import read_config
from llmasos.drivers.model.llama import rope_inv_freq
from llmasos.drivers.tokenizer import Tokenizer, read_gguf_metadata


def probe(path: str) -> tuple[ModelConfig, Tokenizer]:
    """(config, tokenizer) of a GGUF file or HF folder; raises FileNotFoundError or ValueError
    (UnsupportedArchitecture, UnsupportedTokenizer, bad RoPE scaling) naming what is wrong."""
    if os.path.isdir(path):
        cfg = read_config(path)
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"no tokenizer.json in {path}: save the tokenizer with the "
                                    "model (tokenizer.save_pretrained)")
        tokenizer = Tokenizer.from_hf_dir(path)
    elif os.path.isfile(path):
        meta = read_gguf_metadata(path)
        check_gguf_arch(str(meta.get("general.architecture", "")))
        cfg = from_gguf_metadata(meta, set())  # tensor names only decide the tied head
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    else:
        raise FileNotFoundError(f"no such model file or folder: {path}")
    rope_inv_freq(cfg)  # raises on a RoPE scaling we do not implement
    return cfg, tokenizer
