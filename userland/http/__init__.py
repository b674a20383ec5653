"""The HTTP gateway: an OpenAI-compatible API and Prometheus /metrics in front of llmosd.

A userland daemon like llmsh: every request becomes syscalls made with the caller's own token
(the API key), so it holds no state and sees exactly what its caller may see.

    python -m llmasos.http --listen 127.0.0.1:8080 --kernel 127.0.0.1:7070
"""
