"""Native CPU kernels: C sources compiled on this machine at first use (drivers/cpu/build.py)
and called through ctypes; each has a PyTorch fallback for machines without a C compiler.

    paged_decode    decode attention read in place from the paged KV pool
    rope_kv         RoPE on the fused QKV rows, K/V stored into the pool
    rms_norm        RMSNorm, with the residual add before it
    row_scale       per-row activation scaling for PyTorch's int8 engines
    int8_linear     the native int8 linear (drivers/quant/cpu_native.py)
    decode_layers   a plain int8 Llama's decoder layers of one decode step, in one call
    greedy          greedy rows: the first maximum and its logprob
    exp.h, rms.h    the exp polynomial and RMSNorm's factor the kernels share
"""
