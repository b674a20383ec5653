"""llmosd's console entry point: answers --version, and names the missing extra on a
client-only install (`pip install llmasos`), before importing the daemon's dependencies."""

from __future__ import annotations

import sys

from llmasos.version import version_string


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print(version_string("llmosd"))
        return 0
    try:
        from llmasos.kernel import main as daemon
    except ModuleNotFoundError as e:
        print(f"llmosd: the daemon needs the server's dependencies ({e.name} is missing); "
              "install them with: pip install 'llmasos[server]'", file=sys.stderr)
        return 1
    return daemon.main(argv)


if __name__ == "__main__":
    sys.exit(main())
