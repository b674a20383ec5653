"""The load-time probe's decision is kept on disk (drivers/model/probe_cache.py): reused by the
next load, timed again when what it depends on changes, rebuilt when the file is damaged."""

from __future__ import annotations

import json
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
    """The second load of a model does not time oneDNN against MKL again: it takes the stored
    answer (here planted as the opposite of what the probe would say, to tell them apart)."""
    from test_loaders import tiny_llama

    from llmasos.drivers.loaders.cache import load_cached_gguf
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tiny_llama(tmp_path / "tiny.gguf")
    cfg, weights, _ = load_cached_gguf(str(tmp_path / "tiny.gguf"), str(tmp_path / "c"),
                                       progress=False)
    probes: list[torch.Size] = []
    real = llama.onednn_is_faster

    def timed(w: torch.Tensor) -> bool:
        probes.append(w.shape)
        return real(w)
    monkeypatch.setattr(llama, "onednn_is_faster", timed)
    first = llama.LlamaModel(cfg, weights, torch.float32, torch.device("cpu"))
    assert len(probes) == 1
    stored = json.loads(probe_cache.probes_path().read_text())
    key = probe_cache.probe_key(f"onednn_is_faster/{llama.PROBE_REPS}", first.layers[0].gate_up)
    assert stored == {key: first.onednn}
    probe_cache.probes_path().write_text(json.dumps({key: not first.onednn}))
    second = llama.LlamaModel(cfg, weights, torch.float32, torch.device("cpu"))
    assert len(probes) == 1 and second.onednn is (not first.onednn)
