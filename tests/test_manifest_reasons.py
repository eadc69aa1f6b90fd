"""A refused store names the reason, not just the file (zoedge/store/manifest.py): each damaged manifest below is
refused by the check written for it, with its own words. The store fixture and editing helpers are
tests/test_store_integrity.py's (a tiny prepared Llama store, copied fresh per test)."""
from __future__ import annotations

import json

import pytest

from tests.test_store_integrity import _parts, block, edit_manifest, pristine, refused, store  # noqa: F401
from zoedge.errors import StoreError
from zoedge.store.manifest import ALIGN, MANIFEST_NAME, load_manifest, manifest_from_dict

Q, O = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"


def overlap(raw):
    _parts(raw, O)[0]["offset"] = _parts(raw, Q)[0]["offset"]


def alias_stored(raw):
    raw["tied"] = {"model.norm.weight": "model.embed_tokens.weight"}


@pytest.mark.parametrize("change,words", [
    (overlap, ["layers.0", "overlaps"]),
    (alias_stored, ["tied 'model.norm.weight'", "must alias a stored tensor"]),
])
def test_the_reason_is_named(store, change, words):
    edit_manifest(store, change)
    refused(store, *words)


def test_a_folder_without_a_manifest_is_named_for_what_it_is(store, tmp_path):
    for path, words in [(tmp_path / "nothing", "does not exist"), (store.parent / "hf", "is a Hugging Face checkpoint"),
                        (tmp_path, "is not a zoedge block store")]:
        with pytest.raises(StoreError, match=words):
            load_manifest(path)


def test_blocks_by_name_and_no_dequantized_bytes_unquantized(store):
    m = load_manifest(store)
    assert [m.block(b.name) for b in m.blocks] == m.blocks
    with pytest.raises(KeyError):
        m.block("layers.99")
    assert all(b.dequant_nbytes == 0 for b in m.blocks)


def test_format_one_and_shapes_of_at_most_eight_dimensions(store):
    raw = json.loads((store / MANIFEST_NAME).read_text())
    assert raw["format_version"] == 1  # what this version writes and reads: stores on disk keep loading
    block(raw, "layers.0")["tensors"][0]["shape"] = [1] * 9
    with pytest.raises(StoreError, match="shape"):
        manifest_from_dict(raw)
