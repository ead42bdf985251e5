"""The ``python -m mpillm.serve`` command: the OpenAI-compatible server on rank 0 (its
``__main__``). The HTTP layer itself is mpillm.serving.http (routes, OpenAI wire format, the chat
page, metrics); it reaches the engine only through mpillm.serving.service, and the engine never
imports it.
"""
