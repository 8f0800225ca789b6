"""tools/gpu_check.py: the CPU mode runs every phase of the GPU check at tiny shapes (the same code path), and the
runner keeps each phase in its time box. Timings are recorded, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cola_megatron.analysis import gpu_check
from cola_megatron.analysis.gpu_check import Phase

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data_cache" / "sample_corpus" / "bpe8192"


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    out = root / "out"
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--cpu", "--out", str(out), "--work-dir",
                             str(root / "work")], cwd=REPO, capture_output=True, text=True, timeout=1200)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return result, out, records


def _kind(records, kind, phase=None):
    return [r for r in records if r["kind"] == kind and (phase is None or r["phase"] == phase)]


def test_every_phase_finishes_and_every_check_passes(cpu_run):
    result, out, records = cpu_run
    errors = [r["message"] for r in _kind(records, "error")]
    assert errors == [], "\n".join(errors) + (out / "phases.log").read_text()[-3000:]
    assert [(p["phase"], p["status"]) for p in _kind(records, "phase")] == [(n, "ok") for n in gpu_check.PHASE_NAMES]
    failed = [c["name"] for c in _kind(records, "check") if c["status"] == "failed"]
    assert failed == [] and result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "all checks passed" in result.stdout


def test_environment_records_versions_and_skips_the_attention_assertion_on_cpu(cpu_run):
    _, _, records = cpu_run
    (info,) = _kind(records, "info", "environment")
    assert info["device"] == "cpu" and info["torch"] and info["megatron_core"]
    (sdpa,) = _kind(records, "check", "environment")
    assert sdpa["status"] == "skipped" and "on CPU" in sdpa["detail"]


def test_correctness_compares_precisions_recompute_and_compile(cpu_run):
    _, _, records = cpu_run
    checks = {c["name"]: c for c in _kind(records, "check", "correctness")}
    for arch in ("cola", "dense"):
        for name in (f"{arch}: bf16 vs fp32 loss, largest relative difference",
                     f"{arch}: pure_bf16 vs fp32 loss, largest relative difference"):
            assert checks[name]["status"] == "passed" and 0 < checks[name]["value"] <= checks[name]["tolerance"]
        assert any(n.startswith(f"{arch}: fp32 loss falls") for n in checks)
    for precision in ("fp32", "bf16"):
        for mode in ("cola_m", "full"):
            assert checks[f"cola {precision}: {mode} gradients vs none (relative norm)"]["status"] == "passed"
    assert checks["cola bf16: compiled (aot_eager) vs eager loss over 2 steps"]["status"] == "passed"
    (losses_cola, losses_dense) = _kind(records, "losses", "correctness")
    assert losses_cola["fp32"] != losses_dense["fp32"]  # two different models on the same data


def test_speed_runs_every_variant_side_by_side_and_memory_predicts_each(cpu_run):
    _, _, records = cpu_run
    expected = {"speed_1b": ["dense", "cola", "cola_m", "cola_full"], "speed_7b": ["dense", "cola"],
                "speed_compile": ["dense_compile", "cola_compile"]}
    for phase, variants in expected.items():
        rows = _kind(records, "speed", phase)
        assert [r["variant"] for r in rows] == variants
        for r in rows:
            assert r["tokens_per_s"] > 0 and r["tflops_per_gpu"] > 0 and r["config"]["model"]["arch"] in r["variant"]
            assert r["predicted_step_ms"] > 0  # cola-plan's step time beside the measured one
    assert _kind(records, "speed", "speed_7b")[0]["config"]["model"]["num_layers"] == 4
    (profile,) = _kind(records, "profile")
    assert profile["variant"] == "cola" and len(profile["rows"]) > 5 and profile["rows"][0]["ms"] > 0
    memory = _kind(records, "memory")
    assert [(m["source_phase"], m["variant"]) for m in memory] == [
        (p, v) for p, variants in expected.items() for v in variants]
    by = {m["variant"]: m for m in memory if m["source_phase"] == "speed_1b"}
    # cola-plan's model: both recompute modes keep less than none (at tiny shapes the head can dominate the rest).
    assert max(by["cola_full"]["predicted_activations_gib"], by["cola_m"]["predicted_activations_gib"]) \
        < by["cola"]["predicted_activations_gib"]


def test_quality_trains_each_variant_on_the_same_tokens(cpu_run):
    _, out, records = cpu_run
    if not (CORPUS / "train.bin").exists():
        (check,) = _kind(records, "check", "quality")
        assert check["status"] == "skipped"
        pytest.skip("sample corpus not available (make corpus)")
    rows = _kind(records, "quality")
    assert [r["variant"] for r in rows] == ["dense", "cola", "cola_m"]
    (plan,) = _kind(records, "quality_plan")
    assert {r["steps"] for r in rows} == {plan["steps"]} and len({r["tokens"] for r in rows}) == 1
    assert all(r["valid_ppl"] > 1 for r in rows)
    assert (out / "quality.md").read_text().count("|") > 10 and (out / "quality.png").stat().st_size > 0


def test_outputs_are_few_flat_files_and_the_summary_has_every_section(cpu_run):
    _, out, _ = cpu_run
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= 8
    assert {"results.jsonl", "summary.md", "phases.log"} <= set(files)
    summary = (out / "summary.md").read_text()
    for section in ("## Phases", "## Checks", "## Speed, 1B shapes", "## Speed, 7B shapes (4 layers)",
                    "## Speed, compiled (1B shapes)", "## Memory model", "## Targets", "## Profile: speed_1b cola"):
        assert section in summary


# --------------------------------------------------------------------------------------------------------------
# The runner, with phases from this module (preloaded by the runner's server instead of the real ones)


def run_phase(name, settings, results_path, log_path):
    """Stand-in phases: one hangs (with a child of its own), one raises, one records a check."""
    os.setpgid(0, 0)
    if name == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        Path(settings["work_dir"], "child.pid").write_text(str(child.pid))
        time.sleep(120)
    if name == "boom":
        os._exit(1)
    with open(results_path, "a") as f:
        f.write(json.dumps({"phase": name, "kind": "check", "name": "fine", "status": "passed"}) + "\n")
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_phase_past_its_box_is_killed_with_its_children_and_the_next_phases_run(tmp_path):
    phases = [Phase("hang", "", 2, 2), Phase("boom", "", 1, 30), Phase("fine", "", 1, 30)]
    start = time.monotonic()
    outcomes = gpu_check.run_phases(phases, {"work_dir": str(tmp_path)}, str(tmp_path), budget_s=10,
                                    module=__name__)
    assert [(o["phase"], o["status"]) for o in outcomes] == [("hang", "timeout"), ("boom", "error"), ("fine", "ok")]
    assert time.monotonic() - start < 60
    deadline = time.monotonic() + 10
    pid = int((tmp_path / "child.pid").read_text())
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)
    records = gpu_check.read_records(str(tmp_path / "results.jsonl"))
    assert [r["name"] for r in _kind(records, "check")] == ["fine"]
    assert gpu_check.exit_status(records) == 1


def test_boxes_keep_the_later_phases_minimum():
    phases = [Phase("a", "", 10, 100), Phase("b", "", 20, 50), Phase("c", "", 30, 300)]
    assert gpu_check.phase_boxes(phases, 200, 0, 0) == 100
    assert gpu_check.phase_boxes(phases, 120, 0, 0) == 70  # 120 - 20 - 30
    assert gpu_check.phase_boxes(phases, 60, 0, 0) == 10  # never below its own minimum
    assert gpu_check.phase_boxes(phases, 200, 100, 2) == 100  # the last takes what is left, up to its maximum


def test_targets_and_exit_status_follow_the_records():
    speed = [{"phase": "speed_1b", "kind": "speed", "variant": v, "tokens_per_s": t, "mfu": None}
             for v, t in (("dense", 50_000.0), ("cola", 90_000.0), ("cola_m", 70_000.0))]
    speed.append({"phase": "speed_7b", "kind": "speed", "variant": "cola", "tokens_per_s": 1.0, "mfu": 55.0})
    memory = [{"kind": "memory", "source_phase": "speed_1b", "variant": "cola", "measured_activations_gib": 10.0,
               "error": 0.05}, {"kind": "memory", "source_phase": "speed_1b", "variant": "cola_m",
                                "measured_activations_gib": 2.0, "error": -0.2}]
    targets = {t["name"]: t for t in gpu_check.evaluate_targets(speed + memory)}
    assert targets["CoLA-1B tokens/s (micro-batch 32 x 256)"]["status"] == "met"
    assert targets["CoLA/dense throughput, 1B shapes"]["value"] == pytest.approx(1.8)
    assert targets["CoLA-M/none throughput, 1B shapes"]["status"] == "missed"
    assert targets["CoLA-M/none activation memory, 1B shapes"]["value"] == pytest.approx(0.2)
    assert targets["CoLA MFU, 7B shapes (%)"]["status"] == "met"
    assert targets["CoLA/dense throughput, 7B shapes (4 layers)"]["status"] == "not measured"
    assert targets["largest |predicted - measured| / measured peak memory (eager runs)"]["status"] == "missed"
    ok = [{"kind": "phase", "status": "ok"}, {"kind": "check", "status": "passed"}]
    assert gpu_check.exit_status(ok) == 0
    assert gpu_check.exit_status(ok + [{"kind": "check", "status": "failed"}]) == 1
    assert gpu_check.exit_status(ok + [{"kind": "check", "status": "skipped"}]) == 0
    assert gpu_check.exit_status(ok + [{"kind": "phase", "status": "timeout"}]) == 1


def test_speed_rows_carry_the_planned_step_time_and_the_summary_its_ratio():
    import torch

    from cola_megatron.analysis import bench, gpu_phases
    from cola_megatron.config import load_config

    base = load_config("configs/cola/llama_1b.yaml", ["data.mock=true", "data.tokenizer=null"])
    cfg = bench.variant_config(base, "dense", 32, 13, None, "bf16", None)  # speed_1b's dense run
    predicted = gpu_phases.predicted_step(cfg, torch.device("cpu"))  # no GPU: the H100 SXM peak
    assert predicted["predicted_step_ms"] == pytest.approx(sum(predicted["predicted_breakdown_ms"].values()))
    row = {"phase": "speed_1b", "kind": "speed", "variant": "dense", "params_m": 1339.1, "tokens_per_s": 1.0,
           "tflops_per_gpu": 1.0, "step_ms": 2 * predicted["predicted_step_ms"], **predicted}
    summary = gpu_check.format_summary([row], "tools/gpu_check.py")
    assert "| measured / predicted |" in summary and f"| {predicted['predicted_step_ms']:.1f} | 2.00 |" in summary


def test_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    assert gpu_check.main(["--cpu", "--out", str(tmp_path / "out"), "--phases", "speed,quality"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gpu-check: error: --phases: unknown phases ['speed']. Fix: choose from "
                   + ", ".join(gpu_check.PHASE_NAMES)]
    assert not (tmp_path / "out").exists()
