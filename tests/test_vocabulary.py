"""One vocabulary across the commands: every option is a setting declared once in zoedge/settings.py, the shared
concepts (optimizer and its options, batch, sequence length, JSON output, threads) are spelled the same in every
command that has them, old spellings are hidden aliases that warn; ``python -m zoedge``; ``-v`` / ``-q``."""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from dataclasses import fields

import pytest

from zoedge import settings as settings_module
from zoedge.cli import build_parser, main
from zoedge.settings import Settings, flag

#: the brief's shared concepts and the commands that must take them, under one name
SHARED = {
    "optimizer": ("finetune", "bench", "memory", "plan"),
    "opt": ("finetune", "bench", "memory", "plan"),
    "batch_size": ("finetune", "generate", "bench", "memory", "plan"),
    "max_length": ("finetune", "eval", "bench", "memory", "plan"),
    "json": ("finetune", "eval", "generate", "bench", "memory", "plan", "prepare", "synth", "plugins", "cache list"),
    "threads": ("finetune", "eval", "generate", "bench", "memory"),
}
#: options every parser has that are not settings
GENERIC = {"help", "verbosity", "config", "print_config"}


def _subparsers() -> dict[str, tuple[argparse.ArgumentParser, object]]:
    """Every (sub)command's parser, nested ones too (``cache list``), with its command module."""
    parser, modules = build_parser()
    out = {}

    def walk(p: argparse.ArgumentParser, name: str, module: object) -> None:
        out[name] = (p, module)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub, sp in a.choices.items():
                    walk(sp, f"{name} {sub}".strip(), module or modules[sub])

    walk(parser, "", None)
    del out[""]
    return out


def _options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and a.dest not in GENERIC]


def _setting_classes() -> list[type]:
    return [c for c in vars(settings_module).values() if isinstance(c, type) and issubclass(c, Settings)]


def test_each_setting_is_declared_in_one_class():
    owners: dict[str, list[str]] = {}
    for cls in _setting_classes():
        for name in cls.__dict__.get("__annotations__", {}):
            if not name.isupper():  # GROUP, DEFAULTS, ...: class variables
                owners.setdefault(name, []).append(cls.__name__)
    twice = {name: where for name, where in owners.items() if len(where) > 1}
    assert not twice, f"settings declared in more than one class: {twice}"


def test_every_option_of_every_command_is_its_setting_spelled_one_way():
    spellings: dict[str, set[str]] = {}  # dest -> visible option strings, across the commands
    for name, (p, _) in _subparsers().items():
        cls = p._defaults.get("settings_class")  # set by settings.add_options
        names = {f.name for f in fields(cls)} if cls else set()
        for a in _options(p):
            visible = a.help != argparse.SUPPRESS
            assert a.dest in names, (f"zoedge {name} {a.option_strings[0]}: not a setting of zoedge/settings.py "
                                     f"(declare it once there and add it with add_options)")
            if visible:
                assert a.option_strings in ([flag(a.dest)], ["--no-" + a.dest.replace("_", "-")]), (name, a)
                spellings.setdefault(a.dest, set()).update(a.option_strings)
            else:  # an old spelling: must warn (settings._Deprecated or plan's --q / --rank)
                assert type(a).__name__ in ("_Deprecated", "_OptAlias"), (name, a.option_strings)
    assert all(len(s) == 1 for s in spellings.values()), spellings
    commands = _subparsers()
    for concept, where in SHARED.items():
        for name in where:
            p, _ = commands[name]
            visible = [a for a in _options(p) if a.dest == concept and a.help != argparse.SUPPRESS]
            assert [a.option_strings for a in visible] == [[flag(concept)]], (concept, name)


def test_the_walk_catches_an_option_declared_outside_settings(monkeypatch):
    """The check above fails for a command that declares a shared option itself (the way bench once did)."""
    import zoedge.commands.memory as memory

    original = memory.add_common

    def add_common(p, cls):
        original(p, cls)
        p.add_argument("--tokens", type=int, default=128, help="tokens per sequence")  # max_length's concept again

    monkeypatch.setattr(memory, "add_common", add_common)
    with pytest.raises(AssertionError, match="zoedge memory --tokens: not a setting"):
        test_every_option_of_every_command_is_its_setting_spelled_one_way()


def test_old_spellings_warn_and_mean_the_same(capsys):
    new = ["bench", "store", "--print-config", "--batch-size", "3", "--max-length", "16", "--opt", "q=2"]
    assert main(new) == 0
    expected = capsys.readouterr()
    assert "deprecated" not in expected.err
    assert main(["bench", "store", "--print-config", "--batch", "3", "--seq", "16", "--opt-arg", "q=2"]) == 0
    old = capsys.readouterr()
    assert old.out == expected.out and "batch_size: 3" in old.out and "max_length: 16" in old.out
    for message in ("--batch is deprecated: use --batch-size", "--seq is deprecated: use --max-length",
                    "--opt-arg is deprecated: use --opt"):
        assert message in old.err
    assert main(["plan", "opt-1.3b", "--print-config", "--q", "2"]) == 0
    out = capsys.readouterr()
    assert "- q=2" in out.out and "--q N is deprecated: use --opt q=N" in out.err


def test_commands_have_their_own_defaults_for_shared_settings(capsys):
    import yaml

    def effective(*argv):
        assert main([*argv, "--print-config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    assert effective("finetune")["batch_size"] == 16 and effective("finetune")["max_length"] == 256
    assert (effective("bench", "s")["batch_size"], effective("bench", "s")["steps"]) == (1, 5)
    assert effective("memory", "s")["steps"] == 2 and effective("plan", "m")["max_length"] == 2048


def test_python_m_zoedge_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "zoedge", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("zoedge "), done.stderr


def test_v_and_q_set_the_log_level_and_show_zoedge_loggers(capsys):
    log = logging.getLogger("zoedge")
    try:
        assert main(["-v", "plugins", "--json", "-"]) == 0
        assert log.level == logging.INFO
        logging.getLogger("zoedge.train.tasks").info("shown at -v")
        assert "INFO: shown at -v (zoedge.train.tasks)" in capsys.readouterr().err
        assert main(["plugins", "--json", "-", "-q"]) == 0  # after the command too
        assert log.level == logging.ERROR
        logging.getLogger("zoedge.train.tasks").warning("hidden at -q")
        assert "hidden at -q" not in capsys.readouterr().err
        assert main(["plugins", "--json", "-", "-vv"]) == 0 and log.level == logging.DEBUG
    finally:
        log.setLevel(logging.NOTSET)


def test_the_old_bench_opt_name_is_refused_with_the_new_spelling(capsys):
    assert main(["memory", "no-store", "--opt", "mezo"]) == 2
    err = capsys.readouterr().err
    assert "--opt 'mezo'" in err and "--optimizer NAME" in err


def test_json_and_threads_mean_the_same_in_finetune_and_eval(tmp_path, monkeypatch, capsys):
    import json

    from tests.tiny import save_cli_llama, write_demo_jsonl

    monkeypatch.setenv("ZOEDGE_CACHE", str(tmp_path / "cache"))
    save_cli_llama(tmp_path / "hf")
    write_demo_jsonl(tmp_path / "train.jsonl", 24)
    data = ["--train", str(tmp_path / "train.jsonl"), "--n-train", "16", "--n-dev", "4", "--n-test", "4",
            "--no-progress", "--threads", "1"]
    assert main(["finetune", "--model", str(tmp_path / "hf"), *data, "--batch-size", "4", "--steps", "1",
                 "--no-plot", "--output", str(tmp_path / "run"), "--json", str(tmp_path / "finetune.json")]) == 0
    written = json.loads((tmp_path / "finetune.json").read_text())
    assert written == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["threads"]["source"] == "--threads"
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "run"), *data, "--json", str(tmp_path / "eval.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "eval.json").read_text()) == printed
    assert printed["threads"]["threads"] == 1 and printed["threads"]["source"] == "--threads"  # eval's --threads
