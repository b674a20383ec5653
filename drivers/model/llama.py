"""The Llama family (Llama 2/3, SmolLM, Mistral, Qwen2) over the paged KV pool, gpt-fast style:
plain tensors, one function per block, no Python loop over sequences inside a layer."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmasos.drivers.cuda.backend import Kernels, kernels_for
from llmasos.drivers.cuda.quant import QuantWeight, dequantize
from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.model.attention import group_attention, write_kv
from llmasos.drivers.model.batch import StepBatch
from llmasos.drivers.model.kv_pool import KVPool

Weight = torch.Tensor | QuantWeight  # QuantWeight only where the Triton kernels run


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Weight  # [(Hq + 2 Hkv) * D, hidden]: Q, K, V projections fused into one matmul
    qkv_bias: torch.Tensor | None
    o: Weight
    mlp_norm: torch.Tensor
    gate_up: Weight  # [2 * intermediate, hidden]: gate and up fused
    down: Weight


def cat_rows(ws: list[Weight]) -> Weight:
    """Fuse projections by stacking their rows; GGUF blocks of one format stack as they are."""
    if all(isinstance(w, QuantWeight) for w in ws) and len({w.fmt for w in ws}) == 1:
        return QuantWeight(ws[0].fmt, sum(w.out_features for w in ws), ws[0].in_features,
                           torch.cat([w.qweight for w in ws]))
    return torch.cat([dequantize(w) if isinstance(w, QuantWeight) else w for w in ws])


def weight_numel(w: Weight) -> int:
    return w.numel() if isinstance(w, torch.Tensor) else w.out_features * w.in_features


def weight_bytes(w: Weight) -> int:
    if isinstance(w, QuantWeight):
        return sum(t.nbytes for t in (w.qweight, w.scale, w.offset) if t is not None)
    return w.nbytes


def rope_inv_freq(cfg: ModelConfig, rope_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] with the config's scaling applied (HF semantics)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(
            scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    elif kind not in ("default", "none"):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    if rope_freqs is not None:  # GGUF llama3 files carry the divisors as a tensor instead
        inv = inv / rope_freqs.float()
    return inv


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """x @ w.T through MKL. For up to 64 rows, computed as (w @ x.T).T: MKL picks much better
    kernels for that orientation here (the LM head with 4 rows: ~2.7 ms vs ~13 ms), and a single
    row is doubled because MKL's GEMV runs on one thread (decode at batch 1: ~21 ms vs ~35 ms
    per step on the 2-core machines)."""
    rows = x.shape[0]
    if x.device.type != "cpu" or rows > SMALL_ROWS:
        return F.linear(x, w, bias)
    xs = x.repeat(2, 1) if rows == 1 else x
    out = torch.mm(w, xs.t())[:, :rows].t().contiguous()
    return out if bias is None else out + bias


def onednn_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x @ w.T through oneDNN, which uses AVX-512 on AMD CPUs where MKL stays on AVX2."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def onednn_is_faster(w: torch.Tensor, rows: tuple[int, ...] = (8, 128), reps: int = 3) -> bool:
    """Probe once at load: is oneDNN faster than MKL for this weight at a few row counts?"""
    if w.device.type != "cpu" or w.dtype != torch.float32 or not hasattr(
            torch.ops.mkldnn, "_linear_pointwise") or not torch.backends.mkldnn.is_available():
        return False
    try:
        for n in rows:
            x = torch.randn(n, w.shape[1])
            best = {}
            for name, fn in (("mkl", dense_linear), ("onednn", onednn_linear)):
                fn(x, w)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn(x, w)
                    times.append(time.perf_counter() - t0)
                best[name] = min(times)
            if best["onednn"] >= best["mkl"]:
                return False
    except RuntimeError:  # a build without the op's CPU kernel
        return False
    return True


SMALL_ROWS = 64


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [T, H, D] with cos, sin [T, 1, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        # Triton attention and quantized matmuls on CUDA (and on CPU under TRITON_INTERPRET=1);
        # otherwise the PyTorch path, with any quantized weight dequantized here
        self.kernels: Kernels | None = kernels_for(self.device)

        def w(name: str) -> Weight:
            t = weights[name]
            if isinstance(t, QuantWeight) and self.kernels is not None:
                return t.to(self.device)
            t = dequantize(t) if isinstance(t, QuantWeight) else t
            return t.to(device=self.device, dtype=dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")   # never quantized: a table lookup
        self.norm = w("model.norm.weight")
        head = weights.get("lm_head.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings or head is None else w(
            "lm_head.weight")
        self.layers = [self._layer(weights, i, w) for i in range(cfg.num_layers)]
        freqs = weights.get("model.rope_freqs")
        self.inv_freq = rope_inv_freq(cfg, freqs).to(self.device)
        self.scale = cfg.head_dim ** -0.5
        # oneDNN or MKL for multi-row matmuls: whichever is faster on this CPU (AVX-512 or not)
        gate_up = self.layers[0].gate_up
        self.onednn = isinstance(gate_up, torch.Tensor) and onednn_is_faster(gate_up)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim

    def _layer(self, weights: dict[str, torch.Tensor], i: int, w: object) -> Layer:
        p = f"model.layers.{i}."
        a = p + "self_attn."
        bias = None
        if self.cfg.attention_bias:
            bias = torch.cat([w(a + f"{x}_proj.bias") for x in "qkv"])
        return Layer(
            attn_norm=w(p + "input_layernorm.weight"),
            qkv=cat_rows([w(a + f"{x}_proj.weight") for x in "qkv"]),
            qkv_bias=bias,
            o=w(a + "o_proj.weight"),
            mlp_norm=w(p + "post_attention_layernorm.weight"),
            gate_up=cat_rows([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]),
            down=w(p + "mlp.down_proj.weight"),
        )

    def _weights(self) -> list[Weight]:
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            tensors += [layer.attn_norm, layer.qkv, layer.o, layer.mlp_norm, layer.gate_up,
                        layer.down] + ([layer.qkv_bias] if layer.qkv_bias is not None else [])
        return tensors

    @property
    def num_parameters(self) -> int:
        return sum(weight_numel(t) for t in self._weights())

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights take on the device (quantized ones in their packed form)."""
        return sum(weight_bytes(t) for t in self._weights())

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.cfg.rms_norm_eps)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, pool: KVPool) -> torch.Tensor:
        """Run the flat batch, writing its K/V into the pool; logits [R, vocab] (fp32) for
        batch.sample_rows."""
        cfg = self.cfg
        t = batch.input_ids.shape[0]
        freqs = batch.positions[:, None].float() * self.inv_freq[None]
        cos, sin = freqs.cos()[:, None].to(self.dtype), freqs.sin()[:, None].to(self.dtype)
        x = F.embedding(batch.input_ids, self.embed)
        qk_heads = cfg.num_heads + cfg.num_kv_heads
        for i, layer in enumerate(self.layers):
            h = self.rms_norm(x, layer.attn_norm)
            qkv = self.linear(h, layer.qkv, layer.qkv_bias)
            qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(t, qk_heads, cfg.head_dim),
                            cos, sin)
            q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads:]
            v = qkv[:, self.q_size + self.kv_size:].view(t, cfg.num_kv_heads, cfg.head_dim)
            k_cache, v_cache = pool.layer(i)
            (self.kernels.write_kv if self.kernels else write_kv)(
                k_cache, v_cache, k, v, batch.slot_mapping)
            x = x + self.linear(self.attention(q, k_cache, v_cache, batch).reshape(t, -1),
                                layer.o)
            h = self.rms_norm(x, layer.mlp_norm)
            gate, up = self.gate_up(h, layer.gate_up)
            x = x + self.linear(F.silu(gate) * up, layer.down)
        return self.logits(self.rms_norm(x[batch.sample_rows], self.norm))

    def linear(self, x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        if not isinstance(w, torch.Tensor | QuantWeight):  # packed (drivers/quant): own kernel
            return w.matmul(x, bias)
        if isinstance(w, QuantWeight):   # the GGUF blocks, read as they are by a Triton kernel
            y = self.kernels.linear(x, w)
            return y if bias is None else y + bias
        if self.onednn and x.shape[0] > 1:
            return onednn_linear(x, w, bias)
        return dense_linear(x, w, bias)

    def gate_up(self, h: torch.Tensor, w: Weight) -> tuple[torch.Tensor, torch.Tensor]:
        """One fused matmul; with MKL and many rows two GEMMs over the halves (contiguous row
        slices of w) are ~5% faster."""
        if self.onednn or h.shape[0] <= SMALL_ROWS or not isinstance(w, torch.Tensor):
            gate, up = self.linear(h, w).chunk(2, dim=-1)
            return gate, up
        half = self.cfg.intermediate_size
        return F.linear(h, w[:half]), F.linear(h, w[half:])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h, self.lm_head).float()

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  batch: StepBatch) -> torch.Tensor:
        if batch.kernel_groups is not None:
            return self.kernel_attention(q, k_cache, v_cache, batch)
        if len(batch.groups) == 1:  # one group covers rows 0..T-1 in order: no scatter
            return group_attention(q, k_cache, v_cache, batch.groups[0], self.scale)
        out = torch.empty_like(q)
        for group in batch.groups:
            out[group.token_rows] = group_attention(q, k_cache, v_cache, group, self.scale)
        return out

    def kernel_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         batch: StepBatch) -> torch.Tensor:
        """The Triton kernels: split-KV decode for the 1-token rows, flash prefill for chunks."""
        out = torch.empty_like(q)
        for g in batch.kernel_groups:
            rows = slice(g.first_row, g.first_row + g.num_rows)
            if g.decode:
                out[rows] = self.kernels.decode_attention(
                    q[rows].contiguous(), k_cache, v_cache, g.block_tables, g.seq_lens,
                    self.scale)
            else:
                out[rows] = self.kernels.prefill_attention(
                    q[rows].contiguous(), k_cache, v_cache, g.block_tables, g.cu_seqlens_q,
                    g.seq_lens, self.scale)
        return out
