"""Mutation score of zoedge's core: plant one small bug at a time, run the tests that cover the module, count the
bugs they catch.

    nice -n 19 python tools/mutation.py zoedge/train/sampling.py            # the module's own test files
    nice -n 19 python tools/mutation.py zoedge/store/verify.py --every 3    # a third of the mutants
    python tools/mutation.py --list                                          # modules and their tests

Mutants (one AST node each): arithmetic operators swapped (+ -, * /, // /), comparisons negated or moved by one
(< <=, > >=, == !=, in / not in, is / is not), ``and`` / ``or`` swapped, ``not`` dropped, a unary minus dropped,
augmented assignments flipped (+= -=), integer constants moved by one, ``if`` / ``while`` conditions negated,
``return`` values replaced by None. Docstrings, f-strings and error messages are left alone.

Each mutant is written over the module in place (a copy of the original is kept and put back, also on Ctrl-C;
the module must have no uncommitted changes), the module's tests run with ``-x`` and a timeout; a failing run or a
timeout kills the mutant. Fast path (default; ``--no-fork`` turns it off): the tool imports the tests once
(a pytest collection), then per mutant forks, swaps the mutated function's code object into every live function
object that has the original (``__code__``: callers that imported the function by name see the mutant too) and
runs pytest in the child; the file is also written, so tests that start a subprocess see the mutant. A mutant
outside a function body (module or class level, a default argument, a decorator) runs in a fresh pytest. Prints
the score and every surviving mutant (line, what changed); ``--json`` writes them.
Slow (a pytest start per mutant): a tool, not part of the test suite. Results and the survivors' reasons:
docs/mutation.md.

Why not mutmut (3.8 installs): it mutates a copy under ``mutants/`` put first on ``sys.path``, but the shipped
plugins are imported as ``zoedge_plugins`` through the editable install's path mapping, which that copy cannot
shadow, so mutants of ``plugins/`` would never run.
"""
from __future__ import annotations

import argparse
import ast
import gc
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: module -> the fastest test files (and pytest -k selection) that cover it: the ones of docs/mutation.md's results
TESTS: dict[str, list[str]] = {
    "plugins/mezo.py": ["tests/test_stochastic_rounding.py", "tests/test_mezo_options.py", "tests/test_learns.py",
                        "tests/test_mezo.py", "-k", "rounding or options or mezo and not noise_cache and not lean "
                        "and not workspaces and not half"],
    "plugins/dizo.py": ["tests/test_dizo_phases.py", "tests/test_learns.py", "tests/test_dizo.py", "-k", "dizo"],
    "plugins/loho.py": ["tests/test_loho_choice.py", "tests/test_learns.py", "tests/test_loho.py", "-k", "loho"],
    "plugins/hizoo.py": ["tests/test_hizoo_state.py", "tests/test_learns.py", "tests/test_hizoo.py", "-k", "hizoo"],
    "plugins/hzo.py": ["tests/test_hzo_options.py", "tests/test_hzo_factors.py", "tests/test_learns.py",
                       "tests/test_hzo.py", "-k", "hzo"],
    "zoedge/optim/base.py": ["tests/test_declared_state.py", "tests/test_learns.py", "tests/test_lazy_update.py",
                             "tests/test_plugin_api.py", "tests/test_update_checkpoints.py", "-k", "state or quadratic "
                             "or tiny and (mezo or hizoo) or lazy or api or (resume_from_updates and ram-llama)"],
    "zoedge/train/checkpoint.py": ["tests/test_checkpoint_choice.py", "tests/test_crash_order.py",
                                   "tests/test_run_safety.py", "tests/test_update_checkpoints.py", "-k",
                                   "choice or checkpoint_save or truncated or disk_full or state_json or "
                                   "checkpoint_refuses or divergence or (resume_from_updates and ram-llama)"],
    "zoedge/train/sampling.py": ["tests/test_disjoint_splits.py", "tests/test_splits.py"],
    "zoedge/train/guard.py": ["tests/test_guard_causes.py", "tests/test_run_safety.py", "-k",
                              "causes or guard or divergence or non_finite or nan"],
    "zoedge/train/run_record.py": ["tests/test_run_record_resume.py", "tests/test_read_only_outputs.py",
                                   "tests/test_run_safety.py", "-k", "record_resume or read_only or resume_refuses or "
                                   "summary or second_run or fresh_disk or eval_refuses or eval_carves or truncated"],
    "zoedge/store/verify.py": ["tests/test_store_stamps.py", "tests/test_store_integrity.py"],
    "zoedge/store/manifest.py": ["tests/test_manifest_reasons.py", "tests/test_store_integrity.py",
                                 "tests/test_store_fuzz.py"],
    "zoedge/store/atomic.py": ["tests/test_crash_order.py", "-k", "prepare"],
    "zoedge/runtime/schedule.py": ["tests/test_schedule_reduction.py", "tests/test_engines.py", "-k",
                                   "reduction or every_wait or interleavings"],
}

SWAP_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
            ast.Mod: ast.FloorDiv, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.LShift: ast.RShift,
            ast.RShift: ast.LShift}
SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
            ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}


def _messages(tree: ast.AST) -> set[int]:
    """ids of nodes inside docstrings, annotations, f-strings, raise statements and logging calls (never mutated)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.add(id(body[0].value))
        notes = [a.annotation for a in ast.walk(node) if isinstance(a, ast.arg) and a.annotation is not None]
        notes += [x for x in (getattr(node, "returns", None), getattr(node, "annotation", None)) if x is not None]
        for note in notes:  # type annotations: not code
            skip.update(id(n) for n in ast.walk(note))
        if isinstance(node, (ast.JoinedStr, ast.Raise)) or (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("warning", "info", "debug", "error", "log")):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def sites(source: str) -> list[tuple[int, int, int, str]]:
    """Every mutant of ``source`` as (node index, change index, line, description)."""
    tree = ast.parse(source)
    skip = _messages(tree)
    nodes = [n for n in ast.walk(tree) if id(n) not in skip]
    return [(i, j, getattr(node, "lineno", 0), desc) for i, node in enumerate(nodes)
            for j, (desc, _) in enumerate(_changes(node))]


def mutate(source: str, i: int, j: int) -> str:
    """``source`` with change ``j`` of node ``i`` (see :func:`sites`) applied."""
    tree = ast.parse(source)
    skip = _messages(tree)
    node = [n for n in ast.walk(tree) if id(n) not in skip][i]
    _, change = list(_changes(node))[j]
    change(node)
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def _changes(node: ast.AST):
    name = lambda op: type(op).__name__
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAP_BIN:
        new = SWAP_BIN[type(node.op)]
        yield f"{name(node.op)} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())
    elif isinstance(node, ast.Compare):
        for k, op in enumerate(node.ops):
            if type(op) in SWAP_CMP:
                new = SWAP_CMP[type(op)]

                def change(n, k=k, new=new):
                    n.ops[k] = new()
                yield f"{name(op)} -> {new.__name__}", change
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        yield f"{name(node.op)} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        def drop(n, neg=isinstance(node.op, ast.USub)):
            if neg:
                n.op = ast.UAdd()  # -x -> +x
            else:
                n.operand = ast.UnaryOp(ast.Not(), n.operand)  # not x -> not not x (x's truth)
        yield f"drop {name(node.op)}", drop
    elif isinstance(node, ast.Constant) and type(node.value) is int and not isinstance(node.value, bool):
        yield f"{node.value} -> {node.value + 1}", lambda n: setattr(n, "value", n.value + 1)
    elif isinstance(node, (ast.If, ast.While)):
        yield "negate condition", lambda n: setattr(n, "test", ast.UnaryOp(ast.Not(), n.test))
    elif isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None):
        yield "return None", lambda n: setattr(n, "value", ast.Constant(None))


def in_function_body(source: str, i: int) -> bool:
    """Whether node ``i`` (see :func:`sites`) runs only when a function is called (so a code swap is enough)."""
    tree = ast.parse(source)
    skip = _messages(tree)
    target = [n for n in ast.walk(tree) if id(n) not in skip][i]
    bodies = [f.body if isinstance(f, ast.Lambda) else ast.Module(f.body, []) for f in ast.walk(tree)
              if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    return any(x is target for body in bodies for x in ast.walk(body))


def _codes(code: types.CodeType) -> list[types.CodeType]:
    """``code`` and every code object nested in it, depth first (the same order for the same function tree)."""
    out = [code]
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            out += _codes(c)
    return out


def swap_code(path: Path, original: str, mutant: str) -> int:
    """Point every live function compiled from ``original`` whose code differs in ``mutant`` at the mutant's code;
    returns how many function objects changed."""
    compile_ = lambda text: compile(text, str(path), "exec", dont_inherit=True)
    live = _codes(compile_(original))  # equal to the imported module's code objects
    plain = _codes(compile_(ast.unparse(ast.parse(original))))
    mutated = _codes(compile_(mutant))
    assert len(live) == len(plain) == len(mutated), "the mutant changed the function structure"
    swap = {o: m for o, p, m in zip(live, plain, mutated) if p != m and o.co_name != "<module>"}
    changed = 0
    for obj in gc.get_objects():
        if type(obj) is types.FunctionType and obj.__code__ in swap:
            obj.__code__ = swap[obj.__code__]
            changed += 1
    return changed


def pytest_args(tests: list[str]) -> list[str]:
    return ["-x", "-q", "-n", "0", "-p", "no:cacheprovider", "--no-header", *tests]  # -n 0: one process (xdist)


NO_SWAP = 99  # the child's exit status when no live function has the mutated code (then a fresh pytest runs)


def run_forked(tests: list[str], timeout: float, path: Path, original: str, mutant: str) -> bool | None:
    """True when the tests pass (the mutant survives), run in a fork of this process with the mutant swapped in;
    None when the swap reached no live function."""
    import pytest
    pid = os.fork()
    if pid == 0:  # child: own process group (a timeout kills its subprocesses too), quiet, mutant in, run
        rc = NO_SWAP
        try:
            os.setpgid(0, 0)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            if swap_code(path, original, mutant):
                rc = int(pytest.main(pytest_args(tests)))
        finally:
            os._exit(rc)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            return None if rc == NO_SWAP else rc == 0
        if time.time() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return False
        time.sleep(0.05)


def load_tests(tests: list[str]) -> None:
    """Import the tests (and so the modules under test) into this process: a pytest collection, output dropped."""
    import pytest
    out, err = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    try:
        pytest.main(["--collect-only", *pytest_args(tests)])
    finally:
        os.dup2(out, 1)
        os.dup2(err, 2)


def run_tests(tests: list[str], timeout: float) -> bool:
    """True when the tests pass (the mutant survives)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", *pytest_args(tests)]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("module", nargs="?", help="a module of TESTS (path from the repository root)")
    ap.add_argument("--tests", help="pytest arguments (one string, e.g. \"tests/test_x.py -k y\") instead of the "
                    "module's mapped tests")
    ap.add_argument("--every", type=int, default=1, help="run every k-th mutant only (a sample)")
    ap.add_argument("--start", type=int, default=0, help="with --every: the first mutant's index (0 .. k-1)")
    ap.add_argument("--lines", help="only mutants on these lines, e.g. 30-45")
    ap.add_argument("--survivors", help="only the mutants that survived in this earlier --json result (to score new "
                    "tests on them: the module's score is then the earlier kills plus these)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per test run (a timeout kills the mutant)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--no-fork", action="store_true", help="a fresh pytest per mutant (slow; no code swap)")
    ap.add_argument("--list", action="store_true", help="print the modules, their mutant counts and their tests")
    a = ap.parse_args(argv)
    if a.list or not a.module:
        for m, t in TESTS.items():
            print(f"{m} ({len(sites((ROOT / m).read_text()))} mutants): {' '.join(t)}")
        return 0
    path = ROOT / a.module
    tests = shlex.split(a.tests) if a.tests else TESTS[a.module]
    dirty = subprocess.run(["git", "status", "--porcelain", "--", a.module], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    if dirty:
        print(f"{a.module} has uncommitted changes; commit or stash them first (mutants are written over it)")
        return 2
    original = path.read_text()
    backup = path.with_name(path.name + ".mutation-backup")
    shutil.copyfile(path, backup)
    todo = sites(original)[a.start::a.every]
    if a.lines:
        lo, _, hi = a.lines.partition("-")
        todo = [m for m in todo if int(lo) <= m[2] <= int(hi or lo)]
    if a.survivors:
        earlier = {(x["line"], x["mutation"]) for x in json.loads(Path(a.survivors).read_text())["survivors"]}
        todo = [m for m in todo if (m[2], m[3]) in earlier]
    if not run_tests(tests, a.timeout):
        print(f"the tests fail without a mutant: {' '.join(tests)}")
        return 2
    fork = not a.no_fork
    if fork:
        os.environ["OMP_NUM_THREADS"] = "1"
        sys.path.insert(0, str(ROOT))
        os.chdir(ROOT)
        load_tests(tests)
    killed, survivors, t0 = 0, [], time.time()
    restore = lambda *_: (path.write_text(original), sys.exit(130))
    signal.signal(signal.SIGINT, restore)
    signal.signal(signal.SIGTERM, restore)
    try:
        for k, (i, j, line, desc) in enumerate(todo, 1):
            mutant = mutate(original, i, j)
            path.write_text(mutant)
            survived = run_forked(tests, a.timeout, path, original, mutant) \
                if fork and in_function_body(original, i) else None
            if survived is None:
                survived = run_tests(tests, a.timeout)
            path.write_text(original)
            if survived:
                survivors.append({"line": line, "mutation": desc, "code": original.splitlines()[line - 1].strip()})
            else:
                killed += 1
            print(f"[{k}/{len(todo)}] line {line}: {desc}: {'SURVIVED' if survived else 'killed'}", flush=True)
    finally:
        path.write_text(original)
        backup.unlink(missing_ok=True)
    score = killed / len(todo) if todo else 1.0
    print(f"\n{a.module}: {killed} of {len(todo)} mutants killed ({100 * score:.1f}%) in {time.time() - t0:.0f} s "
          f"by {' '.join(tests)}")
    for s in survivors:
        print(f"  survived: line {s['line']}: {s['mutation']}: {s['code']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"module": a.module, "tests": tests, "mutants": len(todo),
                                            "killed": killed, "score": score, "survivors": survivors}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
