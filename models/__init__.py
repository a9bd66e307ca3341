"""Model code (torch): our own implementations, named like the Hugging Face classes so checkpoint keys load.

Never imports grpc or protos. `models.registry` maps a config's architecture to its classes, lazily.
"""
