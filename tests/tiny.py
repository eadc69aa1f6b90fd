"""The tiny models and tokenizer now live in :mod:`zoedge.testing.tiny` (installed with the package)."""
from zoedge.testing.tiny import (FAMILIES, CharTokenizer, batch, resident_logits, save_tiny, tiny_config,  # noqa: F401
                                 tiny_model, toy_examples)


def save_cli_llama(directory, tokenizer=None):
    """The CLI tests' model: a tiny tied Llama (vocab 320, 2 layers, seed 0) with a byte-level BPE tokenizer (or
    ``tokenizer``), saved as a Hugging Face folder; returns the model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.test_tasks import _tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(directory)
    (tokenizer or _tokenizer(bos=True)).save_pretrained(directory)
    return model


def write_demo_jsonl(path, n: int):
    """``n`` demo-task reviews as sst2-layout JSONL (sentence, label); returns the path."""
    import json

    from zoedge.train.demo_task import demo_examples
    rows = [{"sentence": e.prompt[: -len(" It was")], "label": e.label} for e in demo_examples(n, seed=1)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path
