"""The real default checkpoint (SmolLM2-135M-Instruct, fp32): streamed logits == resident transformers logits.

Left-padded prompts of different lengths, both host tiers; positions follow zoedge's convention
(``cumsum(mask) - 1``, as :func:`tests.tiny.resident_logits` passes them to the resident model).
Both tiers: bit-equal (torch.equal), padding rows included, and the selected rows equal the resident head
applied to the same rows.
"""
from __future__ import annotations

import pytest
import torch

import zoedge
from tests.tiny import resident_logits

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Zeroth-order optimizers estimate gradients from two forward passes, so",
    "def fibonacci(n):",
    "Hi",
]


@pytest.fixture(scope="module")
def smol_store(smollm2_dir):
    """The default model's fp32 store in the zoedge cache (prepared once, as finetune and eval use it)."""
    from zoedge.train.job import resolve_store
    return resolve_store(str(smollm2_dir), "fp32", progress=False)


@pytest.fixture(scope="module")
def smol_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smol_batch(smollm2_dir):
    """The prompts tokenized and left-padded to a common length ([B, T] ids and mask)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(r)
        mask[i, t - len(r):] = 1
    assert len({len(r) for r in rows}) > 1, "the prompts must have different lengths to exercise left padding"
    return ids, mask


def _max_delta(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a - b).abs()
    if mask is not None:
        d = d[mask.bool()]
    return d.max().item()


@pytest.fixture(scope="module")
def smol_reference(smol_model, smol_batch):
    """The resident model's logits, and its head applied to the last position of each row alone."""
    ids, mask = smol_batch
    last = torch.arange(ids.shape[0]) * ids.shape[1] + ids.shape[1] - 1
    with torch.no_grad():
        pos = mask.cumsum(-1) * mask - 1
        hidden = smol_model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        ref_sel = smol_model.lm_head(hidden.reshape(-1, hidden.shape[-1])[last])
    return resident_logits(smol_model, ids, mask), last, ref_sel


@pytest.mark.parametrize("tier", ["ram", "disk"])
def test_streamed_equals_resident_real(smol_store, smol_model, smol_batch, smol_reference, tier):
    ids, mask = smol_batch
    ref, last, ref_sel = smol_reference
    m = zoedge.load(smol_store, tier=tier, prefetch=2)
    try:
        got = m(ids, mask)
        assert got.shape == ref.shape == (*ids.shape, smol_model.config.vocab_size)
        assert torch.isfinite(got[mask.bool()]).all()
        # every logit, padding rows too (they never influence real tokens, but must match what the model computes)
        assert torch.equal(got[mask.bool()], ref[mask.bool()]), f"{tier}: max |delta| {_max_delta(got, ref, mask):.3g}"
        assert torch.equal(got.nan_to_num(), ref.nan_to_num())
        # select: logits at the last position only ([B, V]). The reference applies the resident LM head to
        # the same rows: a [B, H] @ [H, V] GEMM sums in another order than the [B*T, H] one above, so it is
        # compared shape for shape.
        sel = m(ids, mask, select=last)
        assert torch.equal(sel, ref_sel), f"{tier} select: max |delta| {_max_delta(sel, ref_sel):.3g}"
    finally:
        m.close()


def test_left_padding_does_not_change_real_logits(smol_store, smol_batch):
    """A prompt's logits do not depend on how much left padding its batch needs (zoedge's positions)."""
    ids, mask = smol_batch
    m = zoedge.load(smol_store)
    try:
        full = m(ids, mask)
        n = int(mask[0].sum())
        alone = m(ids[:1, -n:], mask[:1, -n:])
        assert _max_delta(full[:1, -n:], alone) <= 1e-4
    finally:
        m.close()
