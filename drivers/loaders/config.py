"""ModelConfig: the hyperparameters the model code needs, from GGUF metadata or HF config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


class UnsupportedArchitecture(ValueError):
    """The file describes a model family this runner does not implement."""


@dataclass(frozen=True)
class ArchSpec:
    attention_bias: bool  # Qwen2 adds a bias to the Q, K and V projections
    permuted_qk: bool  # llama.cpp's converter permuted Q/K rows for its interleaved RoPE


# The supported families; every other architecture is refused by name.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(attention_bias=False, permuted_qk=True),
    "mistral": ArchSpec(attention_bias=False, permuted_qk=True),
    "smollm": ArchSpec(attention_bias=False, permuted_qk=True),
    "qwen2": ArchSpec(attention_bias=True, permuted_qk=False),
}


def arch_spec(architecture: str) -> ArchSpec:
    spec = ARCHITECTURES.get(architecture.lower())
    if spec is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {architecture!r}; supported: {sorted(ARCHITECTURES)}")
    return spec


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", "factor": ...}
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls(**json.loads(text))


def _first_int(value: Any) -> int | None:
    """HF configs hold eos_token_id as an int or a list."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def from_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Build from a Hugging Face config.json dict."""
    arch = str(cfg.get("model_type", ""))
    spec = arch_spec(arch)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    # transformers v5 writes rope_parameters (theta inside); v4 wrote rope_theta + rope_scaling
    rope = dict(cfg.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or rope or None
    if scaling is not None:
        scaling = dict(scaling)
        scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", spec.attention_bias)),
        bos_token_id=_first_int(cfg.get("bos_token_id")),
        eos_token_id=_first_int(cfg.get("eos_token_id")),
    )


def from_gguf_metadata(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """Build from GGUF key/value metadata (already decoded to Python values)."""
    arch = str(meta.get("general.architecture", ""))
    spec = arch_spec(arch)

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling = None
    scaling_type = key("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        scaling = {"rope_type": str(scaling_type), "factor": float(key("rope.scaling.factor", 1.0))}
        orig = key("rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = int(orig)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length") or hidden // heads),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=spec.attention_bias,
        bos_token_id=_first_int(meta.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_first_int(meta.get("tokenizer.ggml.eos_token_id")),
    )
