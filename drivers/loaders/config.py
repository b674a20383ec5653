"""ModelConfig: the hyperparameters the model code needs, from GGUF metadata or HF config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from llmasos.drivers.model.families import FAMILIES, family_name


class UnsupportedArchitecture(ValueError):
    """The file describes a model family this runner does not implement."""


@dataclass(frozen=True)
class ArchSpec:
    attention_bias: bool  # Q, K and V projections carry a bias (Qwen2, GPT-2, NeoX)
    permuted_qk: bool  # llama.cpp's converter permuted Q/K rows for its interleaved RoPE


# The supported families (drivers/model/families.py has how they differ); others are refused.
ARCHITECTURES: dict[str, ArchSpec] = {
    name: ArchSpec(attention_bias=f.qkv_bias, permuted_qk=name in ("llama", "mistral", "smollm"))
    for name, f in FAMILIES.items()
}


def arch_spec(architecture: str) -> ArchSpec:
    spec = ARCHITECTURES.get(family_name(architecture))
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
    # family extras (defaults are Llama's)
    rotary_dim: int = 0  # dims of each head that RoPE rotates (0: all; NeoX 25%, GPT-J 64)
    sliding_window: int = 0  # tokens a sliding-window layer sees (0: none)
    sliding_layers: tuple[int, ...] = ()  # which layers slide (empty with a window: all)
    attn_softcap: float = 0.0  # Gemma 2: scores = c * tanh(scores / c)
    final_softcap: float = 0.0  # Gemma 2: the same on the logits
    attn_scale: float = 0.0  # 0: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    rope_local_theta: float = 0.0  # Gemma 3: sliding layers' RoPE base (0: rope_theta)
    activation: str = ""  # overrides the family's MLP nonlinearity
    parallel_residual: bool | None = None  # overrides the family's (NeoX's config flag)
    sparsity: str = ""  # "2:4": the layers' linear weights hold that pattern (drivers/prune)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        fields = json.loads(text)
        fields["sliding_layers"] = tuple(fields.get("sliding_layers", ()))
        return cls(**fields)


def _first_int(value: Any) -> int | None:
    """HF configs hold eos_token_id as an int or a list."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


# GPT-2 and GPT-J spell the common hyperparameters their own way
_GPT2_KEYS = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers",
              "n_head": "num_attention_heads", "n_positions": "max_position_embeddings",
              "n_inner": "intermediate_size", "layer_norm_epsilon": "layer_norm_eps",
              "activation_function": "hidden_act"}
# HF activation names -> ours (gelu_new and gelu_pytorch_tanh are both GELU's tanh approximation)
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu_tanh": "gelu_tanh", "relu": "relu"}


def _activation(cfg: dict[str, Any]) -> str:
    name = cfg.get("hidden_activation") or cfg.get("hidden_act") or ""
    if name and name not in ACTIVATIONS:
        raise UnsupportedArchitecture(f"unsupported activation {name!r}")
    return ACTIVATIONS.get(name, "")


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(theta, scaling, partial rotary factor): transformers v5 writes rope_parameters (theta
    inside); v4 wrote rope_theta + rope_scaling."""
    rope = dict(cfg.get("rope_parameters") or {})
    if "full_attention" in rope:  # Gemma 3 in v5: per layer type
        local = rope.get("sliding_attention") or {}
        rope = dict(rope["full_attention"], local_theta=local.get("rope_theta"))
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base",
                                                                       10000.0))))
    partial = float(rope.pop("partial_rotary_factor", cfg.get(
        "partial_rotary_factor", cfg.get("rotary_pct", 1.0))))
    rope.pop("local_theta", None)
    scaling = cfg.get("rope_scaling") or rope or None
    if scaling is not None:
        scaling = dict(scaling)
        scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling, partial


def _sliding(cfg: dict[str, Any], arch: str, layers: int) -> tuple[int, tuple[int, ...]]:
    """(window, sliding layer indices) from layer_types (v5) or the family's pattern (v4)."""
    window = int(cfg.get("sliding_window") or 0)
    if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window"):
        window = 0
    if not window:
        return 0, ()
    types = cfg.get("layer_types")
    if types:
        return window, tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if arch == "gemma2":  # even layers slide
        return window, tuple(range(0, layers, 2))
    if arch == "gemma3":  # every sliding_window_pattern-th layer is global
        pattern = int(cfg.get("sliding_window_pattern", 6))
        return window, tuple(i for i in range(layers) if (i + 1) % pattern)
    return window, tuple(range(layers))


def from_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    """Build from a Hugging Face config.json dict."""
    try:
        return _from_hf_config(cfg)
    except KeyError as e:
        raise ValueError(f"{cfg.get('model_type')} config.json lacks {e.args[0]!r}") from None


def _from_hf_config(cfg: dict[str, Any]) -> ModelConfig:
    arch = family_name(str(cfg.get("model_type", "")))
    spec = arch_spec(arch)
    if arch in ("gpt2", "gptj"):
        cfg = {_GPT2_KEYS.get(k, k): v for k, v in cfg.items()}
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = int(cfg["num_hidden_layers"])
    theta, scaling, partial = _rope(cfg)
    window, sliding = _sliding(cfg, arch, layers)
    rotary = int(cfg.get("rotary_dim") or head_dim * partial) if arch != "gpt2" else 0
    scalar = cfg.get("query_pre_attn_scalar")
    local = ((cfg.get("rope_parameters") or {}).get("sliding_attention") or {}).get(
        "rope_theta", cfg.get("rope_local_base_freq", 0.0))
    eps = cfg.get("rms_norm_eps", cfg.get("layer_norm_eps", 1e-5))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(eps),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch in ("gpt2", "gemma2",
                                                                          "gemma3"))),
        attention_bias=bool(cfg.get("attention_bias", spec.attention_bias)),
        bos_token_id=_first_int(cfg.get("bos_token_id")),
        eos_token_id=_first_int(cfg.get("eos_token_id")),
        rotary_dim=0 if rotary == head_dim else rotary,
        sliding_window=window,
        sliding_layers=sliding,
        attn_softcap=float(cfg.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(cfg.get("final_logit_softcapping") or 0.0),
        attn_scale=float(scalar) ** -0.5 if scalar else 0.0,
        rope_local_theta=float(local or 0.0),
        activation=_activation(cfg),
        parallel_residual=cfg.get("use_parallel_residual"),
        sparsity=str(cfg.get("llmasos_sparsity") or ""),
    )


def from_gguf_metadata(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """Build from GGUF key/value metadata (already decoded to Python values)."""
    try:
        return _from_gguf_metadata(meta, tensor_names)
    except (TypeError, KeyError) as e:  # a required key is missing (int(None))
        arch = meta.get("general.architecture")
        raise ValueError(f"GGUF metadata of {arch!r} lacks a required key ({e})") from None


def _from_gguf_metadata(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
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
