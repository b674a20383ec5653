"""A GGUF's probe (scalar metadata and built tokenizer) is kept beside the weights cache, so a
restart skips the vocabulary (drivers/loaders/probe_cache.py); what comes back is the same."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmasos.drivers.loaders import probe_cache
from llmasos.drivers.loaders.probe import probe

from conftest import embedded_gguf

TEXTS = ["The capital of France is", "def fibonacci(n):\n    return n", "Ünïcödé — 東京 🚀"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


def same(a, b) -> None:   # two (cfg, tokenizer) pairs
    assert a[0] == b[0]
    ta, tb = a[1], b[1]
    assert [ta.encode(t) for t in TEXTS] == [tb.encode(t) for t in TEXTS]
    assert ta.encode_chat(CHAT) == tb.encode_chat(CHAT)
    ids = ta.encode(TEXTS[2])
    assert ta.decode(ids) == tb.decode(ids) == TEXTS[2]
    assert (ta.bos_token_id, ta.eos_token_ids, ta.special_ids, ta.special_tokens, ta.vocab_size
            ) == (tb.bos_token_id, tb.eos_token_ids, tb.special_ids, tb.special_tokens,
                  tb.vocab_size)


def test_the_kept_probe_is_the_probe_and_a_changed_file_is_probed_again(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    shutil.copyfile(embedded_gguf(), gguf)
    fresh = probe(str(gguf))
    kept = probe_cache.cache_file(str(gguf))
    assert kept.is_file() and probe_cache.load(str(gguf)) is not None
    same(fresh, probe(str(gguf)))          # from the kept file
    os.utime(gguf, ns=(1, 1))              # a changed source: another key, probed again
    assert probe_cache.load(str(gguf)) is None
    same(fresh, probe(str(gguf)))
    probe_cache.cache_file(str(gguf)).write_text("{not json")   # unreadable: a miss, no error
    same(fresh, probe(str(gguf)))
    assert probe_cache.load(str(gguf)) is not None               # and written again
