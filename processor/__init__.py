"""Torch-free request building shared by the gateway and the in-process engine: model config, tokenizer, chat
template, media fetching and decoding, placeholder arithmetic and incremental detokenization."""
