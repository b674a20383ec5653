"""The decoder over the paged KV pool, gpt-fast style: plain tensors, one function per block, no
Python loop over sequences inside a layer. Llama is the base; every other family (Mistral, Qwen2/3,
Phi-3, Gemma 2/3, GPT-2, GPT-NeoX, GPT-J) is a row of drivers/model/families.py that switches a
few steps on or off, and drivers/model/weights.py renames its checkpoint into Llama's names."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmasos.drivers.cpu.decode_layers import DecodeLayers
from llmasos.drivers.cpu.packed_linear import packed_bytes
from llmasos.drivers.cpu.paged_decode import PagedDecode, decode_kernel
from llmasos.drivers.cpu.rms_norm import add_rms_norm, rms_norm
from llmasos.drivers.cpu.rope_kv import rope_kv
from llmasos.drivers.cuda.backend import Kernels, kernels_for
from llmasos.drivers.cuda.quant import QuantWeight, dequantize
from llmasos.drivers.loaders.config import ModelConfig
from llmasos.drivers.loaders.progress import Report, tracked
from llmasos.drivers.model import probe_cache
from llmasos.drivers.model.attention import (
    PagedGroup,
    group_attention,
    write_kv,
)
from llmasos.drivers.model.batch import StepBatch
from llmasos.drivers.model.cpu_linear import SMALL_ROWS, LinearPlan, probe
from llmasos.drivers.model.families import family
from llmasos.drivers.model.kv_pool import KVPool
from llmasos.drivers.model.ranges import named_range
from llmasos.drivers.model.weights import to_llama_names

Weight = torch.Tensor | QuantWeight  # QuantWeight only where the Triton kernels run


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Weight  # [(Hq + 2 Hkv) * D, hidden]: Q, K, V projections fused into one matmul
    qkv_bias: torch.Tensor | None
    o: Weight
    mlp_norm: torch.Tensor
    gate_up: Weight  # [2 * intermediate, hidden]: gate and up fused (just up when not gated)
    down: Weight
    # other families' extras (None for Llama)
    attn_norm_bias: torch.Tensor | None = None  # LayerNorm's bias
    mlp_norm_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [head_dim], Qwen3 / Gemma 3
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # Gemma's sandwich norms
    post_mlp_norm: torch.Tensor | None = None
    sliding: bool = False  # attends to the last cfg.sliding_window positions only

    def tensors(self) -> list[Weight]:
        return [t for t in (self.attn_norm, self.qkv, self.qkv_bias, self.o, self.mlp_norm,
                            self.gate_up, self.down, self.attn_norm_bias, self.mlp_norm_bias,
                            self.o_bias, self.gate_up_bias, self.down_bias, self.q_norm,
                            self.k_norm, self.post_attn_norm, self.post_mlp_norm)
                if t is not None]


def cat_rows(ws: list[Weight]) -> Weight:
    """Fuse projections by stacking their rows; GGUF blocks of one format stack as they are."""
    if all(isinstance(w, QuantWeight) for w in ws) and len({w.fmt for w in ws}) == 1:
        return QuantWeight(ws[0].fmt, sum(w.out_features for w in ws), ws[0].in_features,
                           torch.cat([w.qweight for w in ws]))
    adjacent = stacked_view(ws)
    if adjacent is not None:
        return adjacent
    return torch.cat([dequantize(w) if isinstance(w, QuantWeight) else w for w in ws])


def stacked_view(ws: list[Weight]) -> torch.Tensor | None:
    """The stack of ws as one view when they already lie one after another in one buffer (the
    weights cache stores them so: drivers/loaders/cache.py); None when a copy is needed."""
    first = ws[0]
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        return None
    offset = first.storage_offset()
    for w in ws:
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_contiguous() or \
                w.dtype != first.dtype or w.device != first.device or \
                w.shape[1] != first.shape[1] or w.storage_offset() != offset or \
                w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return None
        offset += w.numel()
    rows = sum(w.shape[0] for w in ws)
    return first.as_strided((rows, first.shape[1]), (first.shape[1], 1),
                            first.storage_offset())


def weight_numel(w: Weight) -> int:
    return w.numel() if isinstance(w, torch.Tensor) else w.out_features * w.in_features


def weight_bytes(w: Weight) -> int:
    """What w holds: its quantized parts, or its dense data and any packed copy of it."""
    if isinstance(w, QuantWeight):
        return sum(t.nbytes for t in (w.qweight, w.scale, w.offset) if t is not None)
    return w.nbytes + packed_bytes(w)


def rope_inv_freq(cfg: ModelConfig, rope_freqs: torch.Tensor | None = None,
                  theta: float = 0.0, scaled: bool = True) -> torch.Tensor:
    """Inverse frequencies [rotary_dim / 2] with the config's scaling applied (HF semantics)."""
    d = cfg.rotary_dim or cfg.head_dim
    base = theta or cfg.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = (cfg.rope_scaling or {}) if scaled else {}
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [T, H, D] with cos = [cos, cos] and sin = [-sin, sin], [T, 1, R]
    (LlamaModel.rope): x * cos + [x2, x1] * sin, the same roundings as the halves spelled out in
    four ops instead of eight. With R < D only the first R dims rotate (partial rotary, NeoX)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    return x * cos + x.roll(rot // 2, dims=-1) * sin


UNSET = object()   # LlamaModel.decode_layers not worked out yet

ACTIVATIONS = {
    "silu": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}  # fmt: skip


class LlamaModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 report: Report | None = None, tune: bool = True) -> None:
        """tune=False leaves the matmul kernels at LinearPlan's defaults: the caller tunes on
        the thread that will run the steps (services/inference/engine.py)."""
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.kv_dtype = dtype   # the KV pool's; a quantization recipe may narrow it (recipe.py)
        self.family = fam = family(cfg.architecture)
        weights = to_llama_names(cfg, weights)
        # Triton attention and quantized matmuls on CUDA (and on CPU under TRITON_INTERPRET=1);
        # otherwise the PyTorch path, with any quantized weight dequantized here. The kernels
        # know neither sliding windows nor soft-capping: those families take the PyTorch path.
        plain = cfg.sliding_window or cfg.attn_softcap
        self.kernels: Kernels | None = None if plain else kernels_for(self.device)
        # the CPU's decode rows read K/V in place from the pool (drivers/cpu/paged_decode.py)
        self.decode_kernel: PagedDecode | None = None if self.kernels is not None else \
            decode_kernel(dtype, self.device, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads)

        def w(name: str) -> Weight:
            t = weights[name]
            if isinstance(t, QuantWeight) and self.kernels is not None:
                return t.to(self.device)
            t = dequantize(t) if isinstance(t, QuantWeight) else t
            return t.to(device=self.device, dtype=dtype).contiguous()

        def opt(name: str) -> torch.Tensor | None:
            return w(name) if name in weights else None

        self.embed = w("model.embed_tokens.weight")   # never quantized: a table lookup
        self.embed_positions = opt("model.embed_positions.weight")  # GPT-2's learned positions
        self.embed_scale = cfg.hidden_size ** 0.5 if fam.embed_scale else 0.0
        self.norm = w("model.norm.weight")
        self.norm_bias = opt("model.norm.bias")
        head = weights.get("lm_head.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings or head is None else w(
            "lm_head.weight")
        self.lm_head_bias = opt("lm_head.bias")
        self.act = ACTIVATIONS[cfg.activation or fam.activation]
        self.parallel = fam.parallel_residual if cfg.parallel_residual is None \
            else cfg.parallel_residual
        self.layers = [self._layer(weights, i, w, opt)   # `report` hears each layer placed
                       for i in tracked(range(cfg.num_layers), "load", "layers", report=report)]
        freqs = weights.get("model.rope_freqs")
        self.inv_freq = rope_inv_freq(cfg, freqs).to(self.device)
        # Gemma 3's sliding layers rotate with their own base and no scaling
        self.local_inv_freq = rope_inv_freq(cfg, None, cfg.rope_local_theta, scaled=False).to(
            self.device) if cfg.rope_local_theta else None
        self.scale = cfg.attn_scale or cfg.head_dim ** -0.5
        self.plan = LinearPlan()
        if tune:
            self.tune()
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self._decode_layers: DecodeLayers | None | object = UNSET

    def tune(self) -> None:
        """MKL or oneDNN, per row regime: whichever makes a pass through this model's dense
        weights fastest on this CPU (drivers/model/cpu_linear.py), timed on the calling thread."""
        layer_weights = [[w for w in (layer.qkv, layer.o, layer.gate_up, layer.down)
                          if isinstance(w, torch.Tensor)] for layer in self.layers]
        dense = [w for ws in layer_weights for w in ws]
        head = [self.lm_head] if isinstance(self.lm_head, torch.Tensor) else []
        many = [w for ws in layer_weights[:2] for w in ws]
        self.plan = probe(dense + head, many, self.device, remember=probe_cache.linear_kernel)

    def _layer(self, weights: dict[str, torch.Tensor], i: int, w: object, opt: object) -> Layer:
        p = f"model.layers.{i}."
        a = p + "self_attn."
        bias = None
        if self.cfg.attention_bias or a + "q_proj.bias" in weights:
            bias = torch.cat([w(a + f"{x}_proj.bias") for x in "qkv"])
        gated = self.family.gated
        return Layer(
            attn_norm=w(p + "input_layernorm.weight"),
            qkv=cat_rows([w(a + f"{x}_proj.weight") for x in "qkv"]),
            qkv_bias=bias,
            o=w(a + "o_proj.weight"),
            mlp_norm=opt(p + "post_attention_layernorm.weight"),
            gate_up=cat_rows([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")])
            if gated else w(p + "mlp.up_proj.weight"),
            down=w(p + "mlp.down_proj.weight"),
            attn_norm_bias=opt(p + "input_layernorm.bias"),
            mlp_norm_bias=opt(p + "post_attention_layernorm.bias"),
            o_bias=opt(a + "o_proj.bias"),
            gate_up_bias=opt(p + "mlp.up_proj.bias"),
            down_bias=opt(p + "mlp.down_proj.bias"),
            q_norm=opt(a + "q_norm.weight"),
            k_norm=opt(a + "k_norm.weight"),
            post_attn_norm=opt(p + "post_attn_norm.weight"),
            post_mlp_norm=opt(p + "post_mlp_norm.weight"),
            sliding=bool(self.cfg.sliding_window) and (
                not self.cfg.sliding_layers or i in self.cfg.sliding_layers),
        )

    def _weights(self) -> list[Weight]:
        tensors = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        tensors += [t for t in (self.embed_positions, self.norm_bias, self.lm_head_bias)
                    if t is not None]
        for layer in self.layers:
            tensors += layer.tensors()
        return tensors

    @property
    def num_parameters(self) -> int:
        return sum(weight_numel(t) for t in self._weights())

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights take on the device (quantized ones in their packed form, dense ones
        with the copies the probe packed for our own kernel)."""
        return sum(weight_bytes(t) for t in self._weights())

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """The family's norm: RMSNorm (one C pass on the CPU's fp32 rows), or LayerNorm (GPT-2,
        NeoX, GPT-J)."""
        if self.family.norm == "layer":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.cfg.rms_norm_eps)
        return rms_norm(x, weight, self.cfg.rms_norm_eps)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """x += delta (the residual stream, in place), then the norm of x: one pass for RMSNorm."""
        if self.family.norm == "layer":
            return self.rms_norm(x.add_(delta), weight, bias)
        return add_rms_norm(x, delta, weight, self.cfg.rms_norm_eps)

    def rope(self, positions: torch.Tensor, inv_freq: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) tables [T, 1, R] for apply_rope, built once per step for every layer."""
        freqs = positions[:, None].float() * inv_freq[None]
        cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
        return (torch.cat((cos, cos), dim=-1).to(self.dtype),
                torch.cat((-sin, sin), dim=-1).to(self.dtype))

    @torch.inference_mode()
    def forward(self, batch: StepBatch, pool: KVPool) -> torch.Tensor:
        """Run the flat batch, writing its K/V into the pool; logits [R, vocab] (fp32) for
        batch.sample_rows."""
        x = F.embedding(batch.input_ids, self.embed)
        if self.embed_scale:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if self.embed_positions is not None:
            x = x + F.embedding(batch.positions, self.embed_positions)
        rope = self.rope(batch.positions, self.inv_freq)
        local = rope if self.local_inv_freq is None else self.rope(batch.positions,
                                                                   self.local_inv_freq)
        native = self.decode_layers()
        pending = None if native is None else native.run(x, batch, pool, rope)
        if pending is None:
            pending = self.layer_loop(x, batch, pool, rope, local)
        if pending is not None:
            x = x.add_(pending)
        return self.logits(self.rms_norm(x[batch.sample_rows], self.norm, self.norm_bias))

    def decode_layers(self) -> DecodeLayers | None:
        """The layers as one native call takes them on a decode step (drivers/cpu/
        decode_layers.py), or None where this model does not qualify; worked out at the first
        step after the weights last changed (weights_changed)."""
        if self._decode_layers is UNSET:
            self._decode_layers = DecodeLayers.of(self)
        return self._decode_layers   # type: ignore[return-value]

    def weights_changed(self) -> None:
        """Whoever swaps the layers' weights (quantization, the int8 cache, 2:4 packing) calls
        this: the native layer call holds pointers into the old ones."""
        self._decode_layers = UNSET

    def layer_loop(self, x: torch.Tensor, batch: StepBatch, pool: KVPool,
                   rope: tuple[torch.Tensor, torch.Tensor],
                   local: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """The decoder layers, op by op; x updated in place; the last MLP's output (or None
        where the residual already holds it: parallel blocks)."""
        pending = None   # the last MLP's output, added into x by the next norm (one pass)
        for i, layer in enumerate(self.layers):
            rotary = local if layer.sliding else rope
            if self.parallel:  # x + attn(norm x) + mlp(norm' x)
                h = self.rms_norm(x, layer.attn_norm, layer.attn_norm_bias)
                attn = self.attention_block(i, layer, self.linear(h, layer.qkv, layer.qkv_bias),
                                            batch, pool, rotary)
                h2 = h if layer.mlp_norm is None else self.rms_norm(x, layer.mlp_norm,
                                                                    layer.mlp_norm_bias)
                x = x.add_(attn).add_(self.mlp(layer, h2))
                continue
            qkv = self.norm_linear(x, pending, layer.attn_norm, layer.attn_norm_bias, layer.qkv,
                                   layer.qkv_bias)
            if qkv is None:
                h = self.rms_norm(x, layer.attn_norm, layer.attn_norm_bias) if pending is None \
                    else self.add_norm(x, pending, layer.attn_norm, layer.attn_norm_bias)
                qkv = self.linear(h, layer.qkv, layer.qkv_bias)
            attn = self.attention_block(i, layer, qkv, batch, pool, rotary)
            if layer.post_attn_norm is not None:
                attn = self.rms_norm(attn, layer.post_attn_norm)
            # x += attn in place: x is this forward's own (never the embedding table)
            gate_up = self.norm_linear(x, attn, layer.mlp_norm, layer.mlp_norm_bias,
                                       layer.gate_up, None if self.family.gated
                                       else layer.gate_up_bias)
            pending = self.mlp(layer, self.add_norm(x, attn, layer.mlp_norm,
                                                    layer.mlp_norm_bias)) \
                if gate_up is None else self.down(layer, gate_up)
            if layer.post_mlp_norm is not None:
                pending = self.rms_norm(pending, layer.post_mlp_norm)
        return pending

    def norm_linear(self, x: torch.Tensor, delta: torch.Tensor | None, norm: torch.Tensor,
                    norm_bias: torch.Tensor | None, w: Weight, bias: torch.Tensor | None
                    ) -> torch.Tensor | None:
        """linear(norm(x + delta), w) in one call where w is the native int8 linear (it folds
        the RMSNorm into its rows' quantization; x += delta in place as add_norm does); None
        where it does not apply, and the caller norms, then multiplies."""
        if self.family.norm == "layer" or norm_bias is not None or \
                not hasattr(w, "matmul_norm"):
            return None
        return w.matmul_norm(x, delta, norm, self.cfg.rms_norm_eps, bias)

    def attention_block(self, i: int, layer: Layer, qkv: torch.Tensor, batch: StepBatch,
                        pool: KVPool, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The attention layer's output from its fused q/k/v projection's rows."""
        cfg = self.cfg
        t = qkv.shape[0]
        k_cache, v_cache = pool.layer(i)
        q = self.rotate_and_store(layer, qkv, batch, k_cache, v_cache, rope)
        window = cfg.sliding_window if layer.sliding else 0
        out = self.attention(q, k_cache, v_cache, batch, window).reshape(t, -1)
        return self.linear(out, layer.o, layer.o_bias)

    def rotate_and_store(self, layer: Layer, qkv: torch.Tensor, batch: StepBatch,
                         k_cache: torch.Tensor, v_cache: torch.Tensor,
                         rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """q [T, H, D] out of the fused projection, RoPE applied to q and k, k and v written to
        the pool (attention reads them there): in one C call on the CPU's plain path
        (drivers/cpu/rope_kv.c), else op by op (per-head norms, partial rotary, learned
        positions, the Triton path)."""
        cfg = self.cfg
        t, qk_heads = qkv.shape[0], cfg.num_heads + cfg.num_kv_heads
        if self.kernels is None and layer.q_norm is None and self.family.positions == "rope" \
                and rope_kv(qkv, rope, batch.slot_mapping, k_cache, v_cache, cfg.num_heads):
            return qkv[:, : self.q_size].view(t, cfg.num_heads, cfg.head_dim)  # rotated in place
        qk = qkv[:, : self.q_size + self.kv_size].view(t, qk_heads, cfg.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(t, cfg.num_kv_heads, cfg.head_dim)
        if layer.q_norm is not None:  # per-head norms before RoPE (Qwen3, Gemma 3)
            qk = torch.cat((self.rms_norm(qk[:, : cfg.num_heads], layer.q_norm),
                            self.rms_norm(qk[:, cfg.num_heads:], layer.k_norm)), dim=1)
        if self.family.positions == "rope":
            qk = apply_rope(qk, *rope)
        q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads:]
        (self.kernels.write_kv if self.kernels else write_kv)(
            k_cache, v_cache, k, v, batch.slot_mapping)
        return q

    def mlp(self, layer: Layer, h: torch.Tensor) -> torch.Tensor:
        if self.family.gated and not self.silu_in_down(layer):
            gate, up = self.gate_up(h, layer.gate_up)
            return self.linear(self.act(gate).mul_(up), layer.down, layer.down_bias)
        bias = None if self.family.gated else layer.gate_up_bias
        return self.down(layer, self.linear(h, layer.gate_up, bias))

    def silu_in_down(self, layer: Layer) -> bool:
        """The native int8 down projection forms silu(gate) * up as it quantizes its rows."""
        return self.act is F.silu and hasattr(layer.down, "matmul_silu")

    def down(self, layer: Layer, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP's second half, from its first projection's rows [T, 2I] (gated) or [T, I]."""
        if not self.family.gated:
            return self.linear(self.act(gate_up), layer.down, layer.down_bias)
        if self.silu_in_down(layer):
            return layer.down.matmul_silu(gate_up, layer.down_bias)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.linear(self.act(gate).mul_(up), layer.down, layer.down_bias)

    def linear(self, x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
        if not isinstance(w, torch.Tensor | QuantWeight):  # packed (drivers/quant): own kernel
            return w.matmul(x, bias)
        if isinstance(w, QuantWeight):   # the GGUF blocks, read as they are by a Triton kernel
            y = self.kernels.linear(x, w)
            return y if bias is None else y + bias
        return self.plan.kernel(x.shape[0])(x, w, bias)

    def gate_up(self, h: torch.Tensor, w: Weight) -> tuple[torch.Tensor, torch.Tensor]:
        """One fused matmul; with MKL and many rows two GEMMs over the halves (contiguous row
        slices of w) are ~5% faster."""
        if h.shape[0] <= SMALL_ROWS or self.plan.many != "mkl" or not isinstance(w, torch.Tensor):
            gate, up = self.linear(h, w).chunk(2, dim=-1)
            return gate, up
        half = self.cfg.intermediate_size
        return F.linear(h, w[:half]), F.linear(h, w[half:])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.linear(h, self.lm_head, self.lm_head_bias).float()
        cap = self.cfg.final_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  batch: StepBatch, window: int = 0) -> torch.Tensor:
        """q: this step's [T, H, D]; k_cache, v_cache: the layer's pool (this step's K/V in)."""
        if batch.kernel_groups is not None:
            return self.kernel_attention(q, k_cache, v_cache, batch)
        if len(batch.groups) == 1:  # one group covers rows 0..T-1 in order: no scatter
            return self.group_attention(q, k_cache, v_cache, batch.groups[0], window)
        out = torch.empty_like(q)
        for group in batch.groups:
            out[group.token_rows] = self.group_attention(q, k_cache, v_cache, group, window)
        return out

    def group_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        group: PagedGroup, window: int) -> torch.Tensor:
        softcap = self.cfg.attn_softcap
        if group.max_q == 1 and not window and not softcap and self.decode_kernel is not None:
            with named_range("paged_decode"):   # bench/engine_step.py counts it attention
                return self.decode_kernel(q, k_cache, v_cache, group, self.scale)
        return group_attention(q, k_cache, v_cache, group, self.scale, window=window,
                               softcap=softcap)

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
