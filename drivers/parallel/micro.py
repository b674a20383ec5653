"""Pipeline micro-batches (GPipe): one step's sequences cut into k contiguous runs of the flat
batch, whole sequences only, so each part is a batch of its own (its attention groups, slots
and sampled rows). Stage s computes part i+1 while stage s+1 computes part i. Every rank cuts
the broadcast batch the same way: the cut depends on nothing but the batch."""

from __future__ import annotations

from llmasos.drivers.model.batch import StepBatch, build_batch


def micro_count(batch: StepBatch, stages: int) -> int:
    """One part per stage when there are enough sequences, else the step runs whole."""
    return stages if len(batch.order) >= stages else 1


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


def micro_batches(batch: StepBatch, stages: int) -> list[StepBatch]:
    """The step's parts in flat order: their sampled rows, concatenated, are batch's."""
    k = micro_count(batch, stages)
    if k == 1 or batch.layout is None:
        return [batch]
    lay = batch.layout
    seqs = [lay.slices[i] for i in batch.order]   # flat (decode-first) order
    edges = [0, *cut([s.num_tokens for s in seqs], k), len(seqs)]
    device = batch.input_ids.device
    return [build_batch(seqs[a:b], lay.block_size, lay.gqa, device, lay.for_kernels)
            for a, b in zip(edges[:-1], edges[1:], strict=True)]
