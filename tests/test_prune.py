"""Pruning (drivers/prune, `llmosd compress`, `llmsh compress`) on the real embedded SmolLM2:
each method cuts what was asked, by its importance, and a pruned folder loads through the
real loader and serves text on a real llmosd. One short calibration pass (128 tokens) is shared
by the in-process tests; the CLI runs its own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmasos.drivers.loaders.cache import load_weights
from llmasos.drivers.loaders.probe import probe
from llmasos.drivers.model.batch import SeqSlice, build_batch
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.model.llama import LlamaModel
from llmasos.drivers.prune import semi_sparse
from llmasos.drivers.prune.calibrate import Stats, collect
from llmasos.drivers.prune.compress import calibration_ids
from llmasos.drivers.prune.layers import prune_layers
from llmasos.drivers.prune.methods import removed, request
from llmasos.drivers.prune.structured import head_shape, prune_heads, prune_mlp
from llmasos.drivers.prune.unstructured import is_two_four, linears, prune_weights
from llmasos.drivers.prune.write import SPARSITY_KEY, write_folder
from llmasos.kernel import main as llmosd
from llmasos.proto import kernel_pb2
from llmasos.shell import main as llmsh

from conftest import System, converting_once, embedded_gguf, free_port, greedy, shared_state

CALIB_TOKENS = 128   # two calibration steps: enough to rank, quick on two shared cores
LAYERS, INTERMEDIATE, HEADS, KV_HEADS = 30, 1536, 9, 3   # SmolLM2-135M


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_state(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def source(state: Path) -> tuple:
    """(config, fp32 weights, tokenizer) of the embedded GGUF, through the shared cache."""
    with converting_once():
        cfg, weights, _ = load_weights(embedded_gguf(), str(state), progress=False)
    _, tokenizer = probe(embedded_gguf())
    assert (cfg.num_layers, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads) == (
        LAYERS, INTERMEDIATE, HEADS, KV_HEADS)
    return cfg, weights, tokenizer


@pytest.fixture(scope="module")
def stats(source: tuple) -> Stats:
    cfg, weights, tokenizer = source
    return collect(LlamaModel(cfg, weights), calibration_ids(tokenizer, CALIB_TOKENS),
                   progress=False)


def written(tmp_path_factory: pytest.TempPathFactory, source: tuple, pruned: object,
            name: str) -> Path:
    cfg, _, tokenizer = source
    out = tmp_path_factory.mktemp("pruned") / name
    write_folder(str(out), embedded_gguf(), cfg, tokenizer, pruned, {"method": name})
    return out


@pytest.fixture(scope="module")
def layers_folder(tmp_path_factory, source, stats) -> Path:
    cfg, weights, _ = source
    return written(tmp_path_factory, source, prune_layers(cfg, weights, stats, 0.25), "layers")


@pytest.fixture(scope="module")
def two_four_folder(tmp_path_factory, source, stats) -> Path:
    _, weights, _ = source
    return written(tmp_path_factory, source, prune_weights(weights, stats, "2:4", 0.5), "2-4")


def load(folder: Path, state: Path) -> LlamaModel:
    cfg, weights, kind = load_weights(str(folder), str(state), progress=False)
    assert kind == "safetensors"
    return LlamaModel(cfg, weights)


def layer_parameters(weights: dict[str, torch.Tensor], i: int) -> int:
    return sum(t.numel() for n, t in weights.items() if n.startswith(f"model.layers.{i}."))


def logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """Next-token logits of every position of ids (one prefill)."""
    cfg = model.cfg
    pool = KVPool(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 8 << 20, 16, model.dtype,
                  model.device)
    batch = build_batch([SeqSlice(ids, 0, list(range(pool.geometry.num_blocks)), True)], 16,
                        cfg.num_heads // cfg.num_kv_heads, model.device,
                        for_kernels=model.kernels is not None)
    batch.sample_rows = torch.arange(len(ids), device=model.device)
    return model.forward(batch, pool)


PROMPT = "The capital of France is Paris. The capital of Italy is"


# -- requests -------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "ratio", "words"), [
    ("prune", 0.5, "unknown method"), ("layers", 0.0, "out of range"),
    ("layers", 1.0, "out of range"), ("wanda", None, "needs --ratio"),
    ("2:4", 0.3, "exactly 0.5"),
])
def test_bad_requests_are_named(method, ratio, words):
    with pytest.raises(ValueError, match=words):
        request(method, ratio)


def test_head_shapes_keep_gqa_groups_equal():
    assert head_shape(3, 3, 6) == (3, 2)   # a query head out of every KV group
    assert head_shape(3, 3, 3) == (3, 1)
    assert head_shape(8, 1, 6) == (6, 1)   # multi-head attention: whole heads
    assert head_shape(2, 4, 4) == (2, 2)
    assert head_shape(3, 3, 9) != (3, 3)   # never the full shape


# -- structured -----------------------------------------------------------------------------


def test_layer_pruning_drops_the_least_influential_quarter(source, stats, layers_folder, state):
    cfg, weights, _ = source
    dropped = removed(LAYERS, 0.25)
    assert dropped == 8   # 7.5 rounds up
    model = load(layers_folder, state)
    assert model.cfg.num_layers == len(model.layers) == LAYERS - dropped
    base = LlamaModel(cfg, weights).num_parameters
    assert model.num_parameters == base - dropped * layer_parameters(weights, 0)
    record = json.loads((layers_folder / "config.json").read_text())["llmasos_pruned"][-1]
    lowest = sorted(range(LAYERS), key=lambda i: stats.influence[i])[:dropped]
    assert record["dropped_layers"] == sorted(lowest)
    # every layer changes its input (cos < 1), each by its own amount: the hidden states were
    # once kept by reference, the forward's in-place residual add made them all the last
    # one, every influence read 0 and layers 0..7 were dropped
    assert min(stats.influence) > 0
    assert len({round(b, 6) for b in stats.influence}) == LAYERS
    kept = [i for i in range(LAYERS) if i not in lowest]
    for new, old in enumerate(kept):   # the survivors, renumbered in order, unchanged
        assert torch.equal(model.layers[new].down,
                           weights[f"model.layers.{old}.mlp.down_proj.weight"])
    assert math.isfinite(float(logits(model, probe(str(layers_folder))[1].encode(PROMPT)).sum()))


def test_mlp_pruning_keeps_the_most_important_channels(source, stats, tmp_path_factory, state):
    cfg, weights, _ = source
    pruned = prune_mlp(cfg, weights, stats, 0.25)
    keep = INTERMEDIATE - removed(INTERMEDIATE, 0.25)
    assert keep == 1152
    model = load(written(tmp_path_factory, source, pruned, "mlp"), state)
    assert model.cfg.intermediate_size == keep
    assert model.num_parameters == LlamaModel(cfg, weights).num_parameters - \
        LAYERS * 3 * cfg.hidden_size * (INTERMEDIATE - keep)
    down = weights["model.layers.3.mlp.down_proj.weight"]
    score = stats.input_norm(3, "down") * down.norm(dim=0)
    cut = pruned.weights["model.layers.3.mlp.down_proj.weight"]
    column = {down[:, j].numpy().tobytes(): j for j in range(INTERMEDIATE)}
    kept = [column[cut[:, j].numpy().tobytes()] for j in range(keep)]
    assert kept == sorted(kept)   # the layout's order is kept
    dropped = sorted(set(range(INTERMEDIATE)) - set(kept))
    assert score[kept].min() >= score[dropped].max()
    gate = weights["model.layers.3.mlp.gate_proj.weight"]
    assert torch.equal(pruned.weights["model.layers.3.mlp.gate_proj.weight"], gate[kept])


def test_head_pruning_cuts_one_query_head_per_kv_group(source, stats, tmp_path_factory, state):
    """Dropping a query head is zeroing its o_proj columns: the cut model gives the logits of
    the full one so masked, which holds only if each kept head still reads its own KV group.
    The folder is a plain HF Llama config: transformers' model of it gives our logits too."""
    import transformers
    cfg, weights, tokenizer = source
    pruned = prune_heads(cfg, weights, stats, 1 / 3)
    assert pruned.config == {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 64}
    a = "model.layers.0.self_attn."
    assert pruned.weights[a + "q_proj.weight"].shape == (6 * 64, cfg.hidden_size)
    assert pruned.weights[a + "o_proj.weight"].shape == (cfg.hidden_size, 6 * 64)
    assert torch.equal(pruned.weights[a + "k_proj.weight"], weights[a + "k_proj.weight"])
    folder = written(tmp_path_factory, source, pruned, "heads")
    model = load(folder, state)
    assert (model.cfg.num_heads, model.cfg.num_kv_heads) == (6, 3)
    ids = tokenizer.encode(PROMPT)
    masked = dict(weights)
    for i in range(LAYERS):
        a = f"model.layers.{i}.self_attn."
        q = weights[a + "q_proj.weight"].view(HEADS, 64, -1)
        cut = pruned.weights[a + "q_proj.weight"].view(6, 64, -1)
        kept = {next(h for h in range(HEADS) if torch.equal(q[h], c)) for c in cut}
        o = weights[a + "o_proj.weight"].clone().view(-1, HEADS, 64)
        o[:, sorted(set(range(HEADS)) - kept)] = 0
        masked[a + "o_proj.weight"] = o.view(-1, HEADS * 64)
    assert (logits(model, ids) - logits(LlamaModel(cfg, masked), ids)).abs().max() < 2e-3
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    # fp32 through 30 layers, two implementations: ~1e-4 seen; a misplaced head is O(1)
    assert (logits(model, ids) - ref).abs().max() < 2e-3


# -- unstructured ---------------------------------------------------------------------------


def two_layers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layers 4 and 5 and the embedding: what the unstructured tests look at, pruned quickly."""
    return {n: t for n, t in weights.items()
            if n.startswith(("model.layers.4.", "model.layers.5.", "model.embed"))}


def test_magnitude_zeroes_half_of_each_linear_weight_smallest_first(source):
    weights = two_layers(source[1])
    pruned = prune_weights(weights, None, "magnitude", 0.5)
    assert len(linears(weights)) == 14
    for name, _, _ in linears(weights):
        w, cut = weights[name], pruned.weights[name]
        assert 0.5 <= float((cut == 0).float().mean()) < 0.5 + 1e-3
        kept = cut != 0
        assert w[kept].abs().min() >= w[~kept].abs().max()
    assert torch.equal(pruned.weights["model.embed_tokens.weight"],
                       weights["model.embed_tokens.weight"])


def test_wanda_drops_the_lowest_weight_times_activation_in_each_row(source, stats):
    weights = two_layers(source[1])
    pruned = prune_weights(weights, stats, "wanda", 0.5)
    name = "model.layers.5.mlp.down_proj.weight"
    w, cut = weights[name], pruned.weights[name]
    assert ((cut == 0).sum(dim=1) >= w.shape[1] // 2).all()
    score = w.abs() * stats.input_norm(5, "down")
    for row in range(0, w.shape[0], 97):
        kept = cut[row] != 0
        assert score[row][kept].min() >= score[row][~kept].max()


def test_two_four_holds_the_pattern_and_marks_the_folder(source, two_four_folder, state):
    _, weights, _ = source
    model = load(two_four_folder, state)
    assert model.cfg.sparsity == "2:4"
    config = json.loads((two_four_folder / "config.json").read_text())
    assert config[SPARSITY_KEY] == "2:4"
    for layer in model.layers[:3]:
        for w in (layer.qkv, layer.o, layer.gate_up, layer.down):
            groups = w.view(w.shape[0], -1, 4)
            assert ((groups == 0).sum(dim=2) >= 2).all()   # 2 of every 4 inputs are zero
            assert (groups != 0).sum(dim=2).float().mean() > 1.99   # ... and only 2
            assert is_two_four(w)
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert not is_two_four(q)   # the source does not hold it by chance
    assert semi_sparse.apply(model) == 0   # the CPU runs it dense
    assert isinstance(model.layers[0].qkv, torch.Tensor)


def test_a_later_cut_that_breaks_the_pattern_drops_the_mark(source, stats, two_four_folder,
                                                            state):
    cfg, weights, _ = source
    _, sparse_weights, _ = load_weights(str(two_four_folder), str(state), progress=False)
    from llmasos.drivers.prune.write import gguf_config, pruned_config
    base = {**gguf_config(cfg), SPARSITY_KEY: "2:4"}
    assert pruned_config(base, prune_layers(cfg, sparse_weights, stats, 0.1), {})[
        SPARSITY_KEY] == "2:4"   # whole layers out: every weight left keeps its pattern
    assert SPARSITY_KEY not in pruned_config(base, prune_mlp(cfg, sparse_weights, stats, 0.3),
                                             {})   # columns out of down_proj: groups broken


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="semi-structured sparse kernels need a CUDA GPU of sm80 or newer")
def test_two_four_runs_sparse_on_the_gpu(two_four_folder, state, source):
    cfg, weights, kind = load_weights(str(two_four_folder), str(state), progress=False)
    dense = LlamaModel(cfg, weights, torch.bfloat16, "cuda")
    sparse = LlamaModel(cfg, weights, torch.bfloat16, "cuda")
    assert semi_sparse.apply(sparse) == 4 * LAYERS
    assert isinstance(sparse.layers[0].gate_up, semi_sparse.SemiSparse)
    assert sparse.weight_bytes < dense.weight_bytes
    ids = source[2].encode(PROMPT)
    a, b = logits(dense, ids), logits(sparse, ids)
    # bf16 (8 mantissa bits) through 30 layers: the two matmul kernels round differently
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert torch.equal(a[-1].argmax(), b[-1].argmax())


# -- serving ----------------------------------------------------------------------------------


def test_pruned_folders_deploy_and_serve(bare_system: System, layers_folder: Path,
                                         two_four_folder: Path, state: Path) -> None:
    for name, folder in (("pruned-layers", layers_folder), ("pruned-2-4", two_four_folder)):
        info = bare_system.call("Deploy", kernel_pb2.DeployRequest(path=str(folder), name=name),
                                timeout=600)
        assert info.parameters == load(folder, state).num_parameters
        pid = bare_system.call("Spawn", kernel_pb2.SpawnRequest(
            model=name, prompt=PROMPT, sampling=greedy(8, ignore_eos=True))).pid
        done = bare_system.call("Wait", kernel_pb2.WaitRequest(pid=pid), timeout=300)
        assert len(done.token_ids) == 8 and done.text.strip()
    layers = next(m for m in bare_system.call("Models", kernel_pb2.ModelsRequest()).models
                  if m.name == "pruned-layers")
    assert layers.parameters < 110_000_000   # 22 layers of 30


# -- the commands -----------------------------------------------------------------------------


def test_llmosd_compress_writes_the_folder(tmp_path: Path, state: Path, capsys) -> None:
    out = tmp_path / "l10"
    assert llmosd.main(["compress", "smollm2-135m", "--out", str(out), "--method", "layers",
                        "--ratio", "0.1", "--calib-tokens", "64", "--home", str(state)]) == 0
    assert "layers 30 -> 27" in capsys.readouterr().out
    assert probe(str(out))[0].num_layers == 27


def test_llmsh_compress_runs_offline(tmp_path: Path, state: Path) -> None:
    out = tmp_path / "mag"
    dead = f"127.0.0.1:{free_port()}"   # no daemon: compress works on the files
    line = f"compress {embedded_gguf()} --out {out} --method magnitude --ratio 0.5 " \
           f"--home {state}"
    assert llmsh.main(["--addr", dead, "-c", line]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["llmasos_pruned"][-1]["method"] == "magnitude"
    _, weights, _ = load_weights(str(out), str(state), progress=False)
    w = weights["model.layers.0.mlp.up_proj.weight"]
    assert abs(float((w == 0).float().mean()) - 0.5) < 1e-3


@pytest.mark.parametrize(("args", "status", "words"), [
    (["--method", "prune", "--ratio", "0.5"], 2, "invalid choice"),
    (["--method", "layers", "--ratio", "1.5"], 1, "out of range"),
    (["--method", "layers", "--ratio", "0.001"], 1, "removes 0"),
    (["--method", "mlp"], 1, "needs --ratio"),
])
def test_llmosd_compress_errors(tmp_path: Path, state: Path, capsys, args, status, words):
    argv = ["compress", "smollm2-135m", "--out", str(tmp_path / "x"), "--home", str(state),
            *args]
    if status == 2:   # argparse's own usage error
        with pytest.raises(SystemExit) as exit_:
            llmosd.main(argv)
        assert exit_.value.code == 2
    else:
        assert llmosd.main(argv) == status
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_model_and_existing_out_are_refused(tmp_path: Path, state: Path, capsys):
    assert llmosd.main(["compress", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "x"),
                        "--method", "magnitude", "--ratio", "0.5"]) == 1
    assert "no such model" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    assert llmosd.main(["compress", "smollm2-135m", "--out", str(tmp_path / "taken"),
                        "--method", "magnitude", "--ratio", "0.5"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "file").read_text() == "mine"
    dead = f"127.0.0.1:{free_port()}"
    assert llmsh.main(["--addr", dead, "-c", f"compress {tmp_path / 'nope'} --out "
                       f"{tmp_path / 'y'} --method layers --ratio 0.5"]) == 1
    assert llmsh.main(["--addr", dead, "-c", f"compress smollm2-135m --out {tmp_path / 'y'} "
                       "--method layers --ratio 2"]) == 2
    err = capsys.readouterr().err
    assert "no such model" in err and "out of range" in err
