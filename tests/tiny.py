"""The tiny models and tokenizer now live in :mod:`zoedge.testing.tiny` (installed with the package)."""
from zoedge.testing.tiny import (FAMILIES, CharTokenizer, batch, resident_logits, save_tiny, tiny_config,  # noqa: F401
                                 tiny_model, toy_examples)
