"""The HTTP layer: the OpenAI-compatible API (FastAPI), its errors, metrics and lifecycle."""
