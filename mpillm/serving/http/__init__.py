"""The OpenAI-compatible HTTP layer (Starlette): it talks to the engine only through mpillm.serving.service."""
