"""SIGKILL at every stage of a checkpoint save, sync and async, through the real ``cola-train`` command line.

One chain of runs per mode: each run resumes the save_dir and is killed at its second save at the next fault point
(``cola_megatron.faults``); the last run finishes. Asserted after every kill: no process of the run's tree (its
session) is alive 10 s later, and the next run resumes from the checkpoint ``latest`` named, which is complete.
At the end, every loss any run logged equals, bit for bit, the loss of the same iteration in an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

CLI = [sys.executable, "-m", "cola_megatron.train", "--config", "configs/demo.yaml", "data.mock=true",
       "data.train_paths=[]", "data.valid_paths=[]", "data.tokenizer=null", "model.hidden_size=64",
       "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4", "model.rank=16",
       "model.vocab_size=256", "model.seq_length=32", "train.global_batch_size=8", "train.micro_batch_size=4",
       "train.eval_iters=0", "optimizer.warmup_iters=1", "optimizer.decay_iters=20", "logging.log_interval=1",
       "logging.tensorboard=false", "checkpoint.save_interval=1", "checkpoint.keep_last=2", "data.num_workers=0"]

SYNC_POINTS = ["save_start", "shard_write", "save_committing", "save_before_latest"]
ASYNC_POINTS = ["shard_write", "save_written", "save_committing", "save_before_latest"]
ITERS = 6


def session_processes(sid: int):
    """(pid, command line) of every live process in session ``sid``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid or fields[0] == "Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                found.append((int(name), f.read().replace(b"\0", b" ").decode(errors="replace")[:120]))
        except (OSError, IndexError, ValueError):
            continue
    return found


def run_cli(root, name, *overrides, fault=None, timeout=300):
    """Run cola-train in its own session; after it ends, wait up to 10 s for the rest of its tree to go.
    Returns (exit code, stdout + stderr, processes of the session still alive)."""
    log = os.path.join(root, f"{name}.log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("COLA_FAULT_SIGKILL", None)
    if fault:
        env["COLA_FAULT_SIGKILL"] = fault
    with open(log, "w") as out:
        proc = subprocess.Popen([*CLI, *overrides], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    deadline = time.monotonic() + 10
    alive = session_processes(proc.pid)
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = session_processes(proc.pid)
    for pid, _ in alive:  # never leave them to the next test
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    with open(log) as f:
        return proc.returncode, f.read(), alive


def losses(log_dir):
    """Every (iteration, loss) the runs logged to metrics.jsonl, in order."""
    out = []
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record.get("kind") == "train":
                out.append((record["iteration"], record["loss"]))
    return out


def _chain(root, mode, points):
    from cola_megatron.training.checkpoint import is_complete_checkpoint

    save_dir, log_dir = os.path.join(root, mode), os.path.join(root, f"{mode}-logs")
    common = [f"checkpoint.save_dir={save_dir}", f"logging.log_dir={log_dir}", f"train.train_iters={ITERS}",
              f"checkpoint.async_save={'true' if mode == 'async' else 'false'}"]
    kills = []
    for i, point in enumerate(points):
        code, output, alive = run_cli(root, f"{mode}-{i}-{point}", *common, fault=f"{point}:2")
        latest_file = os.path.join(save_dir, "latest")
        latest = open(latest_file).read().strip() if os.path.exists(latest_file) else None
        kills.append({"point": point, "code": code, "alive": alive, "latest": latest, "output": output[-2000:],
                      "latest_complete": latest is None or is_complete_checkpoint(os.path.join(save_dir, latest)),
                      "latest_mode": os.stat(latest_file).st_mode & 0o777 if latest else None})
    code, output, alive = run_cli(root, f"{mode}-final", *common)
    resumed = re.findall(r"resumed from (\S+) at iteration (\d+)", "".join(
        open(os.path.join(root, f"{mode}-{i}-{p}.log")).read() for i, p in enumerate(points)) + output)
    return {"kills": kills, "final_code": code, "final_output": output[-3000:], "final_alive": alive,
            "resumed": resumed, "losses": losses(log_dir), "save_dir": sorted(os.listdir(save_dir))}


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("faults"))
    ref_common = [f"checkpoint.save_dir={os.path.join(root, 'reference')}",
                  f"logging.log_dir={os.path.join(root, 'reference-logs')}", f"train.train_iters={ITERS}"]
    with ThreadPoolExecutor(3) as pool:
        reference = pool.submit(run_cli, root, "reference", *ref_common)
        sync = pool.submit(_chain, root, "sync", SYNC_POINTS)
        asynchronous = pool.submit(_chain, root, "async", ASYNC_POINTS)
        code, output, _ = reference.result()
        assert code == 0, output[-3000:]
        return {"reference": dict(losses(os.path.join(root, "reference-logs"))), "root": root,
                "sync": sync.result(), "async": asynchronous.result()}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_during_save(chains, mode):
    chain, reference = chains[mode], chains["reference"]
    assert sorted(reference) == list(range(1, ITERS + 1))
    for kill in chain["kills"]:
        assert kill["code"] == -signal.SIGKILL, f"{kill['point']}: not killed\n{kill['output']}"
        assert kill["alive"] == [], f"{kill['point']}: still alive 10 s after the trainer's SIGKILL: {kill['alive']}"
        assert kill["latest_complete"], kill
        assert kill["latest_mode"] in (None, 0o644), kill
    # Each run after a kill resumed from the checkpoint `latest` named when it was killed.
    assert [os.path.basename(p) for p, _ in chain["resumed"]] == [k["latest"] for k in chain["kills"] if k["latest"]]
    assert all(int(it) == int(os.path.basename(p)[5:]) for p, it in chain["resumed"])
    assert chain["final_code"] == 0, chain["final_output"]
    assert chain["final_alive"] == []
    # Bit-identical losses: every logged step of every run, repeated iterations included, and every iteration.
    logged = chain["losses"]
    assert {it for it, _ in logged} == set(reference)
    mismatched = [(it, loss, reference[it]) for it, loss in logged if loss != reference[it]]
    assert mismatched == [], mismatched
    # Retention and temp files: keep_last=2 of the finished run, no `.latest.*` or `.replaced-N` left behind.
    last_resume = os.path.basename(chain["resumed"][-1][0])
    expected = sorted({last_resume, f"iter_{ITERS - 1:07d}", f"iter_{ITERS:07d}", "latest"})
    assert chain["save_dir"] == expected, chain["save_dir"]


# ------------------------------------------------------------------------------------------------------------
# The keys that settle a resume (the refusals themselves are rows of tests/test_bad_input.py's table)


def test_resume_settings_keys(chains):
    """scheduler_from=checkpoint adopts the checkpoint's optimizer section (decay length pinned), =config keeps
    the config's; allow_different_run lets another seed continue the checkpoint."""
    from cola_megatron.config import load_config
    from cola_megatron.training.checkpoint import plan_resume

    save_dir = os.path.join(chains["root"], "reference")

    def cfg(*overrides):
        return load_config("configs/demo.yaml", [*CLI[5:], f"checkpoint.save_dir={save_dir}", *overrides])

    kept = cfg("optimizer.lr=1e-4", "optimizer.decay_iters=null", "train.train_iters=50",
               "checkpoint.scheduler_from=checkpoint")
    assert plan_resume(kept) is not None
    assert (kept.optimizer.lr, kept.optimizer.decay_iters) == (3e-3, 20)
    applied = cfg("optimizer.lr=1e-4", "checkpoint.scheduler_from=config")
    plan_resume(applied)
    assert applied.optimizer.lr == 1e-4
    assert plan_resume(cfg("train.seed=99", "checkpoint.allow_different_run=true")) is not None
