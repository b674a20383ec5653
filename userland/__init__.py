"""LLMasOS userland: the client library (`from llmasos import LLMClient`), the shell
(llmasos.shell) and the admin tools (llmasos.tools)."""

from llmasos.aio import AsyncLLMClient, AsyncProcess
from llmasos.client import LLMClient
from llmasos.errors import JobFailed, LLMError, ModelNotFound
from llmasos.process import Completion, Process

__all__ = ["AsyncLLMClient", "AsyncProcess", "Completion", "JobFailed", "LLMClient",
           "LLMError", "ModelNotFound", "Process"]
