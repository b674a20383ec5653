"""Read a safetensors file as one private mapping of it, every tensor a view of the mapping.

A restarted inference service finds the weights cache in the page cache; mapping it costs one
pass of the kernel (no read into Python, no per-tensor copy, no torch.cat of fused weights). The
mapping is populated when made, by reading a byte of every page in a torch op (which releases
the GIL), so the first step does not stop on page faults. Not MAP_POPULATE: Python's mmap()
holds the GIL in the syscall, and on a private writable mapping the kernel then copies every
page, seconds on a loaded host during which the service answered no health check and was killed
as hung. Read faults share the page cache's pages (replicas of one model share them too);
private means copy-on-write: a tensor written in place never changes the file, which the cache
only ever replaces whole (os.replace), never rewrites under a mapping.

The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length, a
JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the
data, offsets counted from the end of the header."""

from __future__ import annotations

import json
import mmap
import os
import struct

import torch

ALIGN = 64   # bytes: where each tensor's data starts, so that a mapped weight is as fast as an
             # allocated one (MKL's GEMM ran ~1.4x slower on rows 8-byte aligned only)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


CODES = {dtype: code for code, dtype in DTYPES.items()}


def save_aligned(tensors: dict[str, torch.Tensor], file: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file whose data starts at a multiple of ALIGN (the header is padded
    with spaces, as the format allows); with every tensor's size a multiple of ALIGN, as a
    model's are, every tensor starts aligned too. Readable by safetensors itself."""
    entries, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)
    with open(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(struct.pack("<Q", len(header)))   # 0600, as safetensors' own writer makes it
        f.write(header)
        for t in tensors.values():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def read_header(file: str) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensors' entries, metadata, offset of the data) of a safetensors file."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    meta = header.pop("__metadata__", None) or {}
    return header, meta, 8 + length


def map_file(file: str) -> torch.Tensor:
    """The whole file as a uint8 tensor over a private, populated, writable (copy-on-write)
    mapping; the tensor keeps the mapping alive."""
    with open(file, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    raw[::mmap.PAGESIZE].sum()   # one read per page: faults them in, the GIL released
    return raw


def map_safetensors(file: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> tensor viewing the mapped file, metadata); raises ValueError on a dtype we do
    not know or an entry that points outside the file."""
    header, meta, start = read_header(file)
    raw = map_file(file)
    size = raw.numel()
    tensors = {}
    for name, entry in header.items():
        begin, end = (start + o for o in entry["data_offsets"])
        if entry["dtype"] not in DTYPES or not start <= begin <= end <= size:
            raise ValueError(f"{file}: tensor {name} has dtype {entry['dtype']} or offsets "
                             f"{entry['data_offsets']} we cannot map")
        tensors[name] = raw[begin:end].view(DTYPES[entry["dtype"]]).view(entry["shape"])
    return tensors, meta
