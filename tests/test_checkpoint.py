"""Checkpoints: exact resume, resharding, crash safety, preemption, retention and bad input.

Several cases share one launched process group (start-up dominates on a small CPU); the subprocess tests run the
real ``cola-train`` command line.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.distributed import run_distributed
from tests.numerics import TRAJECTORY_ADAM_EPS, assert_same_trajectory

STEPS = 10


def _cfg(save_dir=None, iters=STEPS, load_dir=None, save_interval=0, arch="cola", **extra):
    from cola_megatron.config import config_from_dict

    checkpoint = {k: extra.pop(k) for k in ("async_save", "keep_last", "load_optimizer") if k in extra}
    train = {"precision": "fp32", **{k: extra.pop(k) for k in ("exit_duration_minutes", "precision") if k in extra}}
    parallel = extra
    model = dict(arch=arch, hidden_size=64, ffn_hidden_size=128, num_layers=4, num_attention_heads=4, rank=16,
                 vocab_size=256, seq_length=32, cola_init_std=0.3)
    return config_from_dict({
        "model": model,
        "parallel": parallel,
        "train": dict(micro_batch_size=2, global_batch_size=8, train_iters=iters, eval_iters=0,
                      seed=7, **train),
        # A fixed schedule length, so a run stopped at 5 and resumed to 10 follows the same LR curve.
        "optimizer": dict(lr=3e-3, warmup_iters=2, decay_iters=STEPS, adam_eps=TRAJECTORY_ADAM_EPS),
        "data": dict(mock=True),
        "checkpoint": dict(save_dir=save_dir, load_dir=load_dir, save_interval=save_interval, **checkpoint),
        "logging": dict(log_interval=100),
    })


def _weights(trainer):
    from megatron.core.utils import unwrap_model

    # numpy arrays travel back to the test process by value (tensors would be shared-memory handles)
    return {k: v.detach().float().cpu().numpy().copy() for chunk in unwrap_model(trainer.model)
            for k, v in chunk.state_dict().items() if v is not None and hasattr(v, "detach")}


def _train(cfg):
    import torch.distributed as dist

    from cola_megatron.training.run import run

    trainer = run(cfg, log=False)
    dist.barrier()
    return trainer


def _straight_vs_resumed(root, layout):
    """10 iterations straight, and 5 + resume + 5 (the resumed run is a fresh model, optimizer and scheduler)."""
    straight = _train(_cfg(**{k: v for k, v in layout.items() if k != "async_save"}))
    save_dir = os.path.join(root, "run")
    first = _train(_cfg(save_dir, iters=5, save_interval=5, **layout))
    second = _train(_cfg(save_dir, save_interval=5, **layout))
    return {"straight": straight.history, "resumed": first.history + second.history,
            "resumed_at": second.history and len(first.history),
            "weights_straight": _weights(straight), "weights_resumed": _weights(second)}


def _tp2_pp2_then_other_layouts(root):
    out = _straight_vs_resumed(root, dict(tensor_parallel=2, pipeline_parallel=2))
    # The iteration-5 checkpoint saved at TP2 PP2, resumed at TP1 PP2 DP2 (the same 4 processes).
    ckpt = os.path.join(root, "run", "iter_0000005")
    out["TP1-PP2-DP2"] = _train(_cfg(load_dir=ckpt, iters=6, pipeline_parallel=2)).history
    out["TP1-PP2-VP2-DP2"] = _train(_cfg(load_dir=ckpt, iters=6, pipeline_parallel=2, virtual_pipeline=2)).history
    return out


def _dp2_cases(root):
    return {"DP2-distopt-async": _straight_vs_resumed(os.path.join(root, "distopt"),
                                                      dict(use_distributed_optimizer=True, async_save=True)),
            # bf16 under Float16Module with megatron's mixed-precision optimizer (fp32 master copies)
            "DP2-bf16": _straight_vs_resumed(os.path.join(root, "bf16"), dict(precision="bf16"))}


def _single_process_cases(root, tp2_pp2_checkpoint):
    """TP1 PP1 resume from the TP2 PP2 checkpoint (full and model-only), load_model_weights, the wall-clock
    limit, and a NaN model that is refused and leaves nothing on disk."""
    import numpy as np
    import torch

    from cola_megatron.errors import TrainingStopped
    from cola_megatron.training.checkpoint import load_model_weights
    from cola_megatron.training.trainer import Trainer

    tp1_dir = os.path.join(root, "tp1")
    resumed = _train(_cfg(tp1_dir, load_dir=tp2_pp2_checkpoint, iters=6))
    out = {"TP1-PP1": resumed.history,
           "TP1-PP1-model-only": _train(_cfg(load_dir=tp2_pp2_checkpoint, iters=6, load_optimizer=False)).history}
    fresh = Trainer(_cfg(), resumed.device, log=False)
    load_model_weights(tp1_dir, fresh.model)  # a save_dir: its `latest` (iteration 6) is read
    expected, got = _weights(resumed), _weights(fresh)
    out["load_model_weights"] = expected.keys() == got.keys() and all(
        np.array_equal(v, got[k]) for k, v in expected.items())

    out["weights_only"] = _weights_only_refusal(root, fresh)

    nan_dir = os.path.join(root, "nan")
    trainer = _train(_cfg(nan_dir, iters=STEPS, exit_duration_minutes=1e-6))
    out["time_limit_history"] = len(trainer.history)
    with torch.no_grad():
        next(trainer.model[0].parameters()).fill_(float("nan"))
    try:
        trainer.checkpoint.save()
        out["nan"] = "saved"
    except TrainingStopped as e:
        out["nan"] = str(e)
    out["nan_dir"] = sorted(os.listdir(nan_dir))
    return out


def _weights_only_refusal(root, trainer):
    """A checkpoint with model weights only (as conversion writes) needs checkpoint.load_optimizer=false."""
    from megatron.core import dist_checkpointing

    from cola_megatron.training.checkpoint import (CheckpointError, checkpoint_name, model_sharded_state_dict,
                                                   plan_resume, write_config)

    path = os.path.join(root, "weights", checkpoint_name(0))
    os.makedirs(path)
    sharded = model_sharded_state_dict(trainer.model)
    sharded.update(train_state={"iteration": 0}, scheduler={"num_steps": 0}, layout=None, format_version=1)
    dist_checkpointing.save(sharded, path)
    write_config(path, _cfg())
    try:
        plan_resume(_cfg(load_dir=path))
        return "accepted"
    except CheckpointError as e:
        plan_resume(_cfg(load_dir=path, load_optimizer=False))  # the fix it names works
        return str(e)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    tp2pp2 = run_distributed(_tp2_pp2_then_other_layouts, 4, os.path.join(root, "tp2pp2"))[0]
    dp2 = run_distributed(_dp2_cases, 2, os.path.join(root, "dp2"))[0]
    single = run_distributed(_single_process_cases, 1, os.path.join(root, "single"),
                             os.path.join(root, "tp2pp2", "run", "iter_0000005"))[0]
    return {"root": root, "TP2-PP2": tp2pp2, **dp2, "single": single}


@pytest.mark.parametrize("layout", ["TP2-PP2", "DP2-distopt-async", "DP2-bf16"])
def test_resume_is_bit_identical(runs, layout):
    r = runs[layout]
    assert len(r["straight"]) == STEPS and r["resumed_at"] == 5
    assert r["resumed"] == r["straight"], f"losses differ after resume: {r['resumed']} vs {r['straight']}"
    assert r["weights_resumed"].keys() == r["weights_straight"].keys()
    for key, value in r["weights_straight"].items():
        assert np.array_equal(value, r["weights_resumed"][key]), key


@pytest.mark.parametrize("layout", ["TP1-PP1", "TP1-PP1-model-only", "TP1-PP2-DP2", "TP1-PP2-VP2-DP2"])
def test_resume_at_another_layout(runs, layout):
    history = runs["single"][layout] if layout.startswith("TP1-PP1") else runs["TP2-PP2"][layout]
    assert len(history) == 1
    assert_same_trajectory(history, runs["TP2-PP2"]["straight"][5:6])


def test_checkpoint_layout_on_disk(runs):
    from cola_megatron.training.checkpoint import latest_checkpoint, read_checkpoint_config

    save_dir = os.path.join(runs["root"], "tp2pp2", "run")
    assert sorted(os.listdir(save_dir)) == ["iter_0000005", "iter_0000010", "latest"]
    assert open(os.path.join(save_dir, "latest")).read().strip() == "iter_0000010"
    assert latest_checkpoint(save_dir) == os.path.join(save_dir, "iter_0000010")
    cfg = read_checkpoint_config(latest_checkpoint(save_dir))
    assert cfg.parallel.tensor_parallel == 2 and cfg.model.hidden_size == 64
    # The async save committed too (its `latest` moved after the background writers finished).
    dp2 = os.path.join(runs["root"], "dp2", "distopt", "run")
    assert open(os.path.join(dp2, "latest")).read().strip() == "iter_0000010"


def test_load_model_weights_reads_latest(runs):
    assert runs["single"]["load_model_weights"] is True


def test_weights_only_checkpoint_needs_load_optimizer_false(runs):
    assert "model weights only" in runs["single"]["weights_only"]
    assert "checkpoint.load_optimizer=false" in runs["single"]["weights_only"]


def test_wall_clock_limit_saves_and_stops(runs):
    assert runs["single"]["time_limit_history"] == 1  # stopped after its first iteration, and saved it below


def test_nan_model_is_never_saved(runs):
    single = runs["single"]
    assert "NaN/inf" in single["nan"] and "refusing to save" in single["nan"]
    # Only the finished run's own checkpoint (iteration 1) is there; nothing was written for the NaN model.
    assert single["nan_dir"] == ["iter_0000001", "latest"]


# ------------------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the fix, before any heavy work, and nothing on disk changes


def _snapshot(directory):
    digest = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return digest


@pytest.fixture
def saved_copy(runs, tmp_path):
    src = os.path.join(runs["root"], "tp2pp2", "run")
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_bad_resume_input_fails_clearly(saved_copy, tmp_path):
    from cola_megatron.training.checkpoint import CheckpointError, plan_resume

    before = _snapshot(saved_copy)
    cases = []
    cases.append((_cfg(load_dir=str(tmp_path / "nowhere")), ["does not exist", "checkpoint.load_dir"]))
    cases.append((_model_mismatch_cfg(str(saved_copy)), ["model.hidden_size: checkpoint 64, config 128",
                                                         "model.rank: checkpoint 16, config 32", "Fix:"]))
    cases.append((_cfg(str(saved_copy), use_distributed_optimizer=True),
                  ["holds fp32 optimizer state", "parallel.use_distributed_optimizer=false",
                   "checkpoint.load_optimizer=false"]))
    for cfg, expected in cases:
        with pytest.raises(CheckpointError) as err:
            plan_resume(cfg)
        for text in expected:
            assert text in str(err.value)

    (saved_copy / "latest").write_text("garbage\x00\n")
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint.*echo iter_0000010"):
        plan_resume(_cfg(str(saved_copy)))
    (saved_copy / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"no `latest` file"):
        plan_resume(_cfg(str(saved_copy)))
    (saved_copy / "latest").write_text("iter_0000010\n")
    assert _snapshot(saved_copy) == before


def _model_mismatch_cfg(save_dir):
    cfg = _cfg(save_dir)
    cfg.model.hidden_size, cfg.model.rank = 128, 32
    return cfg


# ------------------------------------------------------------------------------------------------------------
# The command line: SIGKILL in the middle of a save, SIGTERM (preemption)

_CLI = [sys.executable, "-m", "cola_megatron.train", "--config", "configs/demo.yaml", "data.mock=true",
        "data.train_paths=[]", "data.valid_paths=[]", "data.tokenizer=null", "model.hidden_size=64",
        "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4", "model.rank=16",
        "model.vocab_size=256", "model.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.eval_iters=0", "optimizer.warmup_iters=1", "logging.log_dir=null", "logging.log_interval=1"]


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(save_dir, *overrides, env=None):
    """Run cola-train in its own process group. Output goes to files: a SIGKILLed run leaves megatron's
    checkpoint helper processes behind holding inherited pipes; they are ended with the group afterwards."""
    out_path, err_path = f"{save_dir}.stdout", f"{save_dir}.stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen([*_CLI, f"checkpoint.save_dir={save_dir}", *overrides], stdout=out, stderr=err,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return _Result(proc.returncode, open(out_path).read(), open(err_path).read())


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    save_dir = tmp_path / "run"
    common = ["checkpoint.save_interval=5", "checkpoint.keep_last=1", "optimizer.decay_iters=20"]
    killed = _cli(save_dir, "train.train_iters=10", *common, env={"COLA_FAULT_SIGKILL": "save_written:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (save_dir / "latest").read_text().strip() == "iter_0000005"
    assert not (save_dir / "iter_0000010" / "cola_config.yaml").exists()  # the interrupted save never committed

    before = _snapshot(save_dir)
    wrong = _cli(save_dir, "train.train_iters=15", "model.hidden_size=128", *common)
    assert wrong.returncode == 2
    assert "cola-train: error:" in wrong.stderr and "model.hidden_size: checkpoint 64, config 128" in wrong.stderr
    assert "Traceback" not in wrong.stderr and _snapshot(save_dir) == before

    resumed = _cli(save_dir, "train.train_iters=15", *common)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "iter_0000005 at iteration 5" in resumed.stdout
    assert (save_dir / "latest").read_text().strip() == "iter_0000015"
    # keep_last=1 keeps the newest, and never the checkpoint this run resumed from
    assert sorted(os.listdir(save_dir)) == ["iter_0000005", "iter_0000015", "latest"]


def test_sigterm_saves_and_exits_zero(tmp_path):
    save_dir = tmp_path / "run"
    proc = subprocess.Popen([*_CLI, f"checkpoint.save_dir={save_dir}", "train.train_iters=100000",
                             "checkpoint.save_interval=0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:
            if "] iter " in line:  # "[timestamp] iter N/T | ..."
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    stopped = [l for l in out.splitlines() if "stopped at iteration" in l]
    assert stopped and "(signal)" in stopped[0], out
    iteration = int(stopped[0].split("stopped at iteration ")[1].split()[0])
    assert (save_dir / "latest").read_text().strip() == f"iter_{iteration:07d}"
    assert (save_dir / f"iter_{iteration:07d}" / "cola_config.yaml").exists()


@pytest.mark.parametrize("keep", [None, 2])
def test_retention_prunes_superseded_checkpoints_whatever_keep_last(tmp_path, keep):
    from cola_megatron.training.checkpoint.paths import CONFIG_FILE, apply_retention

    for name in ("iter_0000002", "iter_0000004", "iter_0000004.replaced-1", "iter_0000006", "iter_0000008.replaced-1"):
        os.makedirs(tmp_path / name)
        for f in ("metadata.json", CONFIG_FILE):
            (tmp_path / name / f).write_text("{}")
    apply_retention(str(tmp_path), "iter_0000006", keep)
    left = sorted(os.listdir(tmp_path))
    kept = ["iter_0000002", "iter_0000004", "iter_0000006"][-keep:] if keep else \
        ["iter_0000002", "iter_0000004", "iter_0000006"]
    # iter_4's superseded copy goes (the re-run saved past it); iter_8's stays until the re-run gets there
    assert left == sorted(kept + ["iter_0000008.replaced-1"])
