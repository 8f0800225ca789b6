"""Non-finite steps: never applied, logged as NaN, counted; a streak stops the run without burying the good
checkpoints, and the advice of the stop message works (through the real command line)."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.test_faults import run_cli

NAN_RUN = ["optimizer.lr=1e6", "optimizer.clip_grad=0", "checkpoint.save_interval=1", "checkpoint.keep_last=2",
           "train.train_iters=12"]


def _records(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"train"' in line]


def _error_lines(output):
    return [line for line in output.splitlines() if line.startswith("cola-train: error:")]


@pytest.fixture(scope="module")
def streak(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("nan"))
    save_dir, log_dir = os.path.join(root, "run"), os.path.join(root, "logs")
    code, output, alive = run_cli(root, "streak", f"checkpoint.save_dir={save_dir}", f"logging.log_dir={log_dir}",
                                  *NAN_RUN)
    after_stop = sorted(os.listdir(save_dir))
    latest = open(os.path.join(save_dir, "latest")).read().strip()
    records = _records(log_dir)
    # The stop message's advice, followed literally: a lower LR, and the key that lets it apply on resume.
    refused, refused_output, _ = run_cli(root, "lower-lr-only", f"checkpoint.save_dir={save_dir}",
                                         *NAN_RUN, "optimizer.lr=1e-3")
    resumed_code, resumed_output, _ = run_cli(
        root, "advice", f"checkpoint.save_dir={save_dir}", f"logging.log_dir={log_dir}-advice", *NAN_RUN,
        "optimizer.lr=1e-3", "checkpoint.scheduler_from=config", "train.train_iters=4")
    return dict(code=code, output=output, alive=alive, after_stop=after_stop, latest=latest, records=records,
                refused=refused, refused_output=refused_output, resumed_code=resumed_code,
                resumed_output=resumed_output, resumed_records=_records(f"{log_dir}-advice"),
                final=sorted(os.listdir(save_dir)))


def test_streak_stops_with_one_line_that_names_the_fix(streak):
    assert streak["code"] == 1, streak["output"][-3000:]
    (line,) = _error_lines(streak["output"])
    assert "6 steps in a row had a NaN/inf loss or gradient norm (iterations 3-8, train.max_nan_skips=5)" in line
    assert "`latest` now names iter_0000001" in line and "checkpoint.scheduler_from=config" in line
    assert "Traceback" not in streak["output"] and streak["alive"] == []


def test_nonfinite_steps_are_logged_as_nan_and_counted(streak):
    by_iteration = {r["iteration"]: r for r in streak["records"]}
    assert sorted(by_iteration) == list(range(1, 9))
    for it in range(3, 9):
        assert math.isnan(by_iteration[it]["loss"]), by_iteration[it]  # NaN in metrics.jsonl, never 0.0
        assert by_iteration[it]["skipped"] == it - 2
    assert all(math.isfinite(by_iteration[it]["loss"]) for it in (1, 2))
    assert "loss nan" in streak["output"] and "loss 0.0000" not in streak["output"]


def test_no_checkpoint_from_inside_the_streak_and_none_lost(streak):
    # Saved after iterations 1 and 2; nothing from the streak (3-8); keep_last=2 deleted nothing.
    assert streak["after_stop"] == ["iter_0000001", "iter_0000002", "latest"]
    # iter_0000002 holds the weights whose step 3 was NaN: `latest` falls back to the checkpoint before it.
    assert streak["latest"] == "iter_0000001"


def test_the_advice_works(streak):
    assert streak["refused"] == 2
    (line,) = _error_lines(streak["refused_output"])
    assert "optimizer.lr: checkpoint 1000000.0, config 0.001" in line and "checkpoint.scheduler_from" in line
    assert streak["resumed_code"] == 0, streak["resumed_output"][-3000:]
    assert "resumed from" in streak["resumed_output"] and "iter_0000001 at iteration 1" in streak["resumed_output"]
    records = streak["resumed_records"]
    assert [r["iteration"] for r in records] == [2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records), records
    # The logged LR is the config's schedule (warm-up 1, cosine to 10 % over decay_iters=20), not the checkpoint's.
    lr, low = 1e-3, 1e-4
    expected = low + 0.5 * (math.cos(math.pi * (2 - 1) / (20 - 1)) + 1) * (lr - low)
    assert records[0]["lr"] == pytest.approx(expected, rel=1e-9)
    # The superseded iter_0000002 went once the rerun saved past it; keep_last=2 plus nothing else.
    assert streak["final"] == ["iter_0000001", "iter_0000003", "iter_0000004", "latest"]


def test_without_save_dir_a_run_ending_in_a_streak_exits_nonzero(tmp_path):
    code, output, _ = run_cli(str(tmp_path), "no-save-dir", "checkpoint.save_dir=null", "checkpoint.save_interval=0",
                              "checkpoint.keep_last=null", "logging.log_dir=null", "optimizer.lr=1e6",
                              "optimizer.clip_grad=0", "train.train_iters=5", "train.max_nan_skips=10")
    assert code == 1, output[-3000:]
    (line,) = _error_lines(output)
    assert "the run ended inside the streak" in line and "nothing was saved" in line and "optimizer.lr" in line


class _Optimizer:
    """The stages of a megatron optimizer step, recording which ran."""

    def __init__(self, norm):
        self.norm, self.stepped = norm, False

    def prepare_grads(self):
        return False

    def get_grad_norm(self):
        return self.norm

    def get_parameters(self):
        return []

    def step_with_ready_grads(self):
        self.stepped = True
        return True


@pytest.mark.parametrize("norm", [float("inf"), float("nan")])
def test_a_nonfinite_gradient_norm_is_never_applied(norm):
    from cola_megatron.compat.megatron import step_if_finite

    for bf16 in (False, True):
        opt = _Optimizer(norm)
        applied, got = step_if_finite(opt, clip=0.0, bf16_grads=bf16)
        assert not applied and not opt.stepped and not math.isfinite(got)
    opt = _Optimizer(2.0)
    assert step_if_finite(opt, clip=0.0) == (True, 2.0) and opt.stepped
