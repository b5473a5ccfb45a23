"""Checkpoints, tokenizers and adapters: loading what is trained and what was trained."""
