"""Planning and measuring: the tracker's counting, plan vs a measured step, the arithmetic, the tools' CLIs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import zoedge
from tests.tiny import save_tiny
from zoedge.cli import main
from zoedge.errors import ConfigError
from zoedge.plan.accounting import Workload, layout, make_plan, method, model_spec, units
from zoedge.hardware import Hardware, hardware
from zoedge.plan.measure import measure_step
from zoedge.plan.tracker import DeviceMemoryTracker

MEASURED = Path(__file__).resolve().parents[1] / "docs" / "measurements" / "h200-2026-11-29"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan")
    out = {}
    for family, tie in (("opt", True), ("llama", False), ("qwen2", False)):
        save_tiny(family, root / family, layers=3, tie=tie)
        out[family] = root / f"{family}-store"
        zoedge.prepare(root / family, out[family], dtype="fp32", progress=False, log=lambda s: None)
        for kind in ("int8", "nf4") if family != "qwen2" else ():
            out[f"{family}-{kind}"] = root / f"{family}-{kind}-store"
            zoedge.prepare(root / family, out[f"{family}-{kind}"], dtype="fp32", quant=kind, progress=False,
                           log=lambda s: None)
    return out


# ------------------------------------------------------------------------------------------------ tracker
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_tracker_counts_storages_not_views(device):
    with DeviceMemoryTracker(device) as tr:
        a = torch.empty(1000, dtype=torch.float32, device=device)          # 4000 B
        v = a[10:20].view(2, 5)                                             # a view: nothing new
        b = a * 2                                                           # 4000 B
        assert tr.live == 8000 and tr.peak == 8000
        del b
        c = torch.empty(250, dtype=torch.float64, device=device)           # 2000 B
        a.add_(1)                                                           # in place: nothing new
    assert tr.live == 6000 and tr.peak == 8000
    assert tr.discount([a]) == 4000 and tr.live == 2000 and tr.peak == 4000
    del a, v, c


def test_tracker_ignores_other_devices_and_preexisting_tensors():
    w = torch.empty(100, device="meta")
    with DeviceMemoryTracker("meta") as tr:
        w.view(10, 10)                                                     # a view of an older tensor
        torch.ones(10)                                                      # CPU: not the tracked device
        x = w + 1
    assert tr.peak == 400
    del x


def _attention_peak(device: str, attention: str) -> int:
    from zoedge.adapters import adapter_for
    from zoedge.plan.shapes import shape_config
    cfg = shape_config("opt-1.3b", 1)
    cfg._attn_implementation = "eager" if attention == "eager" else "sdpa"
    adapter = adapter_for(cfg, torch.float32, device)
    w = {n: torch.zeros(s, device=device) for n, s in adapter.expected_shapes().items() if adapter.block_of(n) == "layers.0"}
    ids = torch.zeros(1, 256, dtype=torch.long, device=device)
    with DeviceMemoryTracker(device, attention) as tr:
        ctx = adapter.begin(ids, torch.ones_like(ids))
        x = torch.zeros(1, 256, 2048, device=device)
        with tr.section() as sec:
            adapter.run("layers.0", w, x, ctx)
    return sec["above"]


def test_meta_layer_counts_what_the_cpu_layer_allocates():
    """A real-width (OPT-1.3B) decoder layer: the meta count with fused attention equals a real CPU forward's
    (the CPU runs sdpa as its flash kernel); eager attention costs the S x S scores on top."""
    cpu, meta = _attention_peak("cpu", "sdpa"), _attention_peak("meta", "sdpa")
    assert meta == cpu
    eager = _attention_peak("meta", "eager")
    heads, seq = 32, 256
    assert eager - meta >= heads * seq * seq * 4  # at least one fp32 score matrix per head


# ------------------------------------------------------------------------------------- plan vs measured
def test_layout_matches_prepared_store(stores):
    from zoedge.store.manifest import load_manifest
    for name, store in stores.items():  # fp32 stores and int8 / nf4 ones
        man = load_manifest(store)
        blocks, tied = layout(model_spec(str(store)).config, "fp32", man.quant)
        assert [b.nbytes for b in blocks] == [man.blocks[0].nbytes, man.blocks[1].nbytes, man.blocks[-1].nbytes]
        assert tied == man.tied
        family = name.split("-")[0]  # the HF checkpoint it came from
        from_checkpoint = model_spec(str(store.parent / family), dtype="fp32", quant=man.quant)
        assert [b.nbytes for b in from_checkpoint.blocks] == [b.nbytes for b in blocks]


@pytest.mark.parametrize("family,q,prefetch,lean,unit", [
    ("opt", 1, 1, True, "layer"), ("opt", 2, 2, True, "layer"), ("llama", 1, 1, True, "layer"),
    ("qwen2", 1, 2, True, "layer"), ("opt", 1, 1, False, "layer"), ("llama", 2, 1, False, "layer"),
    ("opt", 1, 1, True, "half"), ("opt", 1, 2, False, "half")])
def test_plan_equals_measured_cpu_step(stores, family, q, prefetch, lean, unit):
    """The acceptance check at small widths: the peak device bytes counted on a real CPU training step (two
    steps: the second applies the lazy update) equal plan's prediction within 0.5%, never above it (measured
    0.17-0.47% below), for the lean runtime (the GPU's default) and its workspace mode, streaming whole layers or half layers."""
    work = Workload(batch=3, seq=12, scored=5, prefetch=prefetch, unit=unit)
    m = measure_step(stores[family], "cpu", options={"q": q}, batch=3, seq=12, scored=5, steps=2, prefetch=prefetch,
                     lean=lean, unit=unit)
    plan = make_plan(model_spec(str(stores[family])), method("mezo", q), work, hardware("rtx4090"), timing=False)
    peak, live = ((plan.device_peak, plan.device_long_lived) if lean else
                  (plan.workspace_device_peak, plan.workspace_long_lived))
    assert all(torch.isfinite(torch.tensor(m.losses)))
    assert -0.005 < m.tracked_peak / peak - 1 <= 0
    # slots (+ workspaces) exactly; a few KiB more live in the run (rotary tables, the step's loss scalars)
    assert 0 <= m.tracked_long_lived - sum(live.values()) < 16 * 1024


@pytest.mark.parametrize("store,unit", [("opt-nf4", "layer"), ("opt-nf4", "half"), ("opt-int8", "layer"),
                                        ("opt-int8", "half"), ("llama-nf4", "layer"), ("llama-int8", "layer")])
def test_plan_equals_measured_lowrank_step_on_a_quantized_store(stores, store, unit):
    """A low-rank plugin (HZO, factor mode) on an int8 / nf4 store: the peak device bytes counted on a real CPU
    step (the third: the plugin's factors then exist for every block) equal the plan's within 0.1%. The slots hold
    the quantized bytes only; each matrix is expanded just in time at its op (both counted as the runtime does
    them), the factors are the plugin's own allocations. (A batch without padding: the plan builds the attention
    mask as for a padded one, a few hundred bytes that a larger batch would make more than 0.1% at this width.)"""
    work = Workload(batch=1, seq=8, scored=3, unit=unit)
    m = measure_step(stores[store], "cpu", optimizer="hzo", batch=1, seq=8, scored=3, steps=3, unit=unit)
    plan = make_plan(model_spec(str(stores[store])), method("lowrank"), work, hardware("rtx4090"), timing=False)
    assert all(torch.isfinite(torch.tensor(m.losses))) and len(set(m.losses)) > 1
    assert abs(m.tracked_peak / plan.device_peak - 1) < 0.001
    live = plan.device_long_lived
    assert live["optimizer state (factors)"] > 0 and set(live) == {"ring slots", "tied-weight slot",
                                                                   "optimizer state (factors)"}
    # slots and factors exactly; a few hundred bytes more live in the run (the step's scalars, the adapter's masks)
    assert 0 <= m.tracked_long_lived - sum(live.values()) < 2048


def test_ram_tier_host_allocations_are_the_stored_bytes(stores, capsys):
    """The acceptance "host RAM <= 1.05 x stored bytes" (ram tier): a real run's host allocations (the allocation
    log: the tier's pinned or plain buffers) are the store's bytes, and ``zoedge plan`` prints the ratio."""
    from zoedge.store.manifest import load_manifest
    for name in ("opt", "llama-nf4"):
        stored = sum(b.nbytes for b in load_manifest(stores[name]).blocks)
        m = measure_step(stores[name], "cpu", optimizer="hzo" if "nf4" in name else "mezo", batch=1, seq=8, steps=2)
        assert m.host_tier_bytes == stored
        plan = make_plan(model_spec(str(stores[name])), method("mezo"), Workload(1, 8), hardware("rtx4090"), timing=False)
        assert plan.host_ram == plan.stored_bytes == stored
    assert main(["plan", str(stores["opt"]), "--max-length", "8"]) == 0
    assert "(1.000 x the stored bytes)" in capsys.readouterr().out


def test_lean_step_holds_no_workspaces_and_chunks_bound_the_transients(stores):
    """Lean (the GPU's default): a step holds only the slots; its transient peak includes the perturbed weights
    formed just in time, in row chunks, and the plan counts them for the runtime's chunk size."""
    kw = dict(batch=2, seq=10, steps=2)
    lean = measure_step(stores["opt"], "cpu", **kw)
    ws = measure_step(stores["opt"], "cpu", lean=False, **kw)
    assert lean.losses == ws.losses  # the same numbers, formed in other buffers
    plan = make_plan(model_spec(str(stores["opt"])), method("mezo"), Workload(2, 10), hardware("rtx4090"), timing=False)
    assert ws.tracked_long_lived - lean.tracked_long_lived == sum(plan.workspace_long_lived.values()) - sum(
        plan.device_long_lived.values()) > 0
    assert -0.005 < lean.tracked_peak / plan.device_peak - 1 <= 0  # measured 0.18% below
    small = make_plan(model_spec(str(stores["opt"])), method("mezo"), Workload(2, 10), hardware("rtx4090"),
                      chunk_bytes=4096, timing=False)
    chunked = measure_step(stores["opt"], "cpu", chunk_bytes=4096, **kw)
    assert small.transient_peak != plan.transient_peak  # the chunks change what is formed (and the plan sees it)
    assert -0.03 < chunked.tracked_peak / small.device_peak - 1 <= 0  # measured 2.7% below
    assert chunked.losses == pytest.approx(lean.losses, rel=1e-5)


def test_meta_step_counts_like_the_cpu_step(stores):
    """The meta device (how real widths are measured here) counts the same bytes as the real CPU step."""
    kw = dict(batch=2, seq=10, steps=2)
    cpu = measure_step(stores["opt"], "cpu", **kw)
    meta = measure_step(stores["opt"], "meta", **kw)
    assert abs(meta.tracked_peak / cpu.tracked_peak - 1) < 0.003  # measured 0.18%


def test_in_place_cpu_step_holds_no_slots(stores):
    """Bound in place (the CPU runtime's default), a step has the same losses as through slots and holds at least
    the ring's two slots less."""
    from zoedge.store.manifest import load_manifest
    kw = dict(batch=2, seq=10, steps=2)
    slots = measure_step(stores["llama"], "cpu", lean=False, **kw)  # the in-place binding's workspace mode
    in_place = measure_step(stores["llama"], "cpu", in_place=True, **kw)
    assert in_place.losses == slots.losses
    largest = max(b.nbytes for b in load_manifest(stores["llama"]).blocks)
    assert slots.tracked_long_lived - in_place.tracked_long_lived >= 2 * largest


def test_h200_measured_forward_peaks_match_the_plan():
    """zoedge's H200 measurements (streamed fp16 forwards, torch.cuda.max_memory_allocated) against plan's
    forward prediction plus the cuBLAS workspace: within 0.3%, never above it (0.18% and 0.22% below)."""
    cases = [("bench_stream_l7_pf1.json", "llama-2-7b", 6), ("bench_stream_smol_fp16.json", "smollm2-135m", None)]
    for fname, shape, layers in cases:
        rec = json.loads((MEASURED / fname).read_text())
        plan = make_plan(model_spec(shape, "fp16", layers=layers), method("forward"),
                         Workload(rec["batch"], rec["seq"], prefetch=rec["prefetch"]), hardware("h200"),
                         timing=False)
        assert -0.003 < rec["memory"]["streamed"]["peak"] / plan.gpu_peak - 1 <= 0, fname


# ------------------------------------------------------------------------------------------ arithmetic
def test_opt175b_lean_and_workspaces():
    """The issue's paper figures for OPT-175B fp16, MeZO q=1, batch 1, seq 2048, prefetch 1: 18.9 GB with
    workspaces (lean=False), the lean runtime without the workspaces and the per-pass tied copies, and the design
    target's finer units."""
    plan = make_plan(model_spec("opt-175b"), method("mezo"), Workload(1, 2048), hardware("rtx4090"), timing=False)
    layer = 12 * 12288**2 * 2  # 12 h^2 fp16 (+ biases and norms)
    ws = plan.workspace_long_lived
    assert ws["ring slots"] == pytest.approx(2 * layer, rel=0.01)
    assert ws["optimizer workspaces"] == pytest.approx(2 * layer, rel=0.01)
    assert ws["tied copies (one per pass)"] == 2 * 50272 * 12288 * 2
    assert 18e9 < plan.workspace_device_peak < 20e9
    assert plan.device_long_lived == {"ring slots": ws["ring slots"], "tied-weight slot": ws["tied-weight slot"]}
    assert 9e9 < plan.device_peak < 9.5e9                      # the runtime: 9.2 GB
    from zoedge.plan.accounting import lean_unit_bytes
    spec, h = model_spec("opt-175b"), 12288
    assert lean_unit_bytes(spec, "linear") == 4 * h * h * 2                           # fc1
    assert lean_unit_bytes(spec, "half") == pytest.approx(8 * h * h * 2, rel=1e-3)     # fc1 + fc2 (+ biases, norm)
    assert lean_unit_bytes(spec, "layer") == pytest.approx(layer, rel=1e-3)
    assert plan.gpu_peak_by_unit["layer"] == plan.gpu_peak and plan.runtime_units == ["layer", "half"]
    half = make_plan(model_spec("opt-175b"), method("mezo"), Workload(1, 2048, unit="half"), hardware("rtx4090"), timing=False)
    assert half.device_long_lived["ring slots"] == pytest.approx(2 * 8 * h * h * 2, rel=1e-3)  # 2 MLP halves
    assert half.gpu_peak == plan.gpu_peak_by_unit["half"] <= 8e9  # the runtime (unit="half"): 6.8 GB
    assert plan.gpu_peak_by_unit["linear"] <= 8e9               # design target (single Linears): not implemented
    assert plan.fits[0]["units_that_fit"] == ["linear", "half", "layer"]
    assert plan.host_ram == plan.stored_bytes  # the ram tier holds the stored bytes, nothing more
    # nf4 + a low-rank plugin (HZO): the slots hold the quantized bytes only, each matrix is expanded just in time
    # in 64 MiB row chunks; the runtime with half layers: 3.56 GB, whole layers 4.24 GB
    nf4 = make_plan(model_spec("opt-175b", quant="nf4"), method("lowrank"), Workload(1, 2048, unit="half"),
                    hardware("rtx4090"), timing=False)
    assert nf4.gpu_peak <= 6e9 and nf4.moved["d2h"] == 0 and nf4.gpu_peak_by_unit["layer"] <= 6e9
    spec = model_spec("opt-175b", quant="nf4")
    assert nf4.device_long_lived["ring slots"] == 2 * max(b.nbytes for b in units(spec, "half")[1:-1])
    assert 0 < nf4.device_long_lived["optimizer state (factors)"] < 0.3e9  # rank-4 fp32 factors of every matrix
    dense = make_plan(model_spec("opt-175b"), method("lowrank"), Workload(1, 2048, unit="half"), hardware("rtx4090"), timing=False)
    assert nf4.transient_peak <= dense.transient_peak + 64 * 2**20  # at most one 64 MiB chunk expanded more
    llama = make_plan(model_spec("llama-2-70b"), method("mezo"), Workload(1, 2048), hardware("rtx4090"), timing=False)
    assert llama.runtime_units == ["layer"]  # the Llama adapter runs whole layers only


def test_prefetch_and_quant_change_what_they_should():
    base = make_plan(model_spec("llama-2-7b", layers=2), method("mezo"), Workload(1, 64), hardware("rtx4090"), timing=False)
    pf2 = make_plan(model_spec("llama-2-7b", layers=2), method("mezo"), Workload(1, 64, prefetch=2), hardware("rtx4090"), timing=False)
    assert pf2.device_peak - base.device_peak == base.device_long_lived["ring slots"] // 2
    assert pf2.workspace_device_peak - base.workspace_device_peak == base.device_long_lived["ring slots"] // 2
    spec = model_spec("llama-2-7b", layers=2, quant="nf4")
    nf4 = make_plan(spec, method("lowrank"), Workload(1, 64), hardware("rtx4090"), timing=False)
    assert spec.layer_block.nbytes < 0.3 * model_spec("llama-2-7b", layers=2).layer_block.nbytes  # 4 of 16 bits
    assert nf4.workspace_long_lived["optimizer workspaces"] == 0 and nf4.moved["d2h"] == 0


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown shape|not a named shape"):
        model_spec("opt-9000b")
    with pytest.raises(ConfigError, match="--gpu"):
        hardware("gtx480")
    with pytest.raises(ConfigError, match="--method"):
        method("adam")
    with pytest.raises(ConfigError, match="--scored"):
        Workload(1, 8, scored=9).check()


# ------------------------------------------------------------------------------------------------- CLIs
def test_synth_writes_a_loadable_checkpoint(tmp_path, capsys):
    from transformers import AutoConfig
    from safetensors import safe_open
    out = tmp_path / "smol"
    assert main(["synth", "smollm2-135m", str(out), "--layers", "1", "--dtype", "bf16", "--no-progress"]) == 0
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (576, 1, 3)
    with safe_open(str(out / "model-00001.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert w.dtype == torch.bfloat16 and w.shape == (1536, 576) and 0.015 < w.float().std() < 0.025
    assert main(["synth", "smollm2-135m", str(out), "--layers", "1"]) == 2  # refuses to overwrite
    assert "is not an empty directory" in capsys.readouterr().err


def test_synth_never_writes_among_files_it_did_not_write(tmp_path, capsys):
    """synth writes OUT whole (beside it, then renamed): a folder of yours is refused untouched, a killed synth's
    leftover is replaced, a leftover without synth's marker is refused."""
    from zoedge.plan.shapes import SYNTH_MARKER
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["synth", "smollm2-135m", str(mine), "--layers", "1", "--no-progress"]) == 2
    assert "OUT" in capsys.readouterr().err and [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "mine.synth-tmp").exists()
    out = tmp_path / "smol"
    (tmp_path / "smol.synth-tmp").mkdir()  # a killed synth's half checkpoint
    (tmp_path / "smol.synth-tmp" / SYNTH_MARKER).touch()
    (tmp_path / "smol.synth-tmp" / "model-00000.safetensors").write_bytes(b"torn")
    out.mkdir()  # empty: taken
    assert main(["synth", "smollm2-135m", str(out), "--layers", "1", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model-00000.safetensors",
                                                     "model-00001.safetensors", "model.safetensors.index.json"]
    assert not (tmp_path / "smol.synth-tmp").exists()
    other = tmp_path / "other.synth-tmp"
    other.mkdir()
    (other / "data.bin").write_bytes(b"yours")
    assert main(["synth", "smollm2-135m", str(tmp_path / "other"), "--layers", "1", "--no-progress"]) == 2
    assert "not written by zoedge synth" in capsys.readouterr().err and (other / "data.bin").read_bytes() == b"yours"


def test_memory_and_bench_hold_a_store_lease(stores, monkeypatch, tmp_path):
    """While memory or bench reads a store, `cache prune` and `prepare` see it in use (a lease, as finetune's)."""
    import zoedge.commands.bench as bench
    import zoedge.plan.measure as measure
    from zoedge.store.lease import in_use
    store, seen = stores["llama"], []
    real = measure.measure_step
    monkeypatch.setattr(measure, "measure_step", lambda *a, **k: (seen.append(in_use(store)), real(*a, **k))[1])
    monkeypatch.setattr(bench, "_bench", lambda *a, **k: (seen.append(in_use(store)), 0)[1])
    assert main(["memory", str(store), "--max-length", "8", "--steps", "1", "--no-progress"]) == 0
    assert main(["bench", str(store), "--max-length", "8", "--steps", "1", "--no-progress"]) == 0
    assert seen == [f"pid {os.getpid()}@{os.uname().nodename}"] * 2 and in_use(store) is None


def test_plan_cli_json(capsys):
    assert main(["plan", "opt-1.3b", "--layers", "2", "--max-length", "64", "--gpu", "h100", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "opt-1.3b" and data["layers"] == 2 and data["measured_layers"] == 24
    assert data["gpu_peak"] == data["device_peak"] + 32 * 2**20
    assert data["hardware"]["pcie"] == 50e9


def test_memory_and_bench_cli_real_runs(stores, capsys, tmp_path):
    out = tmp_path / "m.json"
    assert main(["memory", str(stores["llama"]), "--max-length", "8", "--batch-size", "2", "--steps", "2", "--no-progress",
                 "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert abs(m["ratio"] - 1) < 0.05 and m["host_rss"] > 0
    out = tmp_path / "b.json"
    assert main(["bench", str(stores["opt"]), "--max-length", "8", "--steps", "2", "--warmup", "0", "--compare",
                 "resident", "--no-progress", "--json", str(out)]) == 0
    b = json.loads(out.read_text())
    assert len(b["step_s"]) == 2 and b["tokens_per_s"] > 0 and b["ratio_streamed_to_resident"] > 0
    # the resident step as the paper draws (torch's generator), and with the streamed step's own (philox)
    assert len(b["resident_step_s"]) == len(b["resident_same_noise_step_s"]) == 2
    assert b["noise_source"]["generator"] == "philox"
    assert sum(b["breakdown_s"].values()) == pytest.approx(sum(b["step_s"]) / 2, rel=1e-6)


@pytest.mark.parametrize("command", ["synth", "plan", "memory", "bench"])
def test_help_documents_every_option(command, capsys):
    from zoedge.cli import build_parser
    parser, _ = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    assert main([command, "--help"]) == 0


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, reason=(
    "measured on an H200 (2026-11-29, docs/measurements/h200-2026-11-29/after-scheduler): the tracker equals the "
    "plan (600.8 vs 601.0 MB) but torch.cuda.max_memory_allocated of a training step is higher by about one fp32 "
    "tokens x vocab tensor (836.7 vs 634.6 MB here; 2860 vs 2330 MiB for 6 Llama-2-7B-width layers at 8 x 512), "
    "an allocation the dispatch-level tracker does not see; forward-only peaks agree within 0.2%. Not yet explained."))
def test_cuda_step_matches_the_plan(tmp_path):
    """On a GPU: torch.cuda.max_memory_allocated of two MeZO steps equals plan's GPU peak (tensors + cuBLAS
    workspace) within 5%, and the tracker's count equals the plan's device peak within 5%."""
    from zoedge.plan.shapes import write_checkpoint
    write_checkpoint("smollm2-135m", tmp_path / "ckpt", layers=4, dtype="fp16", progress=False, log=lambda s: None)
    zoedge.prepare(tmp_path / "ckpt", tmp_path / "store", dtype="fp16", progress=False, log=lambda s: None)
    torch.cuda.empty_cache()
    m = measure_step(tmp_path / "store", "cuda", batch=4, seq=256, steps=2)
    name = torch.cuda.get_device_name()
    hw = hardware("h100" if ("H100" in name or "H200" in name) else "a100-80g")
    plan = make_plan(model_spec(str(tmp_path / "store")), method("mezo"), Workload(4, 256), hw, timing=False)
    print(f"cuda max allocated {m.cuda_max_allocated}, tracker {m.tracked_peak}, plan {plan.device_peak} "
          f"(+cuBLAS {plan.gpu_peak}), NVML {m.nvml_used}")
    assert abs(m.tracked_peak / plan.device_peak - 1) < 0.05
    assert abs(m.cuda_max_allocated / plan.gpu_peak - 1) < 0.05
