"""StepBatch: everything one forward pass needs besides the token ids, built once per step from
the sequences' slices (decode tokens first, so their attention needs no scatter)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmasos.drivers.model.attention import PagedGroup, build_group


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of a step: new tokens starting at start_pos."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class KernelGroup:
    """One group's arguments in the form of the Triton kernels (drivers/cuda/): its rows are
    the contiguous flat rows first_row .. first_row + num_rows - 1."""

    decode: bool
    first_row: int
    num_rows: int
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32, the new tokens included
    cu_seqlens_q: torch.Tensor  # [S + 1] int32, relative to first_row


@dataclass(frozen=True)
class Layout:
    """build_batch's own arguments, kept so a part of the batch can be rebuilt on its own
    (pipeline micro-batches, drivers/parallel/micro.py)."""

    slices: list[SeqSlice]
    block_size: int
    gqa: int
    for_kernels: bool
    split_groups: bool = False
    one_decode_group: bool = False


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T] int64, in flat (decode-first) order
    order: list[int]  # order[r] = index into the caller's slices of flat row block r
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    groups: list[PagedGroup]  # decode tokens, then chunks (or one group per shape: split_groups)
    sample_rows: torch.Tensor  # [R] flat rows whose logits are returned
    sample_seqs: list[int]  # caller's slice index of each sampled row
    kernel_groups: list[KernelGroup] | None = None  # set when built for the Triton kernels
    layout: Layout | None = None  # what it was built from


def kernel_group(slices: list[SeqSlice], members: list[int], first_row: int,
                 device: torch.device | str) -> KernelGroup:
    width = max(len(slices[i].block_table) for i in members)
    tables = [slices[i].block_table + [0] * (width - len(slices[i].block_table))
              for i in members]
    lens = [slices[i].start_pos + slices[i].num_tokens for i in members]
    cu = [0]
    for i in members:
        cu.append(cu[-1] + slices[i].num_tokens)
    as_i32 = {"dtype": torch.int32, "device": device}
    return KernelGroup(decode=cu[-1] == len(members), first_row=first_row, num_rows=cu[-1],
                       block_tables=torch.tensor(tables, **as_i32),
                       seq_lens=torch.tensor(lens, **as_i32),
                       cu_seqlens_q=torch.tensor(cu, **as_i32))


def context_blocks(s: SeqSlice, block_size: int) -> int:
    return -(-(s.start_pos + s.num_tokens) // block_size)


def build_batch(slices: list[SeqSlice], block_size: int, gqa: int,
                device: torch.device | str = "cpu", for_kernels: bool = False,
                split_groups: bool = False, one_decode_group: bool = False) -> StepBatch:
    """Lay the slices out as one flat batch: decode (1-token) slices first, then chunks.
    split_groups: one attention group per shape (decode rows by context length in blocks,
    chunks by their length and context length), sorted by it, so no sequence's queries or keys
    are padded to another's (attention.padding_exact says when that matters).
    one_decode_group: the decode rows stay one group even so, for an attention that reads each
    sequence's own context unpadded (drivers/cpu/paged_decode.py)."""
    decode = [i for i, s in enumerate(slices) if s.num_tokens == 1]
    chunks = [i for i, s in enumerate(slices) if s.num_tokens > 1]
    groups_of = [decode, chunks]
    if split_groups:
        def shape(i: int) -> tuple[int, int]:
            return slices[i].num_tokens, context_blocks(slices[i], block_size)

        def by_shape(members: list[int]) -> list[list[int]]:
            keys = sorted(set(map(shape, members)))
            return [[i for i in members if shape(i) == key] for key in keys]

        decode.sort(key=shape)
        chunks.sort(key=shape)
        groups_of = ([decode] if one_decode_group else by_shape(decode)) + by_shape(chunks)
    order = decode + chunks
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts: dict[int, int] = {}
    for i in order:
        s = slices[i]
        starts[i] = len(positions)
        ids.extend(s.token_ids)
        for p in range(s.start_pos, s.start_pos + s.num_tokens):
            if p // block_size >= len(s.block_table):
                raise ValueError(f"block table of {len(s.block_table)} blocks does not cover "
                                 f"position {p}")
            positions.append(p)
            slots.append(s.block_table[p // block_size] * block_size + p % block_size)
    groups, kernel_groups = [], []
    for members in (decode, chunks) if for_kernels else groups_of:
        if members and for_kernels:
            kernel_groups.append(kernel_group(slices, members, starts[members[0]], device))
        elif members:
            groups.append(build_group(
                [starts[i] for i in members], [slices[i].num_tokens for i in members],
                [slices[i].start_pos + slices[i].num_tokens for i in members],
                [slices[i].block_table for i in members], block_size, gqa, device))
    sample_seqs = [i for i in order if slices[i].sample]
    rows = [starts[i] + slices[i].num_tokens - 1 for i in sample_seqs]
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        order=order,
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        groups=groups,
        sample_rows=torch.tensor(rows, dtype=torch.int64, device=device),
        sample_seqs=sample_seqs,
        kernel_groups=kernel_groups if for_kernels else None,
        layout=Layout(slices, block_size, gqa, for_kernels, split_groups, one_decode_group),
    )
