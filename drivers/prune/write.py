"""Write a pruned model as a Hugging Face folder that Deploy loads: config.json (the source's,
or one built from a GGUF's metadata, with the pruned shapes), model.safetensors (fp32), and the
tokenizer (the source folder's files, or tokenizer.json + tokenizer_config.json built from the
GGUF). Written beside the target and renamed into place, so a failure leaves no half folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.prune.shape import Pruned
from llmasos.drivers.prune.unstructured import is_two_four, linears
from llmasos.drivers.tokenizer import Tokenizer

SPARSITY_KEY = "llmasos_sparsity"   # "2:4": every linear weight holds the pattern
RECORD_KEY = "llmasos_pruned"       # how the folder was made
# files of a source folder that the pruned folder replaces rather than copies
NOT_COPIED = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def check_out(out: str) -> None:
    """The target must not exist yet (or be an empty folder): nothing is overwritten."""
    if os.path.isdir(out) and not os.listdir(out):
        return
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; give a new folder for --out")


def gguf_config(cfg: ModelConfig) -> dict[str, Any]:
    """An HF config.json of a GGUF's Llama-family model (drivers/loaders/config.py reads it)."""
    model_type = "llama" if cfg.architecture == "smollm" else cfg.architecture
    out: dict[str, Any] = {
        "architectures": [HF_CLASSES.get(model_type, "LlamaForCausalLM")],
        "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = cfg.rope_scaling
    return out


def source_config(source: str, cfg: ModelConfig) -> dict[str, Any]:
    if os.path.isdir(source):
        return json.loads((Path(source) / "config.json").read_text())
    return gguf_config(cfg)


def pruned_config(base: dict[str, Any], pruned: Pruned, record: dict[str, Any]
                  ) -> dict[str, Any]:
    out = {**base, **pruned.config, "torch_dtype": "float32"}
    dropped = set(pruned.notes.get("dropped_layers", ()))
    if dropped and isinstance(base.get("layer_types"), list):
        out["layer_types"] = [t for i, t in enumerate(base["layer_types"]) if i not in dropped]
    out.pop(SPARSITY_KEY, None)   # set again below only if the pattern still holds
    layers = linears(pruned.weights)
    if layers and all(is_two_four(pruned.weights[n]) for n, _, _ in layers):
        out[SPARSITY_KEY] = "2:4"
    # a chain of compress runs, each with what it removed
    out[RECORD_KEY] = [*base.get(RECORD_KEY, []), {**record, **pruned.notes}]
    return out


def write_tokenizer(source: str, tokenizer: Tokenizer, folder: Path) -> None:
    if os.path.isdir(source):
        for f in Path(source).iterdir():
            if f.is_file() and f.name not in NOT_COPIED and f.suffix not in WEIGHT_SUFFIXES:
                shutil.copy2(f, folder / f.name)
        return
    tokenizer.backend.save(str(folder / "tokenizer.json"))   # its post-processor adds BOS or not
    config: dict[str, Any] = dict(tokenizer.special_tokens)
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template.source
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing storage (safetensors refuses shared tensors)."""
    seen: set[int] = set()
    out = {}
    for name, t in weights.items():
        t = t.to(torch.float32).contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def write_folder(out: str, source: str, cfg: ModelConfig, tokenizer: Tokenizer, pruned: Pruned,
                 record: dict[str, Any]) -> dict[str, Any]:
    """Write the folder; returns its config.json."""
    check_out(out)
    target = Path(out)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config = pruned_config(source_config(source, cfg), pruned, record)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        save_file(unshared(pruned.weights), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        write_tokenizer(source, tokenizer, tmp)
        if target.is_dir():
            target.rmdir()   # empty (check_out)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config
