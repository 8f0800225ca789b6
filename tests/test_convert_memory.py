"""cola-convert at scale: memory bounded by layers, not model size; dtype kept; a killed reshard rank.

The same conversions of an N-layer and a 2N-layer CoLA model (hundreds of MB each, bf16) in the reference
implementation's layout: from-hf, and to-hf back, and reshard to TP2 of a run's checkpoint made from it (one training
step: bf16 weights, fp32 main weights and Adam's two moments, 14 bytes a parameter), each a real command whose
processes are sampled for what the kernel cannot reclaim (Pss_Anon + Pss_Shmem, :mod:`cola_megatron.convert.measure`).
A tool that held the model would differ by the N extra layers (N x 38 MB of weights, N x 267 MB of training state);
a streaming one by less than one layer.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cola_megatron.convert import measure

LAYERS = 6
# Layers of 40 MB (bf16): the peaks of a step vary by up to ~20 MB from run to run (heap and sampling), so a bound of
# one layer must be well above that.
SHAPE = dict(vocab_size=8192, hidden_size=2048, intermediate_size=5504, num_attention_heads=16, rank=512)
STEPS = ("from-hf", "reshard", "to-hf")
# One training step from the converted weights, on mock data, saved with its optimizer state.
ONE_STEP = ["data.mock=true", "data.train_paths=[]", "data.valid_paths=[]", "data.tokenizer=null",
            "train.train_iters=1", "train.global_batch_size=1", "train.micro_batch_size=1", "train.eval_iters=0",
            "model.seq_length=16", "optimizer.warmup_iters=0", "logging.tensorboard=false",
            "checkpoint.load_optimizer=false", "checkpoint.save_interval=1"]


def _cli(*argv):
    return [sys.executable, "-m", "cola_megatron.convert.cli", *argv]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _train_one_step(weights, run_dir):
    config = os.path.join(weights, "iter_0000000", "cola_config.yaml")
    done = subprocess.run([sys.executable, "-m", "cola_megatron.train", "--config", config, *ONE_STEP,
                           f"checkpoint.load_dir={weights}", f"checkpoint.save_dir={run_dir}"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def _stored_layer_bytes(ckpt_dir, layers):
    """Bytes a checkpoint stores per transformer layer (weights and any optimizer state)."""
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata
    return sum(v.size.numel() * v.properties.dtype.itemsize for k, v in stored.items() if "decoder.layers." in k) \
        // layers


def _layer_bytes(fields, dtype):
    from cola_megatron.hf.configuration_cola import ColaConfig
    from cola_megatron.hf.modeling_cola import expected_parameter_shapes

    shapes = expected_parameter_shapes(ColaConfig(**{k: v for k, v in fields.items() if k != "model_type"}))
    return sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("model.layers.0.")) * dtype.itemsize


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_memory")
    results = {}
    for layers in (LAYERS, 2 * LAYERS):
        fields = measure.reference_config("7b", layers, **SHAPE)
        work = root / str(layers)
        model_bytes = measure.write_random_reference(str(work / "reference"), fields, torch.bfloat16,
                                                     max_shard_size="100MB")
        peaks = {}
        for step, argv in zip(STEPS, (
                ["from-hf", work / "reference", work / "ckpt"],
                ["reshard", work / "run", work / "run_tp2", "--tp", "2"],
                ["to-hf", work / "ckpt", work / "hf", "--no-tokenizer", "--max-shard-size", "100MB"])):
            if step == "reshard":
                _train_one_step(str(work / "ckpt"), str(work / "run"))
            done, peak, _ = measure.run_measured(_cli(*map(str, argv)), env=_env(), timeout=600)
            assert done.returncode == 0, done.stderr[-2000:]
            peaks[step] = peak
        run_layer = _stored_layer_bytes(str(work / "run" / "iter_0000001"), layers)
        results[layers] = dict(work=work, fields=fields, peaks=peaks, model_bytes=model_bytes, run_layer=run_layer)
    return results


def test_memory_is_bounded_by_layers_not_model_size(conversions):
    small, large = conversions[LAYERS], conversions[2 * LAYERS]
    layer = _layer_bytes(small["fields"], torch.bfloat16)
    assert large["model_bytes"] - small["model_bytes"] == LAYERS * layer > 100 * 2**20  # what holding it would add
    assert small["run_layer"] == large["run_layer"] == 7 * layer  # bf16 weights + three fp32 tensors per parameter
    report = {s: (small["peaks"][s] / 2**20, large["peaks"][s] / 2**20) for s in STEPS}
    print(f"peak MB at {LAYERS} / {2 * LAYERS} layers (one layer: {layer / 2**20:.1f} MB of weights, "
          f"{small['run_layer'] / 2**20:.1f} MB of training state): "
          + ", ".join(f"{s} {a:.0f} / {b:.0f}" for s, (a, b) in report.items()))
    for step in STEPS:
        # One layer of what the step moves: weights for from-hf and to-hf; weights and optimizer state for the
        # run's reshard (holding the model would add N of them).
        bound = small["run_layer"] if step == "reshard" else layer
        assert abs(large["peaks"][step] - small["peaks"][step]) < bound, (step, report, bound / 2**20)


def test_round_trip_is_bit_exact_and_keeps_bf16(conversions):
    """reference layout → torch_dist → Hugging Face: every tensor identical, bf16 throughout; the run's
    checkpoint resharded to TP2 keeps bf16 weights and fp32 optimizer state, written by two ranks."""
    import json

    from megatron.core import dist_checkpointing

    from cola_megatron.convert.hf_io import WeightReader
    from cola_megatron.training import checkpoint as ckpt_lib

    work = conversions[LAYERS]["work"]
    source, exported = WeightReader(str(work / "reference")), WeightReader(str(work / "hf"))
    assert set(source.shapes) == set(exported.shapes)
    for name in source.shapes:
        a, b = source.get(name), exported.get(name)
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), name
    config = json.loads((work / "hf" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    stored = dist_checkpointing.load_tensors_metadata(ckpt_lib.resolve_checkpoint(str(work / "ckpt")))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    for run in ("run", "run_tp2"):
        stored = dist_checkpointing.load_tensors_metadata(ckpt_lib.resolve_checkpoint(str(work / run)))
        weights = {t.dtype for k, t in stored.items() if not k.startswith("optimizer.")}
        optimizer = {t.dtype for k, t in stored.items() if k.startswith("optimizer.")}
        assert weights == {torch.bfloat16} and optimizer == {torch.float32}, run
    resharded = ckpt_lib.resolve_checkpoint(str(work / "run_tp2"))
    assert {f.split("_")[2] for f in os.listdir(resharded) if f.endswith(".distcp")} == {"0", "1"}


def test_to_hf_dtype_override(conversions, tmp_path):
    import json

    from cola_megatron.convert.hf_io import WeightReader

    work = conversions[LAYERS]["work"]
    out = tmp_path / "fp32"
    done = subprocess.run(_cli("to-hf", str(work / "ckpt"), str(out), "--no-tokenizer", "--dtype", "float32"),
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    exported, source = WeightReader(str(out)), WeightReader(str(work / "reference"))
    name = "model.layers.1.mlp.up_proj.cola_b"
    assert exported.get(name).dtype == torch.float32 and torch.equal(exported.get(name), source.get(name).float())


def _rank_processes(pid):
    """The spawned rank processes of ``pid`` (its children but multiprocessing's resource tracker)."""
    ranks = []
    for child in measure.children_of(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "spawn_main" in cmdline:
            ranks.append(child)
    return ranks


def test_a_killed_rank_ends_the_reshard_in_one_line(conversions, tmp_path):
    work = conversions[LAYERS]["work"]
    out = tmp_path / "resharded"
    process = subprocess.Popen(_cli("reshard", str(work / "ckpt"), str(out), "--tp", "2", "--pp", "2"),
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, victim = time.monotonic() + 300, None
    while time.monotonic() < deadline and process.poll() is None:
        ranks = _rank_processes(process.pid)
        writing = out.is_dir() and any(p.name.startswith(".scratch-") for p in out.rglob("*"))
        if len(ranks) == 4 and writing:  # every rank started and writing has begun
            victim = ranks[1]
            os.kill(victim, signal.SIGKILL)
            break
        time.sleep(0.05)
    _, err = process.communicate(timeout=300)
    assert victim is not None, err
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line and "warn" not in line]
    assert process.returncode != 0
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("cola-convert: error:")]
    assert len(errors) == 1 and "killed by SIGKILL" in errors[0] and "Fix:" in errors[0], err
    assert not (out / "latest").exists() and not out.exists()
