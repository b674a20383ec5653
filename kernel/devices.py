"""What a node offers: its cores and memory, and its GPUs as NVML (nvidia-ml-py) reports them.
No NVML library or no GPU means no GPU devices, never an error: most nodes have none."""

from __future__ import annotations

import os
import platform

import structlog

from llmasos.proto import kernel_pb2

log = structlog.get_logger()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1


def meminfo() -> tuple[int, int]:
    """(total, used) bytes of host memory; used counts what is not available to allocate."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    total = fields.get("MemTotal", 0)
    return total, max(0, total - fields.get("MemAvailable", total))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu() -> kernel_pb2.Device:
    total, used = meminfo()
    n = cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return kernel_pb2.Device(kind="cpu", name=cpu_name(), cores=n, memory_total=total,
                             memory_used=used, utilization=min(1.0, load / n))


def gpus() -> list[kernel_pb2.Device]:
    """Every GPU NVML sees, with its memory and use now; [] without NVML or a driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as e:   # no package, no libnvidia-ml, no driver: a node without GPUs
        log.debug("nvml_unavailable", error=str(e))
        return []
    try:
        return [gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except pynvml.NVMLError as e:
        log.warning("nvml_query_failed", error=str(e))
        return []
    finally:
        pynvml.nvmlShutdown()


def gpu(pynvml: object, index: int) -> kernel_pb2.Device:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = pynvml.nvmlDeviceGetName(handle)
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        use = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
    except pynvml.NVMLError:   # some devices (MIG slices) do not report it
        use = 0.0
    return kernel_pb2.Device(kind="gpu", name=name.decode() if isinstance(name, bytes) else name,
                             index=index, memory_total=mem.total, memory_used=mem.used,
                             utilization=use)


def inventory() -> list[kernel_pb2.Device]:
    """This machine's devices: the CPU first, then each GPU."""
    return [cpu(), *gpus()]
