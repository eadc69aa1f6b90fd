"""Optimizer plugin registry: decorator validation, lazy entry-point discovery, loading, option binding, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch

from tests.toy_dist import TOY_SOURCE, forget_modules, make_toy_dist
from zoedge.cli import main
from zoedge.errors import PluginError
from zoedge.optim import registry
from zoedge.optim.api import Update, ZOOptimizer
from zoedge.optim.registry import (available, build, coerce, load, lookup, options_of, parse_opts,
                                   register_optimizer)
from zoedge.runtime.streamed import Resident

REPO = Path(__file__).resolve().parents[1]
TOY_MODULES = ("toyzo", "toyzo2", "brokenzo", "notzo", "hooklesszo", "decozo")


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch: pytest.MonkeyPatch):
    """Each test sees an empty in-process registry and re-imports the throw-away packages."""
    monkeypatch.setattr(registry, "_REGISTRY", {})
    forget_modules(TOY_MODULES)
    yield
    forget_modules(TOY_MODULES)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path holding the toy distribution ``toyzo`` (plugin ``toy``)."""
    make_toy_dist(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


class _Hooks(ZOOptimizer):
    """Implements the required hooks (no registration)."""

    def perturb(self, block, p):
        return block.tensors

    def end_step(self, losses):
        return Update()

    def apply(self, block, update):
        pass


# ------------------------------------------------------------------ decorator
def test_register_defaults_and_options():
    @register_optimizer()
    class FancyZO(_Hooks):
        """Fancy method for tests.

        Args:
            seed: the seed.
            eps: perturbation
                scale.
            mode: how.
        """

        def __init__(self, *, seed: int = 0, lr: float = 1e-3, eps: float = 1e-3,
                     mode: Literal["a", "b"] = "a") -> None:
            super().__init__(seed=seed, lr=lr)

    assert FancyZO.name == "fancyzo" and FancyZO.description == "Fancy method for tests."
    info = available()["fancyzo"]
    assert (info.origin, info.distribution, info.description) == ("registered", None, "Fancy method for tests.")
    assert load("fancyzo") is FancyZO
    opts = options_of(FancyZO)
    assert list(opts) == ["lr", "eps", "mode"]  # seed is the trainer's
    assert opts["eps"].help == "perturbation scale." and opts["eps"].default == 1e-3
    assert opts["mode"].type_name == "a|b" and opts["lr"].annotation is float

    @register_optimizer(description="explicit")
    class Other(_Hooks):
        name = "other-zo"

    assert "other-zo" in available() and Other.description == "explicit"
    assert list(options_of(Other)) == ["lr"]  # inherited ZOOptimizer.__init__: seed, lr


def test_kwargs_are_followed_into_the_base_signature():
    @register_optimizer("kw")
    class Kw(_Hooks):
        def __init__(self, *, eps: float = 0.1, **kwargs) -> None:
            super().__init__(**kwargs)
            self.eps = eps

    assert list(options_of(Kw)) == ["eps", "lr"]
    opt = build("kw", {"eps": "0.5", "lr": "2"}, seed=7)
    assert (opt.eps, opt.lr, opt.seed) == (0.5, 2.0, 7)
    with pytest.raises(PluginError, match="'defaults'"):
        build("kw", {"defaults": "1"}, seed=0)  # ZOOptimizer's **defaults is not an option


def test_decorator_rejects_missing_hook():
    with pytest.raises(PluginError, match="end_step") as e:
        @register_optimizer("nohook")
        class NoHook(ZOOptimizer):
            def perturb(self, block, p):
                return block.tensors

            def apply(self, block, update):
                pass

    assert "NoHook" in str(e.value) and "nohook" not in available()


def test_decorator_rejects_star_args():
    with pytest.raises(PluginError, match="positional"):
        @register_optimizer("star")
        class Star(_Hooks):
            def __init__(self, *args, seed: int = 0) -> None:
                super().__init__(seed=seed)


def test_decorator_rejects_option_without_default():
    with pytest.raises(PluginError, match="eps.*no default"):
        @register_optimizer("nodefault")
        class NoDefault(_Hooks):
            def __init__(self, *, seed: int = 0, eps: float) -> None:
                super().__init__(seed=seed)


def test_decorator_rejects_no_seed_and_non_plugins():
    with pytest.raises(PluginError, match="seed"):
        @register_optimizer("noseed")
        class NoSeed(_Hooks):
            def __init__(self, *, lr: float = 1e-3) -> None:
                super().__init__(lr=lr)
    with pytest.raises(PluginError, match="not a subclass"):
        register_optimizer("plain")(dict)


def test_decorator_rejects_duplicate_name():
    @register_optimizer("dup")
    class First(_Hooks):
        pass

    with pytest.raises(PluginError) as e:
        @register_optimizer("dup")
        class Second(_Hooks):
            pass
    msg = str(e.value)
    assert "'dup'" in msg and "First" in msg and "Second" in msg and __name__ in msg
    assert load("dup") is First


# ------------------------------------------------------------------ options
@pytest.mark.parametrize("value, ann, expected", [
    ("3", int, 3), ("1e3", int, 1000), (4, int, 4), ("0.5", float, 0.5), (2, float, 2.0), ("2", float, 2.0),
    ("yes", bool, True), ("False", bool, False), ("0", bool, False), (True, bool, True),
    ("none", float | None, None), ("0.1", float | None, 0.1), (None, float | None, None),
    ("sqrt", Literal["constant", "sqrt"], "sqrt"), ("2", Literal[1, 2], 2), ("x", str, "x"),
    ("a, b", list[str], ["a", "b"]), ("1,2,3", tuple[int, ...], (1, 2, 3)), ("p", Path, Path("p")),
    ("7", int | str, 7), ("seven", int | str, "seven"), ("anything", None, "anything"),
])
def test_coerce(value, ann, expected):
    out = coerce(value, ann)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value, ann", [
    ("1.5", int), ("abc", int), ("abc", float), ("maybe", bool), (True, float), (True, int), (0.5, int),
    ("cubic", Literal["constant", "sqrt"]), (3, str), ("x", float | None), ("1,x", list[int]),
])
def test_coerce_rejects(value, ann):
    with pytest.raises(ValueError):
        coerce(value, ann)


def test_parse_opts():
    assert parse_opts(["eps=1e-3", " lr = 2", "note=a=b", "empty="]) == {
        "eps": "1e-3", "lr": " 2", "note": "a=b", "empty": ""}
    with pytest.raises(PluginError, match="KEY=VALUE"):
        parse_opts(["eps"])
    with pytest.raises(PluginError, match="KEY=VALUE"):
        parse_opts(["=3"])
    with pytest.raises(PluginError, match="twice"):
        parse_opts(["eps=1", "eps=2"])


def test_constructor_failure_is_a_plugin_error():
    @register_optimizer("picky")
    class Picky(_Hooks):
        def __init__(self, *, seed: int = 0, eps: float = 1e-3) -> None:
            if eps <= 0:
                raise ValueError(f"eps must be > 0, got {eps}")
            super().__init__(seed=seed)

    with pytest.raises(PluginError, match="picky.*eps must be > 0"):
        build("picky", {"eps": "-1"}, seed=0)


# ------------------------------------------------------------------ entry points
def test_available_is_lazy(site: Path):
    info = available()["toy"]
    assert (info.origin, info.distribution, info.version, info.value) == ("entry point", "toyzo", "0.1", "toyzo:Toy")
    assert info.source == "toyzo==0.1" and not info.conflicts
    assert "toyzo" not in sys.modules  # listing imported nothing
    cls = load("toy")
    assert cls.__name__ == "Toy" and cls.name == "toy" and "toyzo" in sys.modules


def test_dangling_entry_point_is_listed_and_fails_only_on_load(site: Path):
    make_toy_dist(site, "ghostzo", None, entry_points={"ghost": "ghostzo_missing:Ghost"})
    assert available()["ghost"].distribution == "ghostzo"
    with pytest.raises(PluginError) as e:
        load("ghost")
    msg = str(e.value)
    assert all(s in msg for s in ("'ghost'", "ghostzo_missing:Ghost", "ghostzo==0.1", "ModuleNotFoundError"))
    assert load("toy").__name__ == "Toy"  # the others still load


def test_build_coerces_string_options(site: Path):
    opt = build("toy", {"eps": "0.01", "sign": "no", "schedule": "sqrt", "note": "none", "lr": 1}, seed=1)
    assert type(opt).__name__ == "Toy" and opt.seed == 1
    assert (opt.eps, opt.use_sign, opt.schedule, opt.note, opt.lr) == (0.01, False, "sqrt", None, 1.0)
    assert type(opt.param_groups[0]["lr"]) is float
    assert build("toy", {}, seed=0).eps == 1e-3  # defaults


def test_toy_plugin_hooks(site: Path):
    """The toy is a working plugin: ±εz passes leave the base alone; the lazy update is applied once."""
    opt = build("toy", {"eps": "0.1", "lr": "0.01"}, seed=3)
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    block = Resident("layers.0", 0, {"w": w.clone()}, frozenset({"w"}))
    opt.begin_step(0)
    opt.on_resident(block)
    z = opt.noise.normal((2, 3), 0, "w", "z0")
    torch.testing.assert_close(opt.pass_tensors(block, 0)["w"], w + 0.1 * z)
    torch.testing.assert_close(opt.pass_tensors(block, 1)["w"], w - 0.1 * z)
    assert torch.equal(block.tensors["w"], w) and not block.dirty
    assert opt.finish_step([torch.tensor(2.0), torch.tensor(1.0)]) == pytest.approx({"g": 5.0})
    opt.begin_step(1)
    opt.on_resident(block)
    opt.on_resident(block)  # a second visit (flush) must not apply it again
    torch.testing.assert_close(block.tensors["w"], w - 0.01 * z)
    assert block.dirty


def test_unknown_option_bad_value_and_seed(site: Path):
    with pytest.raises(PluginError) as e:
        build("toy", {"epz": "1"}, seed=0)
    msg = str(e.value)
    assert "'epz'" in msg and "'toy'" in msg and "lr, eps, sign, schedule, note" in msg and "did you mean 'eps'" in msg
    with pytest.raises(PluginError) as e:
        build("toy", {"eps": "abc"}, seed=0)
    assert "'eps'" in str(e.value) and "'abc'" in str(e.value) and "float" in str(e.value)
    with pytest.raises(PluginError, match="choose one of constant, sqrt.*--opt schedule=constant"):
        build("toy", {"schedule": "cubic"}, seed=0)
    with pytest.raises(PluginError, match="--seed"):
        build("toy", {"seed": "3"}, seed=0)


def test_unknown_plugin_suggests_close_names(site: Path):
    with pytest.raises(PluginError) as e:
        load("tyo")
    msg = str(e.value)
    assert "'tyo'" in msg and "toy" in msg.split("available:")[1] and "did you mean 'toy'" in msg


def test_broken_plugin_is_reported_and_others_load(site: Path, capsys: pytest.CaptureFixture[str]):
    make_toy_dist(site, "brokenzo", 'raise ImportError("needs frobnicate")', entry_points={"broken": "brokenzo:Broken"})
    make_toy_dist(site, "notzo", "Thing = 42\n", entry_points={"notzo": "notzo:Thing"})
    make_toy_dist(site, "hooklesszo", "from zoedge.optim.api import ZOOptimizer\nclass H(ZOOptimizer):\n    pass\n",
                  entry_points={"hookless": "hooklesszo:H"})
    with pytest.raises(PluginError) as e:
        load("broken")
    msg = str(e.value)
    assert all(s in msg for s in ("'broken'", "brokenzo:Broken", "brokenzo==0.1", "ImportError: needs frobnicate"))
    with pytest.raises(PluginError, match="notzo==0.1.*not a subclass"):
        load("notzo")
    with pytest.raises(PluginError, match="hooklesszo==0.1.*perturb, end_step, apply"):
        load("hookless")
    assert build("toy", {}, seed=0).eps == 1e-3

    assert main(["plugins"]) == 0  # the working plugin keeps the listing useful
    out = capsys.readouterr().out
    assert "BROKEN: optimizer plugin 'broken'" in out and "needs frobnicate" in out
    toy_line = next(line for line in out.splitlines() if line.startswith("toy "))
    assert "toyzo==0.1" in toy_line and "Toy ZO-signSGD" in toy_line
    assert main(["plugins", "broken"]) == 1  # asked about it specifically


def test_same_name_from_two_distributions(site: Path, capsys: pytest.CaptureFixture[str]):
    make_toy_dist(site, "toyzo2", TOY_SOURCE.replace("class Toy", "class Toy2"), entry_points={"toy": "toyzo2:Toy2"})
    info = available()["toy"]
    assert {info.distribution, *(c.distribution for c in info.conflicts)} == {"toyzo", "toyzo2"}
    with pytest.raises(PluginError) as e:
        load("toy")
    assert "toyzo==0.1" in str(e.value) and "toyzo2==0.1" in str(e.value)
    main(["plugins"])  # exit status depends on the environment's other plugins
    out = capsys.readouterr().out
    toy_line = next(line for line in out.splitlines() if line.startswith("toy "))
    assert "BROKEN" in toy_line and "toyzo2==0.1" in toy_line


def test_registered_class_and_entry_point_conflict(site: Path):
    @register_optimizer("toy")
    class Impostor(_Hooks):
        pass

    with pytest.raises(PluginError, match="toyzo==0.1.*Impostor.*both claim"):
        load("toy")


def test_entry_point_of_a_decorated_class_is_one_plugin(site: Path):
    src = ("from zoedge.optim.registry import register_optimizer\nfrom toyzo import Toy\n\n"
           "@register_optimizer('deco', description='decorated toy')\nclass Deco(Toy):\n    pass\n")
    make_toy_dist(site, "decozo", src, entry_points={"deco": "decozo:Deco"})
    first = load("deco")
    info = available()["deco"]  # now also registered in-process: merged, not a conflict
    assert (info.distribution, info.description, info.conflicts) == ("decozo", "decorated toy", ())
    assert load("deco") is first


def test_explicit_import_path(site: Path):
    opt = build("toyzo:Toy", {"eps": "0.5"}, seed=0)
    assert opt.eps == 0.5 and lookup("toyzo:Toy").origin == "import path"
    with pytest.raises(PluginError, match="toyzo:Nope.*AttributeError"):
        load("toyzo:Nope")
    with pytest.raises(PluginError, match="not a valid import path"):
        load("toyzo:")


# ------------------------------------------------------------------ CLI
def test_cli_lists_toy_with_options(site: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "DISTRIBUTION", "DESCRIPTION"]
    assert "--opt eps=0.001" in out and "(float)  perturbation scale ε." in out
    assert "--opt schedule=constant " in out and "(constant|sqrt)" in out

    assert main(["plugins", "toy", "--json", "-"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert (entry["name"], entry["distribution"], entry["version"], entry["error"]) == ("toy", "toyzo", "0.1", None)
    assert [o["name"] for o in entry["options"]] == ["lr", "eps", "sign", "schedule", "note"]
    assert entry["options"][1] == {"name": "eps", "type": "float", "default": 1e-3, "help": "perturbation scale ε."}

    assert main(["plugins", "nope"]) == 2
    assert "no such plugin" in capsys.readouterr().err


def test_cli_subprocess_discovers_installed_distribution(tmp_path: Path):
    make_toy_dist(tmp_path)
    make_toy_dist(tmp_path, "brokenzo", 'raise ImportError("needs frobnicate")', entry_points={"broken": "brokenzo:B"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    res = subprocess.run([sys.executable, "-m", "zoedge.cli", "plugins", "--json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    entries = {e["name"]: e for e in json.loads(res.stdout)}
    assert entries["toy"]["distribution"] == "toyzo" and entries["toy"]["error"] is None
    assert "eps" in [o["name"] for o in entries["toy"]["options"]]
    assert "brokenzo==0.1" in entries["broken"]["error"] and "needs frobnicate" in entries["broken"]["error"]
