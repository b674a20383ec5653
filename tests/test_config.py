"""llmosd's settings: defaults < TOML file < environment < flags."""

from __future__ import annotations

import argparse

import pytest

from llmasos.kernel import config


def args(**flags: object) -> argparse.Namespace:
    return argparse.Namespace(**flags)


def test_precedence_file_env_flags(tmp_path, monkeypatch) -> None:
    toml = tmp_path / "llmosd.toml"
    toml.write_text('policy = "fair"\nkv_budget_mb = 64\ngrace = 3\nembedded = false\n')
    monkeypatch.setenv("LLMASOS_KV_BUDGET_MB", "128")
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path))
    cfg = config.load(args(config=str(toml), grace=7.5))
    assert cfg.policy == "fair"           # from the file
    assert cfg.kv_budget_mb == 128        # the environment beats the file
    assert cfg.grace == 7.5               # a flag beats both
    assert cfg.embedded is False
    assert cfg.home == str(tmp_path)


def test_default_file_in_home_is_read(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path))
    (tmp_path / "llmosd.toml").write_text('listen = "127.0.0.1:7999"\n')
    assert config.load(args()).listen == "127.0.0.1:7999"


def test_unknown_setting_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLMASOS_HOME", str(tmp_path))
    (tmp_path / "llmosd.toml").write_text("polcy = 1\n")
    with pytest.raises(SystemExit, match="unknown setting 'polcy'"):
        config.load(args())
