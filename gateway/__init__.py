"""The gateway: OpenAI-compatible HTTP (FastAPI) in front of the scheduler's gRPC API. Never imports torch."""
