"""The Engine composed in-process on the embedded SmolLM2: model info and pool geometry, batch
invariance (alone vs a batch of 32 with chunked prefill mixed in), seeded sampling across
batches and recompute, stop ids and strings, parameter validation, block copy and swap."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llmasos.drivers.cpu.packed_linear import packed_bytes
from llmasos.services.inference.engine import Engine, StepEntry
from llmasos.services.inference.sampler import SamplingParams

from conftest import converting_once, embedded_gguf, shared_state

MODEL = "smollm2-135m"
GREEDY = SamplingParams(max_tokens=64, ignore_eos=True)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    eng = Engine(str(shared_state(tmp_path_factory.mktemp("state"))),
                 kv_budget_bytes=128 << 20)
    with converting_once():
        eng.load(MODEL, embedded_gguf())
    return eng


class Blocks:
    """A trivial block allocator standing in for the kernel's pager."""

    def __init__(self, start: int = 0) -> None:
        self.next = start

    def take(self, n: int) -> list[int]:
        self.next += n
        return list(range(self.next - n, self.next))


def generate(engine: Engine, prompts: dict[int, list[int]], n: int,
             params: dict[int, SamplingParams], chunk: int = 1 << 20,
             blocks: Blocks | None = None) -> dict[int, list[int]]:
    """Run every sequence to n sampled tokens, prefilling in chunks, all in shared steps."""
    blocks = blocks or Blocks()
    tables = {s: blocks.take((len(p) + n) // 16 + 1) for s, p in prompts.items()}
    pos = dict.fromkeys(prompts, 0)
    pending = {s: list(p) for s, p in prompts.items()}
    out: dict[int, list[int]] = {s: [] for s in prompts}
    while any(len(o) < n for o in out.values()):
        entries = []
        for s in prompts:
            if len(out[s]) < n:
                part = pending[s][:chunk]
                entries.append(StepEntry(s, part, pos[s], tables[s], len(part) == len(pending[s]),
                                         params[s], reset=pos[s] == 0))
        for e, r in zip(entries, engine.step(MODEL, entries), strict=True):
            pos[e.seq_id] += len(e.token_ids)
            pending[e.seq_id] = pending[e.seq_id][len(e.token_ids):]
            assert r.seq_id == e.seq_id and r.sampled == e.sample
            if r.sampled:
                out[e.seq_id].append(r.token_id)
                pending[e.seq_id] = [r.token_id]
    return out


def prompts32(engine: Engine) -> dict[int, list[int]]:
    words = ["the", "river", "of", "time", "carries", "small", "boats", "and", "large",
             "ships", "past", "quiet", "towns", "where", "children", "learn", "to", "count",
             "stars", "and", "old", "men", "argue", "about", "the", "weather"]
    return {100 + s: engine.tokenize(MODEL, " ".join(words[s % 7: s % 7 + 3 + s % 11]))
            for s in range(32)}


def test_model_info_and_geometry(engine: Engine) -> None:
    (info,) = engine.models()
    assert (info.name, info.architecture, info.vocab_size, info.dtype) == (
        MODEL, "llama", 49152, "float32")
    assert 130_000_000 < info.parameters < 140_000_000
    # fp32 weights, and the copies the load-time probe packed where it picked our kernel (the
    # LM head, tied to the embedding, among them): about the weights once more
    model = engine._models[MODEL].model
    packed = sum(packed_bytes(w) for w in model._weights() if isinstance(w, torch.Tensor))
    picked = "packed" in (model.plan.row, model.plan.few, model.plan.many)
    assert (packed > 0.9 * info.parameters * 4) if picked else packed == 0
    assert info.context_length == 8192 and info.memory_bytes == info.parameters * 4 + packed
    g = engine.geometry(MODEL)
    assert (g.block_size, g.num_layers, g.kv_heads, g.head_dim) == (16, 30, 3, 64)
    assert g.block_bytes == 30 * 2 * 16 * 3 * 64 * 4
    assert g.num_blocks == (128 << 20) // g.block_bytes
    assert 2 in engine.eos_token_ids(MODEL)
    ids = engine.tokenize(MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert "<|im_start|>" in engine.detokenize(MODEL, ids)


def test_batch_invariance_32(engine: Engine) -> None:
    prompts = prompts32(engine)
    params = dict.fromkeys(prompts, GREEDY)
    batched = generate(engine, prompts, 12, params, chunk=8)  # chunks mix with decodes
    assert len(batched) == 32
    for s in (100, 113, 131):
        alone = generate(engine, {s: prompts[s]}, 12, params, blocks=Blocks(150))
        assert alone[s] == batched[s], f"seq {s}"


def test_seeded_sampling_reproducible(engine: Engine) -> None:
    prompts = prompts32(engine)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=64,
                            repetition_penalty=1.1, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=True)
    s0 = 105
    alone = generate(engine, {s0: prompts[s0]}, 10, {s0: seeded})[s0]
    mixed = {s: prompts[s] for s in range(100, 108)}
    batch = generate(engine, mixed, 10, {s: seeded if s == s0 else other for s in mixed},
                     blocks=Blocks(50))
    assert batch[s0] == alone
    # recompute after "preemption": re-prefill prompt + first 4 tokens, state rebuilt from ids
    table = list(range(170, 174))
    ids = prompts[s0] + alone[:4]
    (r,) = engine.step(MODEL, [StepEntry(s0, ids, 0, table, True, seeded,
                                         generated_ids=alone[:4], reset=True)])
    assert r.token_id == alone[4]
    different = generate(engine, {s0: prompts[s0]}, 10, {s0: replace(seeded, seed=99)})[s0]
    assert different != alone


def test_stop_token_and_stop_string(engine: Engine) -> None:
    prompt = engine.tokenize(MODEL, "The three primary colors are")
    ref = generate(engine, {7: prompt}, 16, {7: GREEDY})[7]
    text = engine.detokenize(MODEL, ref)
    # stop id: the 4th greedy token ends the sequence there
    stop_id = replace(GREEDY, stop_token_ids=[ref[3]])
    table = list(range(0, 3))
    results = []
    entry = StepEntry(8, prompt, 0, table, True, stop_id, reset=True)
    for _ in range(8):
        (r,) = engine.step(MODEL, [entry])
        results.append(r)
        if r.stopped:
            break
        entry = StepEntry(8, [r.token_id], entry.start_pos + len(entry.token_ids), table, True,
                          stop_id)
    assert results[-1].stopped and len(results) == ref.index(ref[3]) + 1
    # stop string: a word from the middle of the greedy text; emitted text ends before it
    word = text.split()[len(text.split()) // 2]
    stop_str = replace(GREEDY, stop=[word])
    emitted, stopped = "", False
    entry = StepEntry(9, prompt, 0, table, True, stop_str, reset=True)
    for _ in range(16):
        (r,) = engine.step(MODEL, [entry])
        emitted += r.text
        if r.stopped:
            stopped = True
            break
        entry = StepEntry(9, [r.token_id], entry.start_pos + len(entry.token_ids), table, True,
                          stop_str)
    assert stopped and word not in emitted and text.startswith(emitted)
    assert emitted == text[: text.index(word)]


@pytest.mark.parametrize(("field", "value"), [("temperature", -1.0), ("top_p", 0.0),
                                              ("top_k", -3), ("repetition_penalty", 0.0)])
def test_invalid_params_name_the_parameter(engine: Engine, field: str, value: float) -> None:
    """A refused entry fails alone, naming the parameter; the rest of the batch runs."""
    bad = replace(GREEDY, **{field: value})
    results = engine.step(MODEL, [StepEntry(1, [1, 2], 0, [0], True, bad),
                                  StepEntry(2, [1, 2], 0, [1], True, GREEDY)])
    assert field in results[0].error and not results[0].sampled
    assert not results[1].error and results[1].sampled
    engine.release(MODEL, [1, 2])


def test_invalid_entries(engine: Engine) -> None:
    short = engine.step(MODEL, [StepEntry(1, [1] * 20, 0, [0], True, GREEDY)])  # table too short
    assert "block" in short[0].error
    with pytest.raises(ValueError, match="twice"):   # only the kernel can get this wrong
        engine.step(MODEL, [StepEntry(1, [1], 0, [0], True, GREEDY),
                            StepEntry(1, [1], 0, [1], True, GREEDY)])
    with pytest.raises(KeyError):
        engine.step("no-such-model", [])


def test_copy_and_swap_blocks(engine: Engine) -> None:
    pool = engine._models[MODEL].pool
    engine.step(MODEL, [StepEntry(3, list(range(40, 72)), 0, [10, 11], False, GREEDY)])
    before = pool.kv[:, :, [10, 11]].clone()
    assert before.abs().sum() > 0
    engine.copy_blocks(MODEL, [10, 11], [20, 21])
    assert torch.equal(pool.kv[:, :, [20, 21]], before)
    handle = engine.swap_out(MODEL, [10, 11])
    pool.kv[:, :, [10, 11]] = 0
    engine.swap_in(MODEL, handle, [30, 31])
    assert torch.equal(pool.kv[:, :, [30, 31]], before)
    with pytest.raises(KeyError):
        engine.swap_in(MODEL, handle, [30, 31])  # a handle is used once
    engine.release(MODEL, [3, 7, 8, 9])
    assert not {3, 7, 8, 9} & set(engine._models[MODEL].seqs)
    dropped = engine.swap_out(MODEL, [30])
    engine.release(MODEL, [], swap_handles=[dropped])   # a killed, swapped-out job's copy
    with pytest.raises(KeyError):
        engine.swap_in(MODEL, dropped, [31])



def test_split_groups_give_each_shape_its_own_attention_group() -> None:
    """Where SDPA is not exact under padding (attention.padding_exact: MKL capped to AVX2 sums a
    row's keys by their count), each shape gets its own group, so no sequence is padded to
    another's. The bits this keeps are checked by test_quant's test_int8_batched_equals_alone,
    which failed under `make test-avx2` on an AVX-512 Xeon with one group for all chunks."""
    from llmasos.drivers.model.batch import SeqSlice, build_batch

    slices = [SeqSlice([1] * 7, 0, [0], True), SeqSlice([2], 40, [1, 2, 3], True),
              SeqSlice([3] * 5, 0, [4], False), SeqSlice([4], 10, [5], True),
              SeqSlice([5] * 7, 0, [6], True), SeqSlice([6], 41, [7, 8, 9], True)]
    one = build_batch(slices, 16, 3)
    assert len(one.groups) == 2   # decode rows, chunks: padded to the longest of each
    split = build_batch(slices, 16, 3, split_groups=True)
    assert split.order == [3, 1, 5, 2, 0, 4]   # decode by blocks, then chunks by (len, blocks)
    shapes = [(g.num_seqs, g.max_q, g.kv_blocks.shape[1]) for g in split.groups]
    assert shapes == [(1, 1, 1), (2, 1, 3), (1, 5, 1), (2, 7, 1)]
    assert [slices[i].token_ids[-1] for i in split.sample_seqs] == [4, 2, 6, 1, 5]
    rows = torch.cat([g.token_rows for g in split.groups]).tolist()
    assert sorted(rows) == list(range(len(split.input_ids)))   # every row in one group
def test_a_release_does_not_wait_for_the_step_computing(engine: Engine) -> None:
    """A step holds the engine lock through its forward; the kernel's Release of jobs in no
    step must not wait that out (it held up the kernel's next plan by a whole forward)."""
    import threading
    engine.step(MODEL, [StepEntry(41, list(range(40, 56)), 0, [12], True, GREEDY)])
    assert 41 in engine._models[MODEL].seqs
    computing, done = threading.Event(), threading.Event()

    def forward() -> None:   # a step in its forward, as far as the lock can tell
        with engine._lock:
            computing.set()
            done.wait(30)

    step = threading.Thread(target=forward)
    step.start()
    try:
        assert computing.wait(30)
        released = threading.Thread(target=engine.release, args=(MODEL, [41]))
        released.start()
        released.join(10)
        assert not released.is_alive(), "Release waited for the step"
        assert 41 not in engine._models[MODEL].seqs
    finally:
        done.set()
        step.join(30)
