"""Quantized linear layers behind one interface: fbgemm int8 on the CPU, Triton on CUDA."""
