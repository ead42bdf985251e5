"""The OpenAI-compatible HTTP server, its chat page and metrics (``python -m mpillm.serve``).

Layering: ``app`` (Starlette routes) -> ``protocol`` (OpenAI wire format, validation, SSE)
-> ``mpillm.serving.service.Service`` (requests, batching; all MPI in rank 0's main thread).
The engine never imports this package.
"""
