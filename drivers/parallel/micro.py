"""Pipeline micro-batches (GPipe): one step's sequences cut into k contiguous runs of the flat
batch, whole sequences only, so each part is a batch of its own (its attention groups, slots
and sampled rows). Stage s computes part i+1 while stage s+1 computes part i. Rank 0 picks
the number of parts and broadcasts it with the batch; every rank then cuts the batch the same
way: the cut depends on nothing but the two."""

from __future__ import annotations

from llmasos.drivers.model.batch import StepBatch, build_batch

MIN_PART_ROWS = 128   # below this a part costs about what the whole batch does (see README)


def micro_count(batch: StepBatch, stages: int, min_rows: int = MIN_PART_ROWS) -> int:
    """One part per stage when there are enough sequences and every part keeps min_rows rows
    on average; else the step runs whole. Small parts do not pay: a decode row costs little
    beside reading the stage's weights, which every part does again."""
    rows = batch.input_ids.shape[0]
    return max(1, min(stages, len(batch.order), rows // max(1, min_rows)))


def cut(rows: list[int], k: int) -> list[int]:
    """Where to cut sequences of these row counts into k non-empty runs of about equal rows:
    the k-1 boundaries (sequence counts)."""
    total, n = sum(rows), len(rows)
    bounds, seen, prev = [], 0, 0
    for j in range(1, k):
        b, seen = prev, sum(rows[:prev])
        while b < n and seen < total * j / k:   # the first boundary reaching j/k of the rows
            seen += rows[b]
            b += 1
        prev = min(max(b, prev + 1), n - (k - j))   # every run keeps at least one sequence
        bounds.append(prev)
    return bounds


def micro_batches(batch: StepBatch, k: int) -> list[StepBatch]:
    """The step cut into k parts, in flat order: their sampled rows, concatenated, are
    batch's."""
    if k == 1:
        return [batch]
    if batch.layout is None or k > len(batch.order):
        raise ValueError(f"cannot cut a batch of {len(batch.order)} sequences into {k} parts "
                         "(build it with build_batch, which records its layout)")
    lay = batch.layout
    seqs = [lay.slices[i] for i in batch.order]   # flat (decode-first) order
    edges = [0, *cut([s.num_tokens for s in seqs], k), len(seqs)]
    device = batch.input_ids.device
    return [build_batch(seqs[a:b], lay.block_size, lay.gqa, device, lay.for_kernels,
                        lay.split_groups, lay.one_decode_group)
            for a, b in zip(edges[:-1], edges[1:], strict=True)]
