"""Mirador: the `mirador` CLI, the embedded default model, and the in-process engine."""
