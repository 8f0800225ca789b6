"""launch/: train.sh as one and as two "nodes" on localhost, its stop path, and shellcheck on every script.

Needs shellcheck (Debian package `shellcheck`); when it is missing and this runs as root with apt-get, the test
set-up installs it, otherwise the shellcheck tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SH = os.path.join(REPO, "launch", "train.sh")
DEMO = "configs/demo.yaml"
# The demo config on mock data, shrunk to a few seconds of CPU time.
TINY = [
    "data.mock=true", "data.train_paths=[]", "data.valid_paths=[]", "data.tokenizer=null",
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
    "model.rank=16", "model.seq_length=32", "model.vocab_size=256", "train.global_batch_size=8",
    "train.micro_batch_size=2", "train.eval_iters=0", "optimizer.warmup_iters=1", "checkpoint.save_dir=null",
    "checkpoint.save_interval=0", "logging.log_interval=1", "logging.tensorboard=false",
]
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path, name: str, **extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(tmp_path / name / "logs"), OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _start(tmp_path, name: str, overrides, **env) -> subprocess.Popen:
    out = open(tmp_path / f"{name}.out", "w")
    return subprocess.Popen([TRAIN_SH, DEMO, *overrides, f"logging.log_dir={tmp_path / name}"], cwd=REPO,
                            env=_env(tmp_path, name, **env), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(procs, tmp_path, names) -> None:
    """Wait for all; on a timeout stop the process groups this test started."""
    deadline = time.monotonic() + TIMEOUT
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("launch/train.sh timed out:\n" + "\n".join(_output(tmp_path, n)[-3000:] for n in names))


def _output(tmp_path, name: str) -> str:
    return (tmp_path / f"{name}.out").read_text()


def _losses(tmp_path, name: str):
    with open(tmp_path / name / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return [(r["iteration"], r["loss"]) for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One node with 2 processes, then two 1-process "nodes" started together (static rendezvous)."""
    tmp = tmp_path_factory.mktemp("launch")
    overrides = [*TINY, "train.train_iters=4"]
    single = _start(tmp, "single", overrides, NPROC_PER_NODE=2, MASTER_PORT=_free_port())
    _finish([single], tmp, ["single"])
    port = _free_port()
    nodes = [_start(tmp, f"node{rank}", overrides, NNODES=2, NODE_RANK=rank, NPROC_PER_NODE=1, MASTER_PORT=port,
                    LOG_DIR=tmp / "two-nodes-logs")
             for rank in (0, 1)]
    _finish(nodes, tmp, ["node0", "node1"])
    return tmp, single, nodes


def test_two_nodes_match_one_node(runs):
    tmp, single, nodes = runs
    assert single.returncode == 0, _output(tmp, "single")[-3000:]
    for rank, proc in enumerate(nodes):
        assert proc.returncode == 0, _output(tmp, f"node{rank}")[-3000:]
    one = _losses(tmp, "single")
    two = _losses(tmp, "node0")
    assert [i for i, _ in one] == [1, 2, 3, 4]
    assert two == one  # same world size and layout: the same computation, bit for bit on CPU


def test_per_rank_logs(runs):
    tmp = runs[0]
    for logs in (tmp / "single" / "logs", tmp / "two-nodes-logs"):
        assert sorted(os.listdir(logs)) == ["rank00000.log", "rank00001.log"]
    rank0 = (tmp / "two-nodes-logs" / "rank00000.log").read_text()
    assert "iter       4/4" in rank0
    # Rank 0 also reaches node 0's console; node 1 runs no rank 0.
    assert "iter       4/4" in _output(tmp, "node0")
    assert "iter " not in _output(tmp, "node1")


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    """SIGTERM to the script reaches the training processes (not torchrun), which stop after the iteration."""
    proc = _start(tmp_path, "stop", [*TINY, "train.train_iters=100000"], NPROC_PER_NODE=2,
                  MASTER_PORT=_free_port())
    deadline = time.monotonic() + TIMEOUT
    while "iter       2/" not in _output(tmp_path, "stop"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _finish([proc], tmp_path, ["stop"])
            pytest.fail("training did not start:\n" + _output(tmp_path, "stop")[-3000:])
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    _finish([proc], tmp_path, ["stop"])
    out = _output(tmp_path, "stop")
    assert proc.returncode == 0, out[-3000:]
    assert "stopped at iteration" in out and "(signal)" in out


# --------------------------------------------------------------------------------------------------------------
# Input errors: one message before anything starts


def _run_script(args, **env):
    return subprocess.run([TRAIN_SH, *args], cwd=REPO, env=dict(os.environ, PYTHON=sys.executable, **env),
                          capture_output=True, text=True, timeout=120)


def test_missing_config_is_one_clear_error():
    result = _run_script(["configs/nope.yaml"], NPROC_PER_NODE="1")
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_bad_override_fails_before_launch(tmp_path):
    result = _run_script([DEMO, *TINY, "model.hiden_size=3"], NPROC_PER_NODE="1", LOG_DIR=str(tmp_path / "logs"))
    assert result.returncode == 2
    assert "launch/train.sh: error:" in result.stderr and "did you mean 'model.hidden_size'" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_layout_must_fit_the_world_size(tmp_path):
    result = _run_script([DEMO, *TINY, "parallel.tensor_parallel=2"], NPROC_PER_NODE="3",
                         LOG_DIR=str(tmp_path / "logs"))
    assert result.returncode == 2
    assert "world size 3 is not divisible" in result.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has GPUs")
def test_cpu_only_needs_nproc_per_node():
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "PET_NPROC_PER_NODE")}
    result = subprocess.run([TRAIN_SH, DEMO, *TINY], cwd=REPO, env=dict(env, PYTHON=sys.executable),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "set NPROC_PER_NODE" in result.stderr


def test_usage():
    result = _run_script(["--help"])
    assert result.returncode == 0 and "NPROC_PER_NODE" in result.stdout


# --------------------------------------------------------------------------------------------------------------
# Static checks: shellcheck, bash -n, rendered templates


def _shellcheck():
    path = shutil.which("shellcheck")
    if path or os.geteuid() != 0 or not shutil.which("apt-get"):
        return path
    install = ["apt-get", "install", "-y", "-q", "shellcheck"]
    try:
        if subprocess.run(install, capture_output=True, timeout=120).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=120)  # fresh containers
            subprocess.run(install, capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    return shutil.which("shellcheck")


@pytest.fixture(scope="module")
def shellcheck():
    path = _shellcheck()
    if not path:
        pytest.skip("shellcheck is not installed and could not be installed (apt-get install shellcheck as root)")
    return path


def _scripts():
    found = []
    for folder in ("launch", "launch/slurm"):
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if name.endswith((".sh", ".sbatch")):
                found.append(os.path.join(REPO, folder, name))
    return found


def test_every_script_is_found():
    names = {os.path.relpath(p, REPO) for p in _scripts()}
    assert {"launch/train.sh", "launch/rank_log.sh", "launch/slurm/template.sbatch", "launch/slurm/cola_1b.sbatch",
            "launch/slurm/cola_7b.sbatch"} <= names


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: os.path.relpath(p, REPO))
def test_shellcheck_clean(shellcheck, script):
    result = subprocess.run([shellcheck, "--external-sources", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", _scripts(), ids=lambda p: os.path.relpath(p, REPO))
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def rendered_demo(tmp_path_factory):
    """The templates rendered by cola-plan for the demo config on 2 nodes x 2 GPUs."""
    from cola_megatron.analysis import plan

    tmp = tmp_path_factory.mktemp("rendered")
    sbatch, job = tmp / "demo.sbatch", tmp / "demo.yaml"
    assert plan.main(["--config", DEMO, "--nodes", "2", "--gpus-per-node", "2", "--gpu-memory-gib", "16",
                      "--render-slurm", str(sbatch), "--render-k8s", str(job), "--top", "1"]) == 0
    return sbatch, job


def test_rendered_sbatch_passes_bash_and_shellcheck(rendered_demo, shellcheck):
    sbatch, _ = rendered_demo
    text = sbatch.read_text()
    assert "{{" not in text
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=2" in text
    assert "default_config='configs/demo.yaml'" in text
    assert subprocess.run(["bash", "-n", str(sbatch)]).returncode == 0
    result = subprocess.run([shellcheck, str(sbatch)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_rendered_pytorchjob_is_valid_yaml(rendered_demo):
    _, job = rendered_demo
    doc = yaml.safe_load(job.read_text())
    assert doc["kind"] == "PyTorchJob" and doc["spec"]["nprocPerNode"] == "2"
    replicas = doc["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["command"] == ["launch/train.sh"]
    assert container["args"][0] == DEMO
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert any(a.startswith("parallel.tensor_parallel=") for a in container["args"])
