"""LLMasOS userland: the client library (`from llmasos import LLMClient`), the shell
(llmasos.shell) and the admin tools (llmasos.tools).

The client's names are imported on first use: llmosd and its services live in this package too
(llmasos.kernel, llmasos.services) and need not load the client library at every start."""

from importlib import import_module

EXPORTS = {   # name -> the module that defines it
    "AsyncLLMClient": "llmasos.aio", "AsyncProcess": "llmasos.aio",
    "LLMClient": "llmasos.client",
    "JobFailed": "llmasos.errors", "LLMError": "llmasos.errors", "ModelNotFound": "llmasos.errors",
    "Completion": "llmasos.process", "Process": "llmasos.process",
}
__all__ = sorted(EXPORTS)


def __getattr__(name: str) -> object:
    if name not in EXPORTS:
        raise AttributeError(f"module 'llmasos' has no attribute {name!r}")
    return getattr(import_module(EXPORTS[name]), name)
