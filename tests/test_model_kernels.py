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
    assert err < 1e-3, err
print("OK", max((a - b).abs().max().item() for a, b in zip(kernels, torch_path)))
'''


def test_model_forward_through_triton_kernels_matches_pytorch_path() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK"), out.stdout
