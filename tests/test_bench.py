"""The benchmark harness on CPU with tiny shapes (timings are printed, never asserted)."""

import json
import subprocess
import sys

import pytest

from tests.numerics import assert_same_trajectory


def _bench(*args, timeout=600):
    return subprocess.run([sys.executable, "tools/bench.py", "--tiny", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_json = tmp_path_factory.mktemp("bench") / "bench.json"
    # cola_m_compile is left to tests/test_cola_m.py, which also checks what dynamo compiled.
    out = _bench("--variants", "cola,dense,cola_full,cola_m,cola_compile", "--steps", "2", "--warmup", "1",
                 "--micro-batch", "2", "--json", str(out_json))
    assert out.returncode == 0, out.stderr
    return out.stdout, json.loads(out_json.read_text())


def test_report_has_every_variant_and_ratios(tiny_run):
    stdout, data = tiny_run
    assert [r["variant"] for r in data["results"]] == ["cola", "dense", "cola_full", "cola_m", "cola_compile"]
    for line in ("ratio dense/cola: throughput", "ratio cola_full/cola: throughput", "ratio cola_m/cola: throughput"):
        assert line in stdout
    assert "torch" in data["header"] and "megatron-core" in data["header"] and "device" in data["header"]
    for r in data["results"]:
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["tflops_per_gpu"] > 0


def test_variants_are_the_models_they_claim(tiny_run):
    _, data = tiny_run
    by = {r["variant"]: r for r in data["results"]}
    assert by["cola"]["params_m"] < by["dense"]["params_m"]
    # Same seed and data for every variant: recomputation must not change a single loss, the dense model must.
    assert by["cola_full"]["losses"] == by["cola"]["losses"]
    assert_same_trajectory(by["cola_m"]["losses"], by["cola"]["losses"], what="cola_m")
    assert_same_trajectory(by["cola_compile"]["losses"], by["cola"]["losses"], what="cola_compile")
    assert by["dense"]["losses"] != by["cola"]["losses"]
    assert len(by["cola"]["losses"]) == 3  # warm-up + timed steps


def test_unknown_variant_is_a_clear_error():
    out = _bench("--variants", "cola,sparse", timeout=120)
    assert out.returncode == 2
    assert "unknown variant 'sparse'" in out.stderr
