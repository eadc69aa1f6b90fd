"""zoedge's import layers, declared here once: a module imports only from its own layer or the layers below it
(every import counts: module level, inside functions, and for type checking), and no modules import each other
in a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: lowest first; a package's layer is that of its longest listed prefix
LAYERS: list[tuple[str, ...]] = [
    ("zoedge.errors", "zoedge.memory", "zoedge.names", "zoedge.hardware"),
    ("zoedge.models", "zoedge.adapters", "zoedge.settings"),
    ("zoedge.store", "zoedge.output_dir"),
    ("zoedge.noise",),
    ("zoedge.runtime",),
    ("zoedge.optim",),
    ("zoedge.train", "zoedge.generation", "zoedge.loading"),
    ("zoedge.plan",),
    ("zoedge.testing",),
    ("zoedge.commands",),
    ("zoedge.cli", "zoedge"),
]


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for p in sorted((root / "zoedge").rglob("*.py")):
        parts = p.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The zoedge modules ``path`` (module ``name``) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names} & known  # `from pkg import module`
            found |= subs
            if len(subs) < len(node.names):  # names defined in ``base`` itself
                found.add(base)
    return {m for m in found if m in known and m != name}


def layer(name: str) -> int:
    best = max((p for lay in LAYERS for p in lay if name == p or name.startswith(p + ".")), key=len)
    return next(i for i, lay in enumerate(LAYERS) if best in lay)


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    return {n: imports(p, n, set(mods)) for n, p in mods.items()}


#: upward imports tolerated for now, each with its reason and fix (none today): the test fails when one is
#: added, and when one listed here is gone (then delete it here)
PENDING: set[str] = set()


def upward(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, bs in g.items() for b in bs if layer(b) > layer(a))


def without_pending(g: dict[str, set[str]]) -> dict[str, set[str]]:
    return {a: {b for b in bs if f"{a} -> {b}" not in PENDING} for a, bs in g.items()}


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_no_import_runs_up_a_layer():
    assert upward(graph()) == sorted(PENDING)


def test_no_import_circles():
    assert circles(without_pending(graph())) == []


def test_the_checks_can_fail(tmp_path):
    pkg = tmp_path / "zoedge"
    for rel, text in {"__init__.py": "", "errors.py": "from zoedge.runtime import a\n", "runtime/__init__.py": "",
                      "runtime/a.py": "def f():\n    from zoedge.runtime import b\n",
                      "runtime/b.py": "if True:\n    from . import a\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    g = graph(tmp_path)
    assert upward(g) == ["zoedge.errors -> zoedge.runtime.a"]
    assert circles(g) == [["zoedge.runtime.a", "zoedge.runtime.b"]]


@pytest.mark.parametrize("low,high", [("zoedge.noise.source", "zoedge.runtime.streamed"),
                                      ("zoedge.runtime.streamed", "zoedge.optim.base")])
def test_noise_is_below_the_runtime_below_the_optimizers(low, high):
    assert layer(low) < layer(high)


def test_names_are_torch_free_and_match_their_figures():
    import subprocess
    import sys

    code = "import sys, zoedge.names; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    from zoedge.names import GPU_NAMES, QUANT_KINDS, STORE_DTYPES
    from zoedge.hardware import GPUS
    from zoedge.store.manifest import DTYPES

    assert tuple(GPUS) == GPU_NAMES and set(STORE_DTYPES) <= set(DTYPES) and QUANT_KINDS[0] == "none"


def test_the_streamed_models_parts_never_import_it():
    """StreamedModel's parts (the resident contract, the run loop, concurrent layers, model state) never import
    the model, and the contract a visitor sees imports none of them: it does not depend on how blocks stream."""
    g = graph()
    parts = {"zoedge.runtime.run_loop", "zoedge.runtime.concurrent_layers", "zoedge.runtime.model_state"}
    assert parts | {"zoedge.runtime.resident"} <= set(g)
    assert not any("zoedge.runtime.streamed" in g[p] for p in parts | {"zoedge.runtime.resident"})
    assert not g["zoedge.runtime.resident"] & parts
