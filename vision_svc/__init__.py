"""The vision service: image preprocessing and the vision encoder, with embeddings cached by content key."""
