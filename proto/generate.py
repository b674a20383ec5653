"""Regenerate the Python stubs from the .proto files (`make proto`).

The .proto files import each other by bare name (`import "common.proto"`), so any language's
protoc compiles them where they stand with `protoc -I proto`. protoc's Python output then
imports its siblings as top-level modules (`import common_pb2`); those lines are rewritten to
`from llmasos.proto import common_pb2`, so the stubs live inside llmasos.proto only.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIBLING = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def proto_files(root: Path = HERE) -> list[Path]:
    return sorted(root.glob("*.proto"))


def package_imports(source: str) -> str:
    return SIBLING.sub(r"from llmasos.proto import \1 as \2", source)


def generate(out_dir: Path, src_dir: Path = HERE) -> None:
    """Write the *_pb2.py and *_pb2_grpc.py stubs of src_dir's protos into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        gen = Path(tmp)
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = ["protoc", f"-I{src_dir}", f"-I{well_known}", f"--python_out={gen}",
                f"--grpc_python_out={gen}"] + [p.name for p in proto_files(src_dir)]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the message above")
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(gen.glob("*_pb2*.py")):
            (out_dir / f.name).write_text(package_imports(f.read_text()))


def main() -> int:
    generate(HERE)
    print(f"generated stubs for {len(proto_files())} proto files in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
