"""llmosd's configuration: defaults, then an optional TOML file, then environment, then flags."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path


def default_home() -> str:
    return os.environ.get("LLMASOS_HOME") or str(Path.home() / ".local/state/llmasos")


@dataclass
class Config:
    listen: str = "127.0.0.1:7070"
    home: str = ""
    grace: float = 10.0              # seconds running jobs get at shutdown
    zombie_ttl: float = 600.0        # unreaped zombies are reaped after this long
    policy: str = "fcfs"             # scheduler policy: fcfs, priority, fair
    embedded: bool = True            # deploy the embedded SmolLM2 as smollm2-135m at boot
    kv_budget_mb: int = 256          # KV pool memory per model
    device: str = "cpu"
    quant: str = "none"              # Deploy's default recipe (and the boot's); "auto" = the
                                     # device's fastest within 2% of fp32 (quantize.AUTO): not the
                                     # default while int8 is not recompute-exact (README)
    token_budget: int = 256          # most tokens in one step
    max_batch: int = 64              # most jobs in one step
    pp_steps: int = 0                # steps of a pp model in flight at once, each in its own
                                     # stage (0: as many as it has stages; 1: one at a time)
    restart_max: int = 5             # restart budget: this many restarts ...
    restart_window: float = 60.0     # ... within this many seconds
    boot_timeout: float = 600.0
    tls_cert: str = ""               # PEM certificate and key: serve the Kernel over TLS
    tls_key: str = ""
    insecure: bool = False           # allow plain text on a non-loopback address

# Environment variables that override the file (flags override both).
ENV = {"listen": "LLMASOS_ADDR", "home": "LLMASOS_HOME", "policy": "LLMASOS_POLICY",
       "device": "LLMASOS_DEVICE", "kv_budget_mb": "LLMASOS_KV_BUDGET_MB",
       "quant": "LLMASOS_QUANT", "pp_steps": "LLMASOS_PP_STEPS"}


def _coerce(cfg: Config, name: str, value: object) -> None:
    kind = type(getattr(cfg, name))
    if kind is bool and isinstance(value, str):
        value = value.lower() in ("1", "true", "yes", "on")
    setattr(cfg, name, kind(value))


def load(args: argparse.Namespace) -> Config:
    cfg = Config()
    path = getattr(args, "config", None) or str(Path(default_home()) / "llmosd.toml")
    if os.path.exists(path):
        with open(path, "rb") as f:
            for key, value in tomllib.load(f).items():
                if key not in {f.name for f in fields(Config)}:
                    raise SystemExit(f"{path}: unknown setting {key!r}")
                _coerce(cfg, key, value)
    for name, var in ENV.items():
        if os.environ.get(var):
            _coerce(cfg, name, os.environ[var])
    for f in fields(Config):
        value = getattr(args, f.name, None)
        if value is not None:
            _coerce(cfg, f.name, value)
    cfg.home = cfg.home or default_home()
    return cfg
