"""The committed stubs must be exactly what `make proto` generates from the .proto files."""

from __future__ import annotations

from pathlib import Path

from llmasos.proto import generate

PROTO = Path(generate.__file__).parent


def test_generated_stubs_match_proto_files(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*_pb2*.py")}
    committed = {p.name: p.read_text() for p in PROTO.glob("*_pb2*.py")}
    assert set(fresh) == set(committed), "stub files differ; run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stubs out of date: {stale}; run `make proto` and commit"


def test_every_proto_file_has_stubs() -> None:
    for proto in generate.proto_files():
        assert (PROTO / f"{proto.stem}_pb2.py").exists(), proto
