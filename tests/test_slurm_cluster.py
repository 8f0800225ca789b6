"""The Slurm launch path against real daemons (tests/slurm_cluster.py): a CPU job rendered by cola-plan from the
shipped template, submitted with sbatch, on one node with 2 gloo processes (TP2 + SP).

- a short job that runs to the end reaches COMPLETED with the losses of a single-process run;
- one job then goes through every stop path in turn, resuming each time from what the previous part saved: its
  time limit (Slurm's own SIGUSR1 ahead of it) → save → requeue → resume; `scancel` → save → CANCELLED; a
  resubmission resumes; one task SIGKILLed → FAILED within a bounded time; a resubmission resumes from the last
  complete checkpoint and reaches COMPLETED. Its per-iteration losses over all parts equal the uninterrupted run's.
- every training process that Slurm stops gets exactly one SIGTERM (counted in the processes themselves).

Skipped with the reason when Slurm is missing and cannot be installed (root with apt-get installs it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import pytest

from tests import slurm_cluster
from tests.numerics import assert_same_trajectory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = "configs/demo.yaml"
ITERS = 500  # the interrupted run: long enough to outlast the time-limit signal's window
SHORT_ITERS = 20  # the run to the end
SAVE_INTERVAL = 50
# The demo config on mock data, shrunk to a few seconds of CPU time (as in test_launch.py).
MODEL = [
    "data.mock=true", "data.train_paths=[]", "data.valid_paths=[]", "data.tokenizer=null",
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
    "model.rank=16", "model.seq_length=32", "model.vocab_size=256", "train.global_batch_size=8",
    "train.micro_batch_size=2", "train.eval_iters=0", "optimizer.warmup_iters=1", "logging.log_interval=1",
    "logging.tensorboard=false",
]
LAYOUT = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]

# Slurm checks time limits every 30 s and sends the signal up to that much early: --signal=B:USR1@85 on a 2-minute
# limit arrives 5-35 s after the start, the limit itself at least 85 s after the signal, time for a slow start-up
# and the save. The run lasts longer than the signal's window.
TIME_LIMIT = ["--time=2", "--signal=B:USR1@85"]
JOB_TIMEOUT = 300

# Counts, in every training process, the SIGTERMs that reach the stop handler cola-train installs.
SIGNAL_PROBE = '''
import os, signal

_log = os.environ.get("COLA_TEST_SIGNAL_LOG")
if _log:
    _install = signal.signal

    def _counting(sig, handler):
        if sig == signal.SIGTERM and callable(handler):
            inner = handler

            def handler(signum, frame):
                with open(os.path.join(_log, "%d.sig" % os.getpid()), "a") as f:
                    f.write("%s %s %s\\n" % (os.environ.get("RANK", "-"), os.environ.get("SLURM_JOB_ID", "-"),
                                             os.environ.get("SLURM_RESTART_COUNT", "0")))
                return inner(signum, frame)
        return _install(sig, handler)

    signal.signal = _counting
'''


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    try:
        cluster = slurm_cluster.start(str(root))
    except slurm_cluster.Unavailable as e:
        pytest.skip(f"no Slurm cluster: {e}")
    if cluster.install_seconds:
        print(f"\ninstalled slurm-wlm and munge in {cluster.install_seconds:.0f} s")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def job_script(tmp_path_factory):
    """The CPU job as `cola-plan --device cpu --render-slurm` writes it from launch/slurm/template.sbatch."""
    from cola_megatron.analysis import plan

    path = tmp_path_factory.mktemp("render") / "cpu.sbatch"
    assert plan.main(["--config", DEMO, "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu",
                      "--gpu-memory-gib", "8", "--evaluate", "--job-name", "cola-cpu", "--render-slurm", str(path),
                      *MODEL, *LAYOUT]) == 0
    text = path.read_text()
    assert not [line for line in text.splitlines() if line.startswith("#SBATCH --gpu")]
    assert "NPROC_PER_NODE='2'" in text and "parallel.tensor_parallel=2" in text
    return str(path)


def _extra(iters: int) -> List[str]:
    return [*MODEL, f"train.train_iters={iters}", f"checkpoint.save_interval={SAVE_INTERVAL}",
            "checkpoint.keep_last=100"]


def _submit(slurm, script, run_dir, *sbatch_args, iters: int = ITERS) -> int:
    os.makedirs(os.path.join(run_dir, "signals"), exist_ok=True)
    probe = os.path.join(run_dir, "probe")
    os.makedirs(probe, exist_ok=True)
    with open(os.path.join(probe, "sitecustomize.py"), "w") as f:
        f.write(SIGNAL_PROBE)
    pythonpath = os.pathsep.join(p for p in (probe, os.environ.get("PYTHONPATH")) if p)
    env = {"RUN_DIR": run_dir, "EXTRA": " ".join(_extra(iters)), "PYTHON": sys.executable, "PYTHONPATH": pythonpath,
           "COLA_TEST_SIGNAL_LOG": os.path.join(run_dir, "signals")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return slurm.sbatch(script, f"--output={run_dir}/slurm-%j.out", *sbatch_args, cwd=REPO, env=env)


def _records(run_dir) -> List[Tuple[int, float]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(r["iteration"], r["loss"]) for r in records if r["kind"] == "train"]


def _after(records, earlier) -> List[Tuple[int, float]]:
    """The records a later part of the run appended to metrics.jsonl."""
    return records[len(earlier):]


def _latest(run_dir) -> int:
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        return int(f.read().strip().split("_")[-1])


def _signals(run_dir) -> Dict[int, List[str]]:
    folder = os.path.join(run_dir, "signals")
    out = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            out[int(name.split(".")[0])] = f.read().split("\n")[:-1]
    return out


def _output(run_dir, job_id) -> str:
    path = os.path.join(run_dir, f"slurm-{job_id}.out")
    return open(path).read() if os.path.exists(path) else ""


def _wait_iteration(slurm, job_id, run_dir, iteration, timeout=JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not any(it >= iteration for it, _ in _records(run_dir)):
        state = slurm.job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job_id} is {state} before iteration {iteration}:\n{_output(run_dir, job_id)[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} did not reach iteration {iteration}:\n{_output(run_dir, job_id)[-3000:]}")
        time.sleep(0.5)


def _reference(tmp_path_factory, iters: int) -> subprocess.Popen:
    out = tmp_path_factory.mktemp("single")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "cola_megatron.train", "--config", DEMO, *MODEL,
                             f"train.train_iters={iters}",
                             "checkpoint.save_dir=null", "checkpoint.save_interval=0", f"logging.log_dir={out}"], cwd=REPO, env=env,
                            stdout=open(out / "out.txt", "w"), stderr=subprocess.STDOUT)
    proc.run_dir = str(out)
    return proc


@pytest.fixture(scope="module")
def uninterrupted(slurm, job_script, tmp_path_factory):
    """The job run to the end under Slurm, and the same config in one process without Slurm (at the same time)."""
    single = _reference(tmp_path_factory, SHORT_ITERS)
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    job = _submit(slurm, job_script, run_dir, iters=SHORT_ITERS)
    info = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), JOB_TIMEOUT)
    slurm.wait_idle()
    return {"info": info, "run_dir": run_dir, "job": job, "losses": _records(run_dir),
            "single": _finish_reference(single)}


def _finish_reference(proc) -> List[Tuple[int, float]]:
    proc.wait(timeout=JOB_TIMEOUT)
    with open(os.path.join(proc.run_dir, "out.txt")) as f:
        out = f.read()
    assert proc.returncode == 0, out[-3000:]
    return _records(proc.run_dir)


def test_rendered_cpu_job_completes_with_single_process_losses(uninterrupted):
    u = uninterrupted
    assert u["info"]["JobState"] == "COMPLETED", _output(u["run_dir"], u["job"])[-3000:]
    assert [it for it, _ in u["losses"]] == list(range(1, SHORT_ITERS + 1))
    assert [it for it, _ in u["single"]] == list(range(1, SHORT_ITERS + 1))
    got, ref = [loss for _, loss in u["losses"]], [loss for _, loss in u["single"]]
    assert ref[-1] < ref[0]
    assert_same_trajectory(got, ref)
    assert not os.listdir(os.path.join(u["run_dir"], "signals"))  # nothing stopped it


@pytest.fixture(scope="module")
def stop_paths(slurm, job_script, uninterrupted, tmp_path_factory):
    """One run through the time limit (requeue), scancel, a resubmission, a SIGKILLed task and a last one; the
    same config in one process without Slurm runs meanwhile."""
    single = _reference(tmp_path_factory, ITERS)
    run_dir = str(tmp_path_factory.mktemp("interrupted"))
    parts = {"run_dir": run_dir}

    # 1. The time limit: Slurm's SIGUSR1, a save, `scontrol requeue` by the batch script.
    job = _submit(slurm, job_script, run_dir, *TIME_LIMIT)
    parts["time_limit_job"] = job
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        info = slurm.job(job)
        if int(info.get("Restarts", "0")) >= 1 and info.get("JobState") == "PENDING":
            break
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") or time.monotonic() > deadline:
            pytest.fail(f"job {job} was not requeued: {info.get('JobState')}\n{_output(run_dir, job)[-3000:]}")
        time.sleep(0.5)
    parts["requeued"] = info
    parts["after_time_limit"] = _latest(run_dir)
    parts["records_time_limit"] = _records(run_dir)
    # Eligible again after the credential lifetime (10 s on this cluster); with a limit it cannot reach now.
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")

    # 2. scancel of the resumed job: SIGTERM to every process, a save, CANCELLED.
    _wait_iteration(slurm, job, run_dir, parts["after_time_limit"] + 3)
    slurm.run("scancel", str(job))
    parts["cancelled"] = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), JOB_TIMEOUT)
    slurm.wait_idle()
    parts["after_scancel"] = _latest(run_dir)
    parts["records_scancel"] = _records(run_dir)
    parts["time_limit_output"] = _output(run_dir, job)

    # 3. Resubmitted: resumes; SIGKILL one training process after a periodic checkpoint.
    job = _submit(slurm, job_script, run_dir)
    parts["killed_job"] = job
    target = (parts["after_scancel"] // SAVE_INTERVAL + 1) * SAVE_INTERVAL
    _wait_iteration(slurm, job, run_dir, target + 2)
    deadline = time.monotonic() + JOB_TIMEOUT
    while _latest(run_dir) < target:  # the periodic checkpoint is complete once `latest` names it
        assert time.monotonic() < deadline, "the periodic checkpoint did not complete"
        time.sleep(0.2)
    with open(os.path.join(run_dir, "logs", "rank00001.log")) as f:
        headers = [line for line in f if line.startswith("==== ")]
    pid = int(headers[-1].split(" pid ")[1].split(":")[0])  # rank_log.sh execs the training process: same pid
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    parts["killed_checkpoint"] = _latest(run_dir)
    parts["killed"] = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 120)
    parts["failed_after_s"] = time.monotonic() - killed_at
    slurm.wait_idle()
    parts["killed_output"] = _output(run_dir, job)
    parts["records_killed"] = _records(run_dir)

    # 4. Resubmitted again: resumes from the last complete checkpoint and runs to the end.
    job = _submit(slurm, job_script, run_dir)
    parts["final_job"] = job
    parts["final"] = slurm.wait_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), JOB_TIMEOUT)
    slurm.wait_idle()
    parts["final_output"] = _output(run_dir, job)
    parts["records"] = _records(run_dir)
    parts["signals"] = _signals(run_dir)
    parts["single"] = _finish_reference(single)
    return parts


def test_time_limit_saves_requeues_and_resumes(stop_paths):
    p = stop_paths
    out = p["time_limit_output"]
    assert "SIGUSR1 (time limit near)" in out and "requeueing job" in out, out[-3000:]
    assert "stopped at iteration" in out and "(signal)" in out
    first = p["records_time_limit"]
    assert [it for it, _ in first] == list(range(1, len(first) + 1))
    stopped_at = first[-1][0]
    assert 0 < stopped_at < ITERS and p["after_time_limit"] == stopped_at  # saved where it stopped
    assert int(p["requeued"]["Restarts"]) == 1
    # The requeued start resumed from that checkpoint.
    assert _after(p["records_scancel"], first)[0][0] == stopped_at + 1


def test_scancel_saves_and_resubmission_resumes(stop_paths):
    p = stop_paths
    assert p["cancelled"]["JobState"] == "CANCELLED"
    resumed = _after(p["records_scancel"], p["records_time_limit"])
    assert p["after_scancel"] == resumed[-1][0]  # the cancelled job saved its last iteration
    assert _after(p["records_killed"], p["records_scancel"])[0][0] == p["after_scancel"] + 1


def test_killed_task_fails_the_job_and_resubmission_resumes(stop_paths):
    p = stop_paths
    assert p["killed"]["JobState"] == "FAILED", p["killed_output"][-3000:]
    assert p["failed_after_s"] < 120
    last = _after(p["records"], p["records_killed"])
    assert last[0][0] == p["killed_checkpoint"] + 1  # from the last complete checkpoint, not a partial one
    assert last[-1][0] == ITERS
    assert p["final"]["JobState"] == "COMPLETED", p["final_output"][-3000:]


def test_interrupted_run_has_the_uninterrupted_losses(stop_paths):
    by_iteration = dict(stop_paths["records"])  # a redone iteration (after the kill) counts once, the last time
    assert sorted(by_iteration) == list(range(1, ITERS + 1))
    reference = stop_paths["single"]
    assert [it for it, _ in reference] == list(range(1, ITERS + 1))
    # TP2 against one process: rounding differs; late losses are near 0.007, hence the absolute floor.
    assert [by_iteration[i] for i in range(1, ITERS + 1)] == pytest.approx([loss for _, loss in reference], rel=1e-5,
                                                                          abs=1e-6)


def test_each_stopped_process_gets_one_sigterm(stop_paths):
    """The time limit and scancel (the stop paths) deliver one SIGTERM to every training process. (After a SIGKILL,
    torchrun and then Slurm each stop the survivors: that job is failing, not saving.)"""
    time_limit = str(stop_paths["time_limit_job"])
    by_part: Dict[Tuple[str, str], List[str]] = {}
    for pid, lines in stop_paths["signals"].items():
        rank, job, restart = lines[0].split()
        if job != time_limit:
            continue
        assert len(lines) == 1, f"process {pid} got SIGTERM {len(lines)} times: {lines}"
        by_part.setdefault((job, restart), []).append(rank)
    assert sorted(by_part[(time_limit, "0")]) == ["0", "1"]  # the time limit
    assert sorted(by_part[(time_limit, "1")]) == ["0", "1"]  # scancel
