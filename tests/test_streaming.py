"""Streamed forward == resident transformers model (fp32, CPU), both tiers, prefetch 1-3: bit for bit (torch.equal),
as README claims."""
from __future__ import annotations

import pytest
import torch

import zoedge
from zoedge.memory import ALLOCATIONS
from tests.tiny import FAMILIES, batch, resident_logits, save_tiny


@pytest.fixture(scope="module", params=FAMILIES)
def family_store(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model = save_tiny(request.param, root / "hf")
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return request.param, model, root / "store"


def resident_selected_logits(model, ids, mask, sel):
    """The resident head on the selected rows only: a [k, H] @ [H, V] product sums in another order than the
    [B*T, H] one, so selected logits are compared shape for shape (bit for bit), not against rows of the full one."""
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if model.config.model_type != "opt":
        kwargs["position_ids"] = mask.cumsum(-1) * mask - 1
    with torch.no_grad():
        hidden = model.model(**kwargs).last_hidden_state
        return model.lm_head(hidden.reshape(-1, hidden.shape[-1])[sel])


@pytest.mark.parametrize("tier", ["ram", "disk"])
@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_streamed_equals_resident(family_store, tier, prefetch):
    family, model, store = family_store
    ids, mask = batch()
    ref = resident_logits(model, ids, mask)
    m = zoedge.load(store, tier=tier, prefetch=prefetch)
    got = m(ids, mask)
    assert torch.equal(got, ref)
    # select: logits only at chosen flat positions
    sel = torch.tensor([5, 9, 26])
    assert torch.equal(m(ids, mask, select=sel), resident_selected_logits(model, ids, mask, sel))
    m.close()


def test_untied_llama(tmp_path):
    model = save_tiny("llama", tmp_path / "hf", tie=False)
    zoedge.prepare(tmp_path / "hf", tmp_path / "store", progress=False, log=lambda s: None)
    ids, mask = batch()
    m = zoedge.load(tmp_path / "store")
    assert not m.aliases
    assert torch.equal(m(ids, mask), resident_logits(model, ids, mask))


def test_no_allocation_after_first_forward(family_store):
    _, _, store = family_store
    ids, mask = batch()
    for tier in ("ram", "disk"):
        m = zoedge.load(store, tier=tier, prefetch=2)
        m(ids, mask)
        before = ALLOCATIONS.snapshot()
        for _ in range(3):
            m(ids, mask)
        assert ALLOCATIONS.snapshot() == before
        m.close()


def test_multipass_sees_own_weights_and_keeps_base(family_store):
    """Pass 1 sees the weights scaled by 0.5 in one layer: its logits differ, pass 0 and the base are intact."""
    family, model, store = family_store
    ids, mask = batch()
    m = zoedge.load(store)
    base_before = {k: v.clone() for k, v in m.state_dict().items()}

    class Half(zoedge.BlockVisitor):
        passes = 2

        def pass_tensors(self, block, p):
            if p == 1 and block.name == "layers.1":
                return {k: v * 0.5 for k, v in block.tensors.items()}
            return block.tensors

    out = m.run(Half(), ids, mask)
    ref = resident_logits(model, ids, mask)
    assert torch.equal(out[0], ref)
    assert (out[1] - ref).abs().max() > 1e-3
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("model.layers.1.") or n.startswith("model.decoder.layers.1."):
                p.mul_(0.5)
    assert torch.equal(out[1], resident_logits(model, ids, mask))
    for k, v in m.state_dict().items():
        assert torch.equal(v, base_before[k]), k


def test_disk_tier_never_writes_the_store(family_store):
    """A dense update on the disk tier without a working copy is refused; the store stays byte-identical."""
    _, _, store = family_store
    before = {p.name: p.read_bytes() for p in (store / "blocks").iterdir()}

    class Scale(zoedge.BlockVisitor):
        def on_resident(self, block):
            for t in block.tensors.values():
                t.mul_(2)
            block.mark_dirty()

    m = zoedge.load(store, tier="disk")
    with pytest.raises(zoedge.StoreError, match="working"):
        m.run(Scale())
    m.close()
    assert before == {p.name: p.read_bytes() for p in (store / "blocks").iterdir()}


@pytest.mark.parametrize("in_place", [False, True])
def test_half_layer_units_equal_whole_layers(tmp_path, in_place):
    """OPT streamed in attention / MLP halves (two units per decoder layer): the same logits, bit for bit, as whole
    layers, with slots sized to the larger half; families that cannot split and the disk tier are clear errors."""
    from zoedge.errors import ConfigError
    save_tiny("opt", tmp_path / "hf")
    zoedge.prepare(tmp_path / "hf", tmp_path / "store", progress=False, log=lambda s: None)
    ids, mask = batch()
    whole = zoedge.load(tmp_path / "store", in_place=in_place)
    half = zoedge.load(tmp_path / "store", in_place=in_place, unit="half")
    assert [b.name for b in half.blocks][1:3] == ["layers.0.attn", "layers.0.mlp"]
    assert len(half.blocks) == len(whole.blocks) + whole.config.num_hidden_layers
    assert torch.equal(half(ids, mask), whole(ids, mask))
    sel = torch.tensor([5, 9, 26])
    assert torch.equal(half(ids, mask, select=sel), whole(ids, mask, select=sel))
    if not in_place:
        layer = whole.blocks[1].nbytes
        assert max(s.raw.numel() for s in half.ring) < layer == max(s.raw.numel() for s in whole.ring)
    assert all(torch.equal(half.state_dict()[k], v) for k, v in whole.state_dict().items())
    with pytest.raises(ConfigError, match="ram tier"):
        zoedge.load(tmp_path / "store", tier="disk", unit="half")
    save_tiny("llama", tmp_path / "llama")
    zoedge.prepare(tmp_path / "llama", tmp_path / "llama-store", progress=False, log=lambda s: None)
    with pytest.raises(ConfigError, match="whole decoder layers"):
        zoedge.load(tmp_path / "llama-store", unit="half")
