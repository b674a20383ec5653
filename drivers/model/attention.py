"""Paged attention on the CPU (PyTorch): K/V live in a pool of fixed-size blocks and each sequence
reads its context through a block table.

One layer's view of the pool is k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim];
slot = block * block_size + offset. The three public functions below have the exact signatures
of the CUDA kernels in drivers/cuda/. Internally every call goes through one batched SDPA over a
PagedGroup: the group's queries padded to [S, max_q], its blocks gathered to [S, max_k] with a
mask. The model builds the groups once per step and reuses them in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, cached_property

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SdpaIndex:
    """The padded layout SDPA reads a group through (the native decode kernel needs none)."""

    token_rows: torch.Tensor  # [n] rows of the flat batch that belong to this group, in order
    query_rows: torch.Tensor  # [S * max_q] row of the flat batch for each padded query (pad: 0)
    padded_pos: torch.Tensor  # [n] index of each token_rows entry in the padded [S * max_q]
    mask: torch.Tensor  # [S, 1, gqa * max_q, nb * block_size] bool, True = attend; GQA folded
    q_pos: torch.Tensor  # [S, 1, gqa * max_q, 1] position of each padded query


@dataclass
class PagedGroup:
    """Index tensors for one batched attention call over S sequences (built once per step).
    What only SDPA reads (the padded layout and its mask) is built on first use: a decode step
    on the native kernel never pays for it."""

    token_starts: list[int]  # sequence s owns flat rows token_starts[s] .. + q_lens[s]
    q_lens: list[int]
    context_lens: list[int]  # each sequence's context, new tokens included
    block_size: int
    gqa: int
    device: torch.device | str
    kv_blocks: torch.Tensor  # [S, nb] the blocks holding each sequence's context (pad: 0)
    num_seqs: int
    max_q: int
    identity: bool  # query_rows == token_rows: no padding, no scatter (decode-only groups)
    first_row: int  # token_rows[0]
    seq_lens: torch.Tensor  # [S] int64: context_lens as a tensor
    max_len: int  # the longest of seq_lens
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # built on first use
    biases: dict[tuple[int, torch.dtype], torch.Tensor] = field(default_factory=dict)  # likewise

    @cached_property
    def sdpa(self) -> SdpaIndex:
        return sdpa_index(self)

    @property
    def token_rows(self) -> torch.Tensor:
        return self.sdpa.token_rows

    @property
    def query_rows(self) -> torch.Tensor:
        return self.sdpa.query_rows

    @property
    def padded_pos(self) -> torch.Tensor:
        return self.sdpa.padded_pos

    @property
    def mask(self) -> torch.Tensor:
        return self.sdpa.mask

    @property
    def q_pos(self) -> torch.Tensor:
        return self.sdpa.q_pos

    def window_mask(self, window: int) -> torch.Tensor:
        """mask, keeping only keys within `window` positions of the query (HF: q - k < window)."""
        if window not in self.window_masks:
            pos_k = torch.arange(self.mask.shape[-1], device=self.mask.device)
            self.window_masks[window] = self.mask & (pos_k > self.q_pos - window)
        return self.window_masks[window]

    def bias(self, window: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask as SDPA's additive form (0 or -inf), made once per step, not once per layer
        (SDPA converts a bool mask with the same torch.where on every call)."""
        key = (window, dtype)
        if key not in self.biases:
            mask = self.window_mask(window) if window else self.mask
            self.biases[key] = torch.zeros(mask.shape, dtype=dtype, device=mask.device
                                           ).masked_fill_(~mask, float("-inf"))
        return self.biases[key]


def build_group(token_starts: list[int], q_lens: list[int], seq_lens: list[int],
                block_tables: list[list[int]], block_size: int, gqa: int,
                device: torch.device | str = "cpu") -> PagedGroup:
    """Sequence s owns flat rows token_starts[s] .. + q_lens[s]; its context is seq_lens[s] tokens
    (the new ones included) at the slots of block_tables[s]. Query i of s sits at position
    seq_lens[s] - q_lens[s] + i and attends causally to positions <= its own."""
    max_q = max(q_lens)
    nb = -(-max(seq_lens) // block_size)
    table = torch.tensor([bt[:nb] + [0] * (nb - len(bt[:nb])) for bt in block_tables],
                         dtype=torch.int64)
    first = int(token_starts[0])
    identity = max_q == 1 and all(t == first + i for i, t in enumerate(token_starts))
    return PagedGroup(
        token_starts=list(token_starts), q_lens=list(q_lens), context_lens=list(seq_lens),
        block_size=block_size, gqa=gqa, device=device, kv_blocks=table.to(device),
        num_seqs=len(q_lens), max_q=max_q, identity=identity, first_row=first,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64).to(device), max_len=max(seq_lens))


def sdpa_index(g: PagedGroup) -> SdpaIndex:
    """The group's queries padded to [S, max_q] and its keys to whole blocks, with the causal
    mask over them."""
    num_seqs, max_q, gqa = g.num_seqs, g.max_q, g.gqa
    q_len_t = torch.tensor(g.q_lens, dtype=torch.int64)
    seq_len_t = torch.tensor(g.context_lens, dtype=torch.int64)
    start_t = torch.tensor(g.token_starts, dtype=torch.int64)
    max_k = g.kv_blocks.shape[1] * g.block_size
    pos_k = torch.arange(max_k)

    i = torch.arange(max_q)
    real = i[None] < q_len_t[:, None]  # [S, max_q]
    q_pos = torch.where(real, (seq_len_t - q_len_t)[:, None] + i[None], 0)  # pad rows see key 0
    mask = pos_k[None, None] <= q_pos[:, :, None]  # [S, max_q, max_k]
    mask = mask[:, None, None].expand(num_seqs, 1, gqa, max_q, max_k)
    mask = mask.reshape(num_seqs, 1, gqa * max_q, max_k)

    q_pos_folded = q_pos[:, None, None, :, None].expand(num_seqs, 1, gqa, max_q, 1).reshape(
        num_seqs, 1, gqa * max_q, 1)
    rows = torch.where(real, start_t[:, None] + i[None], 0)
    flat_real = real.reshape(-1)
    token_rows = rows.reshape(-1)[flat_real]
    padded_pos = torch.arange(num_seqs * max_q)[flat_real]
    return SdpaIndex(token_rows=token_rows.to(g.device), query_rows=rows.reshape(-1).to(g.device),
                     padded_pos=padded_pos.to(g.device), mask=mask.to(g.device),
                     q_pos=q_pos_folded.to(g.device))


def group_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    group: PagedGroup, scale: float, window: int = 0,
                    softcap: float = 0.0) -> torch.Tensor:
    """q: [T, Hq, D] (the whole flat batch); returns [n, Hq, D] for group.token_rows.
    window > 0: a sliding-window layer; softcap > 0: scores = c * tanh(scores / c) (Gemma 2)."""
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    num_heads = q.shape[1]
    gqa = num_heads // kv_heads
    s, mq = group.num_seqs, group.max_q
    # whole blocks (12 KiB each for SmolLM2) copy much faster than single slots
    blocks = group.kv_blocks.view(-1)
    k = k_cache.index_select(0, blocks).view(s, -1, kv_heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, blocks).view(s, -1, kv_heads, head_dim).transpose(1, 2)
    if k.dtype != q.dtype:   # a pool narrower than the model (fp16 KV): widened once gathered
        k, v = k.to(q.dtype), v.to(q.dtype)
    first = group.first_row
    qp = q[first:first + s] if group.identity else q[group.query_rows]
    # [S*mq, Hq, D] -> [S, Hkv, gqa*mq, D]: the query heads of one KV head become extra rows
    # (head h reads KV head h // gqa); with one query each that is a view, no permute
    if mq == 1:
        qp = qp.view(s, kv_heads, gqa, head_dim)
    else:
        qp = qp.view(s, mq, kv_heads, gqa, head_dim).permute(0, 2, 3, 1, 4)
        qp = qp.reshape(s, kv_heads, gqa * mq, head_dim)
    if softcap:  # SDPA cannot cap the scores: the same computation spelled out
        mask = group.window_mask(window) if window else group.mask
        scores = torch.tanh(qp @ k.transpose(-1, -2) * (scale / softcap)) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
    else:
        out = F.scaled_dot_product_attention(qp, k, v, attn_mask=group.bias(window, qp.dtype),
                                             scale=scale)
    if mq == 1:
        return out.reshape(s, num_heads, head_dim)   # one query per sequence: never padded
    out = out.view(s, kv_heads, gqa, mq, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(s * mq, num_heads, head_dim)
    return out if group.identity else out[group.padded_pos]


@cache
def padding_exact(gqa: int, head_dim: int, dtype: torch.dtype = torch.float32,
                  block_size: int = 16, longest: int = 512) -> bool:
    """Whether SDPA gives a query the same bits when its keys are padded (masked) to a longer
    length. A group pads every sequence's keys (and a chunk's queries) to the group's longest,
    so where this is false a sequence's attention would depend on its batch: build_batch then
    gives each shape a group of its own. Measured once per process and shape; on a 2-core
    AVX-512 Xeon it is false: MKL's GEMM inside SDPA sums a row's keys in an order that depends
    on their count, from 272 keys up (up to 1.6e-7 apart), and at every length with
    MKL_ENABLE_INSTRUCTIONS=AVX2 (up to 1.2e-7 apart, padded to 512)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, head_dim, generator=g).to(dtype)
               for n in (gqa, longest, longest))
    for n in range(block_size, longest, block_size):
        alone = F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n],
                                               attn_mask=torch.zeros(1, 1, gqa, n, dtype=dtype))
        bias = torch.zeros(1, 1, gqa, longest, dtype=dtype)
        bias[..., n:] = float("-inf")
        if not torch.equal(alone, F.scaled_dot_product_attention(q, k, v, attn_mask=bias)):
            return False
    return True


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, Hkv, D] at the pool slots slot_mapping [T] (int64)."""
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if k.dtype != k_cache.dtype:   # a no-op .to() still costs a dispatch, twice per layer
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query per sequence: q [B, Hq, D] -> [B, Hq, D]; seq_lens include the new token."""
    lens = seq_lens.tolist()
    tables = [row[: -(-n // k_cache.shape[1])] for row, n in zip(block_tables.tolist(), lens,
                                                                  strict=True)]
    group = build_group(list(range(len(lens))), [1] * len(lens), lens, tables,
                        k_cache.shape[1], q.shape[1] // k_cache.shape[2], q.device)
    return group_attention(q, k_cache, v_cache, group, scale)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Chunks of S sequences: q [T, Hq, D] -> [T, Hq, D]. The chunks' K/V are already written;
    query i of sequence s sits at position seq_lens[s] - q_len_s + i."""
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    q_lens = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    tables = [row[: -(-n // k_cache.shape[1])] for row, n in zip(block_tables.tolist(), lens,
                                                                  strict=True)]
    group = build_group(cu[:-1], q_lens, lens, tables, k_cache.shape[1],
                        q.shape[1] // k_cache.shape[2], q.device)
    out = torch.empty_like(q)
    out[group.token_rows] = group_attention(q, k_cache, v_cache, group, scale)
    return out
