"""The CUDA backend's dispatch: the model's forward through the Triton kernels gives the same
logits as its PyTorch path. Run in Triton's interpreter on CPU tensors (a subprocess with
TRITON_INTERPRET=1, so the flag never reaches this pytest process)."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = r'''
import torch
from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.model.batch import SeqSlice, build_batch
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.model.llama import LlamaModel

torch.manual_seed(0)
cfg = ModelConfig(architecture="llama", vocab_size=96, hidden_size=128, intermediate_size=256,
                  num_layers=2, num_heads=6, num_kv_heads=2, head_dim=64)
h, d = cfg.hidden_size, cfg.head_dim
w = {"model.embed_tokens.weight": torch.randn(96, h), "model.norm.weight": torch.ones(h),
     "lm_head.weight": torch.randn(96, h) * 0.1}
for i in range(2):
    p = f"model.layers.{i}."
    w |= {p + "input_layernorm.weight": torch.ones(h),
          p + "post_attention_layernorm.weight": torch.ones(h),
          p + "self_attn.q_proj.weight": torch.randn(6 * d, h) * 0.1,
          p + "self_attn.k_proj.weight": torch.randn(2 * d, h) * 0.1,
          p + "self_attn.v_proj.weight": torch.randn(2 * d, h) * 0.1,
          p + "self_attn.o_proj.weight": torch.randn(h, 6 * d) * 0.1,
          p + "mlp.gate_proj.weight": torch.randn(256, h) * 0.1,
          p + "mlp.up_proj.weight": torch.randn(256, h) * 0.1,
          p + "mlp.down_proj.weight": torch.randn(h, 256) * 0.1}
model = LlamaModel(cfg, w)
assert model.kernels is not None, "the interpreter must select the Triton kernels"

def run(for_kernels):
    pool = KVPool(2, 2, d, 64 * 16 * 2 * 2 * 2 * d * 4, 16, torch.float32, "cpu")
    # step 1: two prompts (19 and 5 tokens); step 2: both decode one token, plus a new chunk
    s1 = [SeqSlice(list(range(19)), 0, [7, 3], True), SeqSlice(list(range(5, 10)), 0, [1], True)]
    s2 = [SeqSlice([4], 19, [7, 3], True), SeqSlice([9], 5, [1], True),
          SeqSlice(list(range(11)), 0, [5], True)]
    out = []
    for slices in (s1, s2):
        batch = build_batch(slices, 16, 3, "cpu", for_kernels=for_kernels)
        out.append(model.forward(batch, pool))
    return out

kernels, saved = run(True), model.kernels
model.kernels = None
torch_path = run(False)
for a, b in zip(kernels, torch_path):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    # fp32 in both, other summation orders: 2 layers of K <= 256 at |logit| <~ 4 round to ~3e-5
    assert err < 1e-3, err
print("OK", max((a - b).abs().max().item() for a, b in zip(kernels, torch_path)))
'''


def test_model_forward_through_triton_kernels_matches_pytorch_path() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1].startswith("OK"), out.stdout   # after any log lines


QUANTIZED = r'''
import sys
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, GGUFWriter
from gguf.quants import quantize
from llmasos.drivers.cuda.quant import QuantWeight
from llmasos.drivers.loaders.gguf import load_gguf
from llmasos.drivers.model.batch import SeqSlice, build_batch
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.model.llama import LlamaModel

H, HEADS, KV, FFN, VOCAB = 128, 2, 1, 256, 96
path = sys.argv[1]
rng = np.random.default_rng(0)
w = GGUFWriter(path, "llama")
for add, v in ((w.add_block_count, 2), (w.add_context_length, 256), (w.add_embedding_length, H),
               (w.add_feed_forward_length, FFN), (w.add_head_count, HEADS),
               (w.add_head_count_kv, KV), (w.add_vocab_size, VOCAB)):
    add(v)
w.add_rope_freq_base(10000.0)
w.add_layer_norm_rms_eps(1e-5)
def t(name, shape, qtype):
    data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if qtype == Q.F32:
        w.add_tensor(name, data)
    else:
        w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
t("token_embd.weight", (VOCAB, H), Q.F32)
t("output_norm.weight", (H,), Q.F32)
for i in range(2):
    t(f"blk.{i}.attn_norm.weight", (H,), Q.F32)
    t(f"blk.{i}.ffn_norm.weight", (H,), Q.F32)
    t(f"blk.{i}.attn_q.weight", (HEADS * 64, H), Q.Q4_1)
    t(f"blk.{i}.attn_k.weight", (KV * 64, H), Q.Q4_1)
    t(f"blk.{i}.attn_v.weight", (KV * 64, H), Q.Q4_1)
    t(f"blk.{i}.attn_output.weight", (H, HEADS * 64), Q.Q8_0)
    t(f"blk.{i}.ffn_gate.weight", (FFN, H), Q.Q8_0)
    t(f"blk.{i}.ffn_up.weight", (FFN, H), Q.Q8_0)
    t(f"blk.{i}.ffn_down.weight", (H, FFN), Q.Q4_1)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

cfg, packed = load_gguf(path, progress=False, keep_quantized=True)
_, dense = load_gguf(path, progress=False)
quant_model = LlamaModel(cfg, packed)
assert quant_model.kernels is not None
layer = quant_model.layers[0]
assert isinstance(layer.qkv, QuantWeight) and layer.qkv.fmt == "q4_1"
assert isinstance(quant_model.layers[0].gate_up, QuantWeight)
dense_model = LlamaModel(cfg, dense)
dense_model.kernels = None   # the plain PyTorch path on dequantized weights
assert quant_model.weight_bytes < dense_model.weight_bytes / 3

def run(model):
    pool = KVPool(2, KV, 64, 64 * 16 * 2 * 2 * KV * 64 * 4, 16, torch.float32, "cpu")
    slices = [SeqSlice(list(range(21)), 0, [4, 9], True), SeqSlice([5, 6, 7], 0, [2], True)]
    first = model.forward(build_batch(slices, 16, HEADS // KV, "cpu",
                                      for_kernels=model.kernels is not None), pool)
    step = [SeqSlice([8], 21, [4, 9], True), SeqSlice([1], 3, [2], True)]
    return first, model.forward(build_batch(step, 16, HEADS // KV, "cpu",
                                            for_kernels=model.kernels is not None), pool)

for a, b in zip(run(quant_model), run(dense_model)):
    err = (a - b).abs().max().item()
    # the same weights dequantized in-kernel vs up front: only fp32 summation order differs
    assert err < 1e-3 * max(1.0, b.abs().max().item()), err
print("OK", err)
'''


def test_gguf_quantized_weights_run_through_the_quantized_kernels(tmp_path) -> None:
    """Q8_0/Q4_1 projections stay in their GGUF blocks on the kernel path and give the logits
    of the dequantized model (which the PyTorch path runs)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", QUANTIZED, str(tmp_path / "q.gguf")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1].startswith("OK"), out.stdout   # after any log lines
