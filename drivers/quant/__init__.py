"""Quantized linear layers behind one interface: int8 on the CPU (the native kernel, or
PyTorch's fbgemm / x86 / oneDNN engines), Triton on CUDA."""
