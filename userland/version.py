"""The installed version, for every command's --version."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        return metadata.version("llmasos")
    except metadata.PackageNotFoundError:
        return "unknown"


def version_string(prog: str) -> str:
    return f"{prog} (llmasos) {version()}"
