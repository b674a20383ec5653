"""The load-time probe's decision is kept on disk (drivers/model/probe_cache.py): reused by the
next load, timed again when what it depends on changes, rebuilt when the file is damaged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from llmasos.drivers.model import llama, probe_cache


class Counted:
    """A probe that answers `answer` and counts its runs."""

    def __init__(self, answer: bool) -> None:
        self.answer, self.runs = answer, 0

    def __call__(self) -> bool:
        self.runs += 1
        return self.answer


def test_a_decision_is_reused_and_a_new_key_is_measured(tmp_path: Path) -> None:
    path = tmp_path / "probes.json"
    probe = Counted(True)
    assert probe_cache.remembered("k1", probe, path) is True
    assert probe_cache.remembered("k1", Counted(False), path) is True   # the stored answer
    assert probe.runs == 1
    other = Counted(False)
    assert probe_cache.remembered("k2", other, path) is False and other.runs == 1
    assert json.loads(path.read_text()) == {"k1": True, "k2": False}
    path.write_text("{not json")   # damaged: measured again, file rewritten
    again = Counted(False)
    assert probe_cache.remembered("k1", again, path) is False and again.runs == 1
    assert json.loads(path.read_text()) == {"k1": False}


def test_the_key_changes_with_shape_dtype_and_threads() -> None:
    w = torch.zeros(8, 4)
    key = probe_cache.probe_key("p", w)
    assert torch.__version__ in key and probe_cache.cpu_signature() in key
    assert probe_cache.probe_key("p", torch.zeros(8, 5)) != key
    assert probe_cache.probe_key("p", w.double()) != key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert probe_cache.probe_key("p", w) != key
    finally:
        torch.set_num_threads(threads)
    assert probe_cache.probe_key("p", w) == key


def test_the_model_reuses_the_probe_across_loads(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The second load of a model does not time the matmul kernels again: it takes the stored
    answers (here one planted as a different kernel than the probe picked, to tell them apart)."""
    from test_loaders import tiny_llama

    from llmasos.drivers.loaders.cache import load_cached_gguf
    from llmasos.drivers.model import cpu_linear
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tiny_llama(tmp_path / "tiny.gguf")
    cfg, weights, _ = load_cached_gguf(str(tmp_path / "tiny.gguf"), str(tmp_path / "c"),
                                       progress=False)
    probes: list[str] = []
    real = cpu_linear.fastest

    def timed(regime: cpu_linear.Regime, ws: list[torch.Tensor], reps: int = 3) -> str:
        probes.append(regime.name)
        return real(regime, ws, reps)
    monkeypatch.setattr(cpu_linear, "fastest", timed)
    first = llama.LlamaModel(cfg, weights, torch.float32, torch.device("cpu"))
    assert sorted(probes) == ["few", "many", "row"]
    stored = json.loads(probe_cache.probes_path().read_text())
    assert sorted(stored.values()) == sorted([first.plan.row, first.plan.few, first.plan.many])
    (row_key,) = [k for k in stored if k.startswith("pass/row[")]
    planted = "mkl" if first.plan.row != "mkl" else "mkl_transposed"
    probe_cache.probes_path().write_text(json.dumps({**stored, row_key: planted}))
    second = llama.LlamaModel(cfg, weights, torch.float32, torch.device("cpu"))
    assert len(probes) == 3 and second.plan.row == planted
    assert (second.plan.few, second.plan.many) == (first.plan.few, first.plan.many)


def test_the_int8_engine_is_chosen_once_per_machine(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The quantized engine's timing probe runs at the first load only: engines round apart in
    the last bit, so a restart timed on a busy machine must not switch its tokens."""
    from llmasos.drivers.quant import cpu_int8
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    runs = []

    def measure(shape: tuple[int, int], rows: tuple[int, ...], supported: list[str]) -> str:
        runs.append(shape)
        return "fbgemm"   # not the preferred engine, so a remembered answer shows

    monkeypatch.setattr(cpu_int8, "measure_engine", measure)
    monkeypatch.setattr(torch.backends.quantized, "engine", torch.backends.quantized.engine)
    for _ in range(2):   # two loads: a fresh process each, as far as the choice goes
        monkeypatch.setattr(cpu_int8, "_chosen", None)
        assert cpu_int8.choose_engine() == "fbgemm"
        assert torch.backends.quantized.engine == "fbgemm"
    assert len(runs) == 1
    assert any(k.startswith("quant_engine/") for k in json.loads(
        (tmp_path / "llmasos" / "probes.json").read_text()))


def test_an_isa_cap_is_a_new_key(monkeypatch) -> None:  # noqa: ANN001
    """ONEDNN_MAX_CPU_ISA or MKL_ENABLE_INSTRUCTIONS change which kernels run, so the answer."""
    base = probe_cache.cpu_signature()
    probe_cache.cpu_signature.cache_clear()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")   # not what any make target sets
    try:
        assert probe_cache.cpu_signature() != base
    finally:
        probe_cache.cpu_signature.cache_clear()


BURST_S = 0.1   # longer than x86's whole series timed alone (6 calls at 10 ms): that flipped


class Busy:
    """A matmul of `cost` seconds, ten times slower while the machine is busy (a burst of load
    on a shared core over the race's first BURST_S seconds)."""

    def __init__(self, cost: float, busy: list[float]) -> None:
        self.cost, self.busy = cost, busy

    def matmul(self, x: torch.Tensor) -> None:
        if not self.busy:
            self.busy.append(time.perf_counter() + BURST_S)   # the burst starts with the race
        time.sleep(self.cost * (10 if time.perf_counter() < self.busy[0] else 1))


def test_a_busy_spell_does_not_flip_the_engine_race(monkeypatch) -> None:  # noqa: ANN001
    """CI at 241a09d: the engines were timed one after another, a burst of load covered the
    preferred engine's whole series and the race picked oneDNN (~1.8x the weight memory).
    Interleaved rounds put the burst on every engine; each keeps its best round."""
    from llmasos.drivers.quant import cpu_int8
    monkeypatch.setattr(torch.backends.quantized, "engine", torch.backends.quantized.engine)
    busy: list[float] = []
    racers = {"x86": cpu_int8.Candidate(Busy(0.001, busy), 0.01),          # type: ignore[arg-type]
              "onednn": cpu_int8.Candidate(Busy(0.003, busy), 0.01)}       # type: ignore[arg-type]
    seconds = cpu_int8._race(racers, [torch.zeros(1, 4)])
    assert seconds["x86"] < seconds["onednn"] < 10 * 0.003
    assert busy and busy[0] < time.perf_counter()   # the burst happened inside the race
    busy.clear()   # the same burst against the old way, each engine's series after the other's
    alone = {name: one_after_another(c.lin) for name, c in racers.items()}
    assert alone["x86"] > alone["onednn"]   # what CI saw: the burst decided the pick


def one_after_another(lin: Busy, reps: int = 5) -> float:
    """The probe's old timing: a warm-up call, then the best of `reps` calls in a row."""
    lin.matmul(torch.zeros(1, 4))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        lin.matmul(torch.zeros(1, 4))
        best = min(best, time.perf_counter() - t0)
    return best
