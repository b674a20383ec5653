"""Model families as a table of differences from Llama: one row per family, read like a spec.

The model code (drivers/model/llama.py) is one decoder loop that consults its family's row; the
weight names of each family's checkpoints are mapped in drivers/model/weights.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    norm: str = "rms"  # "rms", "rms1p" (Gemma: x * (1 + w), folded into w at load), "layer"
    activation: str = "silu"  # the MLP's nonlinearity (torch name, see ACTIVATIONS)
    gated: bool = True  # act(gate) * up (Llama) or act(up) (GPT-2, NeoX, GPT-J)
    positions: str = "rope"  # "rope" (rotary) or "learned" (GPT-2's position table)
    rope_style: str = "half"  # "half" (rotate the halves, HF Llama) or "pairs" (GPT-J)
    qk_norm: bool = False  # per-head norm of Q and K before RoPE (Qwen3, Gemma 3)
    parallel_residual: bool = False  # x + attn(norm x) + mlp(norm' x) (NeoX, GPT-J)
    shared_norm: bool = False  # parallel branches share one norm (GPT-J)
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP too
    embed_scale: bool = False  # embeddings times sqrt(hidden) (Gemma)
    qkv_bias: bool = False  # biases on Q, K, V
    out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False  # biases on the MLP projections
    head_bias: bool = False  # bias on the LM head (GPT-J)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "smollm": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True),
    "phi3": Family(),
    "gemma2": Family(norm="rms1p", activation="gelu_tanh", sandwich_norms=True,
                     embed_scale=True),
    "gemma3": Family(norm="rms1p", activation="gelu_tanh", sandwich_norms=True,
                     embed_scale=True, qk_norm=True),
    "gpt2": Family(norm="layer", activation="gelu_tanh", gated=False, positions="learned",
                   qkv_bias=True, out_bias=True, mlp_bias=True),
    "gpt_neox": Family(norm="layer", activation="gelu", gated=False, qkv_bias=True,
                       out_bias=True, mlp_bias=True, parallel_residual=True),
    "gptj": Family(norm="layer", activation="gelu_tanh", gated=False, rope_style="pairs",
                   parallel_residual=True, shared_norm=True, mlp_bias=True, head_bias=True),
}  # fmt: skip

# HF config.json model_type and GGUF general.architecture spellings of the same family
ALIASES = {"gemma3_text": "gemma3", "gptneox": "gpt_neox", "gpt-j": "gptj"}


def family_name(architecture: str) -> str:
    name = architecture.lower()
    return ALIASES.get(name, name)


def family(architecture: str) -> Family:
    return FAMILIES[family_name(architecture)]
