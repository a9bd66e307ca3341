"""The worker service: model weights, the paged KV cache tensors, and the step loop (prefill/decode, sampling)."""
