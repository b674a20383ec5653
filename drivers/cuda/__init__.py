"""CUDA backend: Triton kernels for paged attention and weight-only quantized matmuls.

  kv_write.write_kv                  new K/V into their pool slots
  decode_attention.decode_attention  split-KV flash-decoding over block tables (GQA in tl.dot rows)
  prefill_attention.prefill_attention  FlashAttention-2 over a cached prefix + causal chunk
  quant_matmul.quant_linear          int8 / int4 / GGUF Q8_0 / Q4_1 weights, fp16/bf16/fp32 x
  quant                              pack/quantize helpers and references (PyTorch only)
  reference                          PyTorch attention references
  backend.kernels_for(device)        the dispatch: Triton kernels or None (use PyTorch)
  specs                              every launch variant, for compiling to sm_90 without a GPU

Importing this package imports neither triton nor the kernels; backend loads them on demand.
"""
