"""`zoedge plugins` lists the five shipped optimizers with a one-line description and their options."""
from __future__ import annotations

import json

from zoedge.cli import main


def test_plugins_lists_the_five_shipped_optimizers(capsys):
    assert main(["plugins", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    for name, option in (("mezo", "eps"), ("hzo", "rank"), ("loho", "fo_layers"), ("dizo", "tau"),
                         ("hizoo-l", "alpha")):
        e = entries[name]
        assert e["error"] is None and e["distribution"] == "zoedge" and e["description"]
        assert "\n" not in e["description"]
        assert option in {o["name"] for o in e["options"]}
