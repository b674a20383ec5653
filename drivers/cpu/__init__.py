"""Native CPU kernels: C sources compiled on this machine at first use (drivers/cpu/build.py)
and called through ctypes; each has a PyTorch fallback for machines without a C compiler."""
