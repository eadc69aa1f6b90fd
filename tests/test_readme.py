"""README stays true: it stays a front door (at most 200 lines), every `zoedge` command it shows exists with the
options it shows, and its plugin example registers and trains."""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch

from zoedge.cli import build_parser
from zoedge.optim import registry
from zoedge.testing import batches, run_streamed, tiny_store, toy_examples

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _command_lines() -> list[list[str]]:
    """Each `zoedge ...` invocation in README's bash blocks, as the words after `zoedge` (`&&`, `|`, `;` split)."""
    out = []
    for block in _blocks(README.read_text(), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0]
            for part in re.split(r"&&|\|\||;|\|", line):
                words = shlex.split(part)
                if "zoedge" in words:
                    out.append(words[words.index("zoedge") + 1:])
    return out


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser, _ = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for marker in ("<!-- main-command -->", "<!-- test-command -->", "<!-- plugin-example -->"):
        assert marker in text, marker


def test_readme_names_every_command_and_shows_real_ones():
    shown = {argv[0] for argv in _command_lines() if argv}
    table = set(re.findall(r"^\| `zoedge (\w+)`", README.read_text(), flags=re.M))
    assert table == set(_subparsers()), "the commands table lists exactly the commands zoedge has"
    assert {"finetune", "eval", "generate", "plan", "prepare"} <= shown


@pytest.mark.parametrize("argv", _command_lines(), ids=lambda a: " ".join(a)[:70])
def test_readme_command_exists_with_its_options(argv):
    subs = _subparsers()
    assert argv and argv[0] in subs, f"README runs `zoedge {' '.join(argv)}`: no such command ({sorted(subs)})"
    known = set(subs[argv[0]]._option_string_actions)
    shown = {w.split("=", 1)[0] for w in argv[1:] if w.startswith("-")}
    assert not shown - known, f"README shows `zoedge {argv[0]}` with options it does not have: {sorted(shown - known)}"


def test_readme_plugin_example_registers_and_trains(tmp_path, monkeypatch):
    """The example after `<!-- plugin-example -->` is the guide's tested file, and as pasted it registers a plugin
    that trains 3 steps on a tiny model (the weights move, the losses stay finite)."""
    text = README.read_text()
    code = _blocks(text[text.index("<!-- plugin-example -->"):], "python")[0]
    assert code == (ROOT / "docs" / "examples" / "zo_sgd.py").read_text()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registered for this test only
    namespace: dict = {"__name__": "readme_plugin_example"}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - README's own example, as a user pastes it
    plugin = registry.load("zo-sgd")
    _, store = tiny_store(tmp_path)
    before = {n: t.clone() for n, t in __import__("zoedge").load(store).state_dict().items()}
    losses, after = run_streamed(plugin(seed=0, lr=1e-3, eps=1e-2), store, batches(toy_examples(8), 3, 4, seed=0))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(x)).all() for x in losses)
    assert any(not torch.equal(before[n], after[n]) for n in before)
