"""A decode step's decoder layers in one native call (drivers/cpu/decode_layers.c): the same
kernels, arguments and order as LlamaModel.forward's Python loop, for a plain Llama model whose
linears are all native int8 ones (drivers/quant/cpu_native.py) on a step of decode rows only.
What goes is the Python between the kernels, six calls a layer.

DecodeLayers.of(model) says whether a model qualifies (None when not); run() says whether a
step does (None when not: the caller runs its Python loop)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from llmasos.drivers.cpu import int8_linear, rope_kv
from llmasos.drivers.cpu.build import native_function
from llmasos.drivers.quant.cpu_native import NativeInt8Linear

P, I64, F32, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
KINDS = ("the int8 linear", "rope_kv", "paged_decode")   # struct step's failed_kernel


class Kernels(ctypes.Structure):
    _fields_ = [("linear", P), ("rope_kv", P), ("decode", P)]


class Weight(ctypes.Structure):
    _fields_ = [("w", P), ("col_scale", P), ("colsum128", P), ("inv_smooth", P), ("bias", P),
                ("n", I64), ("k", I64)]


class Layer(ctypes.Structure):
    _fields_ = [("qkv", Weight), ("o", Weight), ("gate_up", Weight), ("down", Weight),
                ("attn_norm", P), ("mlp_norm", P), ("k_cache", P), ("v_cache", P)]


class Model(ctypes.Structure):
    _fields_ = [("num_layers", I64), ("hq", I64), ("hkv", I64), ("head_dim", I64),
                ("num_slots", I64), ("block_size", I64), ("eps", F32), ("scale", F32),
                ("half", INT)]


class Step(ctypes.Structure):
    _fields_ = [("T", I64), ("x", P), ("pending", P), ("qkv", P), ("attn", P), ("o", P),
                ("gate_up", P), ("cos", P), ("sin", P), ("slots", P), ("tables", P),
                ("table_width", I64), ("lens", P), ("attn_scratch", P),
                ("scratch_per_thread", I64), ("threads", INT), ("failed_layer", I64),
                ("failed_kernel", INT)]


@cache
def _kernel() -> ctypes._CFuncPtr | None:
    return native_function("decode_layers", [P, P, P, P], INT)


def address(fn: ctypes._CFuncPtr | None) -> int | None:
    return None if fn is None else ctypes.cast(fn, P).value


def weight(w: NativeInt8Linear, bias: torch.Tensor | None) -> Weight:
    p = w.packed
    return Weight(*p.ptrs, None if w.inv_smooth is None else w.inv_smooth.data_ptr(),
                  None if bias is None else bias.data_ptr(), p.n, p.k)


def plain_fp32(t: torch.Tensor | None) -> bool:
    return t is None or (t.dtype == torch.float32 and t.is_contiguous())


@dataclass(eq=False)
class DecodeLayers:
    fn: ctypes._CFuncPtr
    kernels: Kernels
    layers: Any          # ctypes array of Layer, the pool's views filled per pool
    model_args: Model
    keep: list           # the weights the layers point into: alive while these pointers are
    pool_key: tuple = ()

    @classmethod
    def of(cls, model: Any) -> DecodeLayers | None:
        """The model's layers as the C takes them, or None where the model does not qualify."""
        cfg, fam = model.cfg, model.family
        fns = (_kernel(), int8_linear._kernel(), rope_kv._kernel(),
               None if model.decode_kernel is None else model.decode_kernel.fn)
        if any(f is None for f in fns) or model.kernels is not None or \
                model.dtype != torch.float32 or fam.norm == "layer" or not fam.gated or \
                model.act is not F.silu or fam.positions != "rope" or model.parallel or \
                cfg.attn_softcap or model.local_inv_freq is not None or \
                model.embed_positions is not None:
            return None
        for layer in model.layers:
            linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
            if not all(isinstance(w, NativeInt8Linear) for w in linears) or layer.sliding or \
                    any(t is not None for t in (layer.attn_norm_bias, layer.mlp_norm_bias,
                                                layer.q_norm, layer.post_attn_norm,
                                                layer.post_mlp_norm)) or \
                    not all(plain_fp32(t) for t in (layer.attn_norm, layer.mlp_norm,
                                                    layer.qkv_bias, layer.o_bias,
                                                    layer.down_bias)):
                return None
        layers = (Layer * len(model.layers))(*[
            Layer(weight(ly.qkv, ly.qkv_bias), weight(ly.o, ly.o_bias),
                  weight(ly.gate_up, None), weight(ly.down, ly.down_bias),  # gated: no gate_up bias
                  ly.attn_norm.data_ptr(), ly.mlp_norm.data_ptr(), None, None)
            for ly in model.layers])
        args = Model(len(model.layers), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 0, 0,
                     cfg.rms_norm_eps, model.scale, 0)
        keep = [t for ly in model.layers for t in ly.tensors()]
        return cls(fns[0], Kernels(*map(address, fns[1:])), layers, args, keep)

    def bind_pool(self, pool: Any) -> bool:
        """The pool's layer views into the layers (again only when the pool changed); False
        where the C cannot read this pool."""
        k0, v0 = pool.layer(0)
        key = (id(pool), k0.data_ptr(), k0.shape, k0.dtype)
        if key == self.pool_key:
            return True
        block = k0.shape[1]
        if k0.dtype not in (torch.float32, torch.float16) or block & (block - 1):
            return False
        for i in range(len(self.layers)):
            k, v = pool.layer(i)
            if not (k.is_contiguous() and v.is_contiguous()) or v.dtype != k.dtype:
                return False
            self.layers[i].k_cache, self.layers[i].v_cache = k.data_ptr(), v.data_ptr()
        self.model_args.num_slots, self.model_args.block_size = k0.shape[0] * block, block
        self.model_args.half = int(k0.dtype == torch.float16)
        self.pool_key = key
        return True

    def run(self, x: torch.Tensor, batch: Any, pool: Any,
            rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """The last layer's MLP output for the step (x updated in place as the Python loop
        updates it), or None where this step is not a plain decode step the C serves."""
        groups = batch.groups
        t = x.shape[0]
        cos, sin = rope
        if batch.kernel_groups is not None or len(groups) != 1 or not self.bind_pool(pool):
            return None
        g = groups[0]
        m = self.model_args
        if g.max_q != 1 or not g.identity or g.first_row != 0 or g.num_seqs != t or \
                not all(plain_fp32(r) and r.shape[-1] == m.head_dim for r in rope) or \
                batch.slot_mapping.dtype != torch.int64 or \
                not batch.slot_mapping.is_contiguous() or not plain_fp32(x):
            return None
        first = self.layers[0]
        threads = torch.get_num_threads()
        qkv, attn = torch.empty(t, first.qkv.n), torch.empty(t, first.o.k)
        o, gate_up = torch.empty(t, first.o.n), torch.empty(t, first.gate_up.n)
        pending = torch.empty(t, first.down.n)
        g_heads = m.hq // m.hkv
        scratch = torch.empty(threads, g.max_len * g_heads)
        step = Step(t, x.data_ptr(), pending.data_ptr(), qkv.data_ptr(), attn.data_ptr(),
                    o.data_ptr(), gate_up.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                    batch.slot_mapping.data_ptr(), g.kv_blocks.data_ptr(), g.kv_blocks.shape[1],
                    g.seq_lens.data_ptr(), scratch.data_ptr(), scratch.shape[1], threads, 0, 0)
        status = self.fn(ctypes.byref(self.kernels), ctypes.byref(m), self.layers,
                         ctypes.byref(step))
        if status != 0:
            raise failure(step, m)
        return pending


def failure(step: Step, m: Model) -> Exception:
    """The error the Python loop's kernel wrapper raises for the same status."""
    kind = KINDS[step.failed_kernel] if 0 <= step.failed_kernel < len(KINDS) else "a kernel"
    if kind == "rope_kv":
        return IndexError(f"a KV slot of this step lies outside the pool's {m.num_slots} slots")
    if kind == "paged_decode":
        return ValueError(f"paged_decode cannot serve head_dim {m.head_dim} with "
                          f"{m.hq // m.hkv} query heads per KV head")
    return MemoryError(f"{kind} failed in layer {step.failed_layer} (out of memory)")
