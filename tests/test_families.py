"""Every model family against HF transformers: a tiny random model made here with transformers
(2 layers, hidden 64, vocab 300), saved as a HF folder, loaded by our loader. Logits through
chunked prefill and paged decode within 1e-3 of HF's, greedy ids identical to HF's generate,
alone and batched; sliding windows and soft-caps small enough to matter. One GPT-2 folder also
goes through the inference Engine end to end (tokenizer included)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llmasos.drivers.loaders.hf import load_hf
from llmasos.drivers.model.batch import SeqSlice, build_batch
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.model.llama import LlamaModel

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 300, 64, 2, 4, 2, 16, 96
LOGIT_ATOL = 1e-3
NEAR_TIE = 1e-4
NEW_TOKENS = 8
BLOCK = 4  # small blocks: the tiny prompts span several, out of order
WINDOW = 6  # sliding window shorter than the prompts


def llama_like(**extra: object) -> dict[str, object]:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                **extra)


# family -> (config class, model class, config kwargs)
FAMILIES: dict[str, tuple[str, str, Callable[[], dict[str, object]]]] = {
    "mistral": ("MistralConfig", "MistralForCausalLM", lambda: llama_like(
        sliding_window=WINDOW)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", lambda: llama_like(head_dim=HEAD_DIM)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", lambda: llama_like(sliding_window=None)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", lambda: llama_like(
        head_dim=HEAD_DIM, sliding_window=WINDOW, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", lambda: llama_like(
        head_dim=HEAD_DIM, sliding_window=WINDOW, query_pre_attn_scalar=HEAD_DIM,
        layer_types=["sliding_attention", "full_attention"], rope_local_base_freq=100.0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", lambda: dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256,
        initializer_range=0.1, bos_token_id=1, eos_token_id=2)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", lambda: dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, rotary_pct=0.25,
        max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2)),
    "gpt_neox_sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", lambda: dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, rotary_pct=0.5,
        use_parallel_residual=False, max_position_embeddings=256, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", lambda: dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=8,
        n_positions=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2)),
}
PROMPTS = [[5, 17, 42, 99, 250, 7, 7, 31, 64, 128, 3, 200, 11, 12, 13, 290, 45],
           [9, 8, 7, 6, 5, 4, 3, 101, 102],
           [77, 150, 33]]


def make_folder(root: Path, family: str) -> Path:
    """A random tiny model of the family saved as a HF folder; 1-D weights (norms, biases),
    which HF initialises to constants, get noise so that they matter."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**kwargs())
    model = getattr(transformers, model_cls)(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    folder = root / family
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[str, LlamaModel, torch.nn.Module]:
    folder = make_folder(tmp_path_factory.mktemp("families"), request.param)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg, weights = load_hf(str(folder), progress=False)
    return request.param, LlamaModel(cfg, weights), ref


def generate(model: LlamaModel, prompts: list[list[int]], n: int
             ) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy continuations of the prompts in one batch (prefill in two chunks, then decode);
    each sequence's logits at every step."""
    c = model.cfg
    pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, 1 << 20, block_size=BLOCK)
    tables = [[len(prompts) * b + s for b in range(16)][::-1] for s in range(len(prompts))]
    out: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    halves = [len(p) // 2 for p in prompts]
    first = [SeqSlice(p[:h], 0, tables[s], False) for s, (p, h) in enumerate(
        zip(prompts, halves, strict=True)) if h]
    if first:
        model.forward(build_batch(first, BLOCK, c.num_heads // c.num_kv_heads), pool)
    slices = [SeqSlice(p[h:], h, tables[s], True) for s, (p, h) in enumerate(
        zip(prompts, halves, strict=True))]
    for _ in range(n):
        batch = build_batch(slices, BLOCK, c.num_heads // c.num_kv_heads)
        step = model.forward(batch, pool)
        for row, s in enumerate(batch.sample_seqs):
            logits[s].append(step[row])
            out[s].append(int(step[row].argmax()))
        slices = [SeqSlice([out[s][-1]], sl.start_pos + sl.num_tokens, tables[s], True)
                  for s, sl in enumerate(slices)]
    return out, logits


def hf_reference(ref: torch.nn.Module, prompt: list[int], n: int
                 ) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        ids = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           pad_token_id=0, eos_token_id=None, min_new_tokens=n)
        full = ref(ids).logits[0]
    return ids[0, len(prompt):].tolist(), full


def check(got: list[int], logits: list[torch.Tensor], prompt: list[int], ref_ids: list[int],
          ref_logits: torch.Tensor, what: str) -> None:
    start = len(prompt) - 1
    n = len(got)
    if got != ref_ids:  # only a genuine near-tie may flip; everything before it must agree
        first = next(i for i, (a, b) in enumerate(zip(got, ref_ids, strict=True)) if a != b)
        top = logits[first].topk(2).values
        assert float(top[0] - top[1]) < NEAR_TIE, f"{what}: greedy diverged at {first}"
        n = first + 1
    diff = (torch.stack(logits[:n]) - ref_logits[start:start + n]).abs().max().item()
    assert diff <= LOGIT_ATOL, f"{what}: max |logit diff| {diff}"


def test_logits_and_greedy_match_hf_alone_and_batched(
        pair: tuple[str, LlamaModel, torch.nn.Module]) -> None:
    family, model, ref = pair
    batched, batched_logits = generate(model, PROMPTS, NEW_TOKENS)
    for s, prompt in enumerate(PROMPTS):
        ref_ids, ref_logits = hf_reference(ref, prompt, NEW_TOKENS)
        alone, alone_logits = generate(model, [prompt], NEW_TOKENS)
        check(alone[0], alone_logits[0], prompt, ref_ids, ref_logits, f"{family} alone {s}")
        check(batched[s], batched_logits[s], prompt, ref_ids, ref_logits,
              f"{family} batched {s}")


def test_family_configs_read_from_hf(pair: tuple[str, LlamaModel, torch.nn.Module]) -> None:
    family, model, _ = pair
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (LAYERS, HIDDEN, VOCAB)
    if family in ("gemma2", "gemma3", "mistral"):
        assert cfg.sliding_window == WINDOW
        assert [layer.sliding for layer in model.layers] == (
            [True, True] if family == "mistral" else [True, False])
    if family == "gemma2":
        assert (cfg.attn_softcap, cfg.final_softcap) == (2.0, 3.0)
    if family.startswith("gpt_neox"):
        assert cfg.rotary_dim == HIDDEN // HEADS * (0.25 if family == "gpt_neox" else 0.5)
        assert model.parallel == (family == "gpt_neox")


def test_deploy_through_the_kernel(bare_system: object, tmp_path: Path) -> None:
    """`deploy` of a GPT-2 HF folder and of a Llama-2-style SentencePiece GGUF through a real
    llmosd; jobs on them give HF's greedy ids."""
    from test_loaders import tiny_byte_level_tokenizer, write_llama2_gguf

    from llmasos.proto import kernel_pb2

    from conftest import greedy, wait

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128,
        initializer_range=0.1, bos_token_id=0, eos_token_id=0)).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    tiny_byte_level_tokenizer(tmp_path / "gpt2")
    (tmp_path / "llama2").mkdir()
    write_llama2_gguf(tmp_path / "llama2" / "tiny.gguf")
    llama2 = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama2", gguf_file="tiny.gguf", dtype=torch.float32).eval()
    for name, path, hf, tok_kw in (
            ("gpt2-tiny", tmp_path / "gpt2", gpt2, {}),
            ("llama2-tiny", tmp_path / "llama2" / "tiny.gguf", llama2, {"gguf_file": "tiny.gguf"})):
        info = bare_system.call("Deploy", kernel_pb2.DeployRequest(path=str(path), name=name),
                                timeout=600)
        assert info.name == name
        pid = bare_system.call("Spawn", kernel_pb2.SpawnRequest(
            model=name, prompt="The quick brown fox", sampling=greedy(6, ignore_eos=True))).pid
        got = list(wait(bare_system, pid).token_ids)
        folder = path if path.is_dir() else path.parent
        ids = transformers.AutoTokenizer.from_pretrained(folder, **tok_kw)(
            "The quick brown fox")["input_ids"]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
        assert got == ref, name
