"""The scheduler service: request queue, continuous batching, KV page tables, prefix cache, detokenization."""
