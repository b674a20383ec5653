"""Each family's checkpoint names, renamed to Llama's HF names (what LlamaModel reads).

A family is a rename table (regex -> Llama name) plus the few reshapes its layout needs: fused
Q/K/V or gate/up split apart, GPT-2's Conv1D weights transposed, NeoX's per-head interleaved QKV
regrouped, GPT-J's pairwise RoPE rows reordered to rotate-half, Gemma's (1 + w) norms folded.
Names outside Llama's: post_attn_norm / post_mlp_norm (Gemma's sandwich norms), q_norm / k_norm,
embed_positions (GPT-2), and biases.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.model.families import family_name

L = "model.layers.\\1."  # the layer prefix in a replacement

RENAMES: dict[str, list[tuple[str, str]]] = {
    "gemma2": [
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.", L + "post_attn_norm."),
        (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.", L + "post_attention_layernorm."),
        (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.", L + "post_mlp_norm."),
    ],
    "gpt2": [
        (r"^(?:transformer\.)?wte\.", "model.embed_tokens."),
        (r"^(?:transformer\.)?wpe\.", "model.embed_positions."),
        (r"^(?:transformer\.)?ln_f\.", "model.norm."),
        (r"^(?:transformer\.)?h\.(\d+)\.ln_1\.", L + "input_layernorm."),
        (r"^(?:transformer\.)?h\.(\d+)\.ln_2\.", L + "post_attention_layernorm."),
        (r"^(?:transformer\.)?h\.(\d+)\.attn\.c_attn\.", L + "self_attn.qkv_proj."),
        (r"^(?:transformer\.)?h\.(\d+)\.attn\.c_proj\.", L + "self_attn.o_proj."),
        (r"^(?:transformer\.)?h\.(\d+)\.mlp\.c_fc\.", L + "mlp.up_proj."),
        (r"^(?:transformer\.)?h\.(\d+)\.mlp\.c_proj\.", L + "mlp.down_proj."),
    ],
    "gpt_neox": [
        (r"^gpt_neox\.embed_in\.", "model.embed_tokens."),
        (r"^gpt_neox\.final_layer_norm\.", "model.norm."),
        (r"^embed_out\.", "lm_head."),
        (r"^gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.", L + "self_attn.qkv_proj."),
        (r"^gpt_neox\.layers\.(\d+)\.attention\.dense\.", L + "self_attn.o_proj."),
        (r"^gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", L + "mlp.up_proj."),
        (r"^gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", L + "mlp.down_proj."),
        (r"^gpt_neox\.layers\.(\d+)\.", L),
    ],
    "gptj": [
        (r"^transformer\.wte\.", "model.embed_tokens."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.h\.(\d+)\.ln_1\.", L + "input_layernorm."),
        (r"^transformer\.h\.(\d+)\.attn\.out_proj\.", L + "self_attn.o_proj."),
        (r"^transformer\.h\.(\d+)\.attn\.", L + "self_attn."),
        (r"^transformer\.h\.(\d+)\.mlp\.fc_in\.", L + "mlp.up_proj."),
        (r"^transformer\.h\.(\d+)\.mlp\.fc_out\.", L + "mlp.down_proj."),
    ],
}
RENAMES["gemma3"] = RENAMES["gemma2"]
SKIP = re.compile(r"(\.attn\.(bias|masked_bias)|rotary_emb\.inv_freq|\.attention\.(bias|"
                  r"masked_bias))$")  # buffers some checkpoints carry, not weights


def to_llama_names(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint in Llama's names (a no-op for Llama, Mistral, Qwen2/3)."""
    name = family_name(cfg.architecture)
    if name not in RENAMES and name != "phi3":
        return weights
    out = {}
    for key, tensor in weights.items():
        if SKIP.search(key):
            continue
        for pattern, repl in RENAMES.get(name, []):
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = tensor
    for fix in FIXES.get(name, []):
        fix(cfg, out)
    return out


def _layers(out: dict[str, torch.Tensor], suffix: str) -> list[str]:
    return [k for k in list(out) if k.endswith(suffix)]


def transpose_conv1d(cfg: ModelConfig, out: dict[str, torch.Tensor]) -> None:
    """GPT-2's Conv1D stores weights [in, out]."""
    for k in list(out):
        if k.startswith("model.layers.") and k.endswith("_proj.weight"):
            out[k] = out[k].t().contiguous()


def split_qkv(cfg: ModelConfig, out: dict[str, torch.Tensor]) -> None:
    """A fused [q; k; v] projection (weight and bias) into q_proj, k_proj, v_proj."""
    sizes = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    for kind in ("weight", "bias"):
        for k in _layers(out, f"qkv_proj.{kind}"):
            for x, part in zip("qkv", out.pop(k).split(sizes), strict=True):
                out[k.replace("qkv_proj", f"{x}_proj")] = part


def regroup_neox_qkv(cfg: ModelConfig, out: dict[str, torch.Tensor]) -> None:
    """NeoX lays the fused rows out per head as [q_h; k_h; v_h]: regroup to [q; k; v]."""
    for k in _layers(out, "qkv_proj.weight") + _layers(out, "qkv_proj.bias"):
        t = out[k]
        out[k] = t.view(cfg.num_heads, 3, cfg.head_dim, *t.shape[1:]).transpose(0, 1).reshape(
            t.shape)
    split_qkv(cfg, out)


def split_gate_up(cfg: ModelConfig, out: dict[str, torch.Tensor]) -> None:
    for k in _layers(out, "gate_up_proj.weight"):
        gate, up = out.pop(k).chunk(2)
        out[k.replace("gate_up_proj", "gate_proj")] = gate
        out[k.replace("gate_up_proj", "up_proj")] = up


def pairs_to_halves(cfg: ModelConfig, out: dict[str, torch.Tensor]) -> None:
    """GPT-J rotates adjacent pairs; reorder each head's rotary rows of Q and K so that
    rotate-half gives the same scores (q.k is unchanged by one permutation of both)."""
    rot, d = cfg.rotary_dim or cfg.head_dim, cfg.head_dim
    perm = torch.cat([torch.arange(0, rot, 2), torch.arange(1, rot, 2), torch.arange(rot, d)])
    for k in _layers(out, "q_proj.weight") + _layers(out, "k_proj.weight"):
        t = out[k]
        heads = t.shape[0] // d
        out[k] = t.view(heads, d, -1)[:, perm].reshape(t.shape)


def fold_gemma_norms(cfg: ModelConfig, out: dict[str, torch.Tensor]) -> None:
    """Gemma's RMSNorm scales by (1 + w): store 1 + w and use a plain RMSNorm."""
    for k in list(out):
        if k.endswith("norm.weight"):
            out[k] = out[k].float() + 1.0


FIXES: dict[str, list[Callable[[ModelConfig, dict[str, torch.Tensor]], None]]] = {
    "phi3": [split_qkv, split_gate_up],
    "gemma2": [fold_gemma_norms],
    "gemma3": [fold_gemma_norms],
    "gpt2": [transpose_conv1d, split_qkv],
    "gpt_neox": [regroup_neox_qkv],
    "gptj": [pairs_to_halves],
}
