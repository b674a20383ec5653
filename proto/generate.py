"""Regenerate the Python stubs from the .proto files (`make proto`).

protoc derives the generated imports from the .proto paths, so the files are compiled as
`llmasos/proto/<name>.proto` through a temporary tree whose llmasos/proto points here:
the stubs then import each other as `llmasos.proto.<name>_pb2`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def proto_files(root: Path = HERE) -> list[Path]:
    return sorted(root.glob("*.proto"))


def generate(out_dir: Path, src_dir: Path = HERE) -> None:
    """Write the *_pb2.py and *_pb2_grpc.py stubs of src_dir's protos into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        include = Path(tmp) / "in"
        (include / "llmasos").mkdir(parents=True)
        (include / "llmasos" / "proto").symlink_to(src_dir)
        gen = Path(tmp) / "out"
        gen.mkdir()
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{include}",
            f"-I{well_known}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
        ] + [f"llmasos/proto/{p.name}" for p in proto_files(src_dir)]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the message above")
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted((gen / "llmasos" / "proto").glob("*_pb2*.py")):
            (out_dir / f.name).write_text(f.read_text())


def main() -> int:
    generate(HERE)
    print(f"generated stubs for {len(proto_files())} proto files in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
