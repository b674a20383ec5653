"""Read a GGUF file: metadata -> ModelConfig, tensors dequantized to fp32 under HF-style names."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from llmasos.drivers.cuda.quant import QuantWeight, from_gguf
from llmasos.drivers.loaders.config import (
    ModelConfig,
    UnsupportedArchitecture,
    arch_spec,
    from_gguf_metadata,
)
from llmasos.drivers.loaders.progress import Report, tracked

# GGUF block formats the Triton matmuls read as they are (drivers/cuda/quant_matmul.py).
KERNEL_FORMATS = {GGMLQuantizationType.Q8_0: "q8_0", GGMLQuantizationType.Q4_1: "q4_1"}

# GGUF tensor name -> HF name; {i} is the layer index.
NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "model.rope_freqs",  # llama3-style per-frequency divisors
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
# Architectures whose GGUF tensors the table above covers; the others load from HF folders.
GGUF_ARCHITECTURES = ("llama", "mistral", "smollm", "qwen2", "qwen3")


def check_gguf_arch(architecture: str) -> None:
    arch_spec(architecture)  # refuses unknown families by name
    if architecture.lower() not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"GGUF files of architecture {architecture!r} are not supported (GGUF: "
            f"{', '.join(GGUF_ARCHITECTURES)}); deploy its Hugging Face folder instead")
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(name: str) -> str | None:
    """Map a GGUF tensor name to its HF name; None for tensors the model does not use."""
    m = _LAYER.match(name)
    if m is None:
        return NAMES.get(name)
    template = NAMES.get(f"blk.{{i}}.{m.group(2)}")
    return None if template is None else template.format(i=m.group(1))


def field_value(field: Any) -> Any:
    """Decode one GGUF metadata field to a Python value (str, number, list)."""
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return field.parts[field.data[0]].tolist()[0]


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    return {name: field_value(f) for name, f in reader.fields.items()}


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert permute(): rows were reordered from HF's rotate-half RoPE layout
    to interleaved pairs; restore [head, half, pair] -> [head, pair, half]."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


def to_tensor(t: Any) -> torch.Tensor:
    """Dequantize one ReaderTensor to fp32 with HF's [out, in] shape."""
    shape = [int(d) for d in reversed(t.shape.tolist())]
    data = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    if not data.flags.writeable:  # F32/F16 come back as views of the read-only memory map
        data = data.copy()
    return torch.from_numpy(data.reshape(shape))


def to_quant(t: Any) -> QuantWeight:
    """Keep one Q8_0/Q4_1 ReaderTensor's blocks as they are, as a QuantWeight [out, in]."""
    out_features, in_features = (int(d) for d in reversed(t.shape.tolist()))
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True))
    return from_gguf(raw, KERNEL_FORMATS[t.tensor_type], out_features, in_features)


def load_gguf(path: str, progress: bool = True, keep_quantized: bool = False,
              report: Report | None = None,
              ) -> tuple[ModelConfig, dict[str, torch.Tensor | QuantWeight]]:
    """Return the config and fp32 weights (HF names, Q/K rows in HF order). With
    keep_quantized, Q8_0/Q4_1 projection weights stay in their GGUF blocks (QuantWeight) for
    the GPU's quantized matmuls instead of being dequantized. `report` hears each tensor."""
    reader = GGUFReader(path)
    meta = read_metadata(reader)
    check_gguf_arch(str(meta.get("general.architecture", "")))
    cfg = from_gguf_metadata(meta, {t.name for t in reader.tensors})
    permuted = arch_spec(cfg.architecture).permuted_qk
    weights: dict[str, torch.Tensor] = {}
    for t in tracked(reader.tensors, "dequantize", "tensors", progress, report):
        name = hf_name(t.name)
        if name is None:
            continue
        quant = keep_quantized and name.endswith("_proj.weight") and \
            t.tensor_type in KERNEL_FORMATS
        w = to_quant(t) if quant else to_tensor(t)
        heads = cfg.num_heads if name.endswith(("q_proj.weight", "q_proj.bias")) else \
            cfg.num_kv_heads if name.endswith(("k_proj.weight", "k_proj.bias")) else 0
        if permuted and heads and quant:   # rows are whole: permute the rows of blocks
            w = dataclasses.replace(w, qweight=unpermute(w.qweight, heads))
        elif permuted and heads:
            w = unpermute(w, heads)
        weights[name] = w
    return cfg, weights
