"""The .proto files compile where they stand, as any language's protoc sees them: imports
resolve with `-I proto` alone, and Go and Java packages are named."""

from __future__ import annotations

from pathlib import Path

from grpc_tools import protoc

from llmasos.proto import generate


def test_protos_compile_with_plain_include(tmp_path: Path) -> None:
    files = [p.name for p in generate.proto_files()]
    out = tmp_path / "set.pb"
    args = ["protoc", f"-I{generate.HERE}", f"--descriptor_set_out={out}", *files]
    assert protoc.main(args) == 0
    assert out.stat().st_size > 0


def test_every_proto_names_its_go_and_java_package() -> None:
    for proto in generate.proto_files():
        text = proto.read_text()
        assert "option go_package" in text and "option java_package" in text, proto.name
        assert "llmasos/proto/" not in text, f"{proto.name}: import by bare name"
