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


def _checkpoints(save_dir) -> list:
    return sorted(n for n in os.listdir(save_dir) if n.startswith("iter_"))


def test_training_operator_environment(tmp_path):
    """The variables the training-operator sets on a pod (PET_*: torchrun's, WORLD_SIZE and RANK: the pod's):
    2 local ranks train and checkpoint; a SIGTERM (eviction) saves and exits STOPPED_EXIT_CODE, retryable for the
    operator; started again, the pod resumes from that checkpoint and finishes with 0."""
    save_dir = tmp_path / "ckpt"
    port = _free_port()
    operator = dict(PET_NNODES=1, PET_NODE_RANK=0, PET_NPROC_PER_NODE=2, WORLD_SIZE=1, RANK=0, MASTER_PORT=port,
                    STOPPED_EXIT_CODE=143)
    env_cleared = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "NPROC_PER_NODE")}
    # decay_iters fixed: the learning-rate schedule does not depend on train_iters, which the second start lowers.
    overrides = [*TINY, "train.train_iters=100000", "optimizer.decay_iters=10", f"checkpoint.save_dir={save_dir}",
                 "checkpoint.save_interval=2", "checkpoint.keep_last=null"]  # a late stop must not prune iter_2
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", env_cleared)
        proc = _start(tmp_path, "pod", overrides, **operator)
    deadline = time.monotonic() + TIMEOUT
    while "iter       3/" not in _output(tmp_path, "pod"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _finish([proc], tmp_path, ["pod"])
            pytest.fail("training did not start:\n" + _output(tmp_path, "pod")[-3000:])
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    _finish([proc], tmp_path, ["pod"])
    out = _output(tmp_path, "pod")
    assert proc.returncode == 143, out[-3000:]
    assert "node 0 of 1, 2 processes" in out and "stopped at iteration" in out
    stopped = int(out.split("stopped at iteration ")[1].split()[0])
    assert _checkpoints(save_dir)[-1] == f"iter_{stopped:07d}" and "iter_0000002" in _checkpoints(save_dir)
    assert sorted(os.listdir(tmp_path / "pod" / "logs")) == ["rank00000.log", "rank00001.log"]

    # Recreated by the operator: resumes, runs to the (now reachable) end and exits 0.
    final = stopped + 2
    overrides[overrides.index("train.train_iters=100000")] = f"train.train_iters={final}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", env_cleared)
        proc = _start(tmp_path, "pod-again", overrides, **dict(operator, MASTER_PORT=_free_port()))
    _finish([proc], tmp_path, ["pod-again"])
    again = _output(tmp_path, "pod-again")
    assert proc.returncode == 0, again[-3000:]
    assert [i for i, _ in _losses(tmp_path, "pod-again")] == [stopped + 1, stopped + 2]


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


# --------------------------------------------------------------------------------------------------------------
# PyTorchJobs against the training-operator's API models (the `kubeflow-training` package)

RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}  # the operator's ReplicaSpec.restartPolicy values


class _Response:
    """What ApiClient.deserialize reads: a JSON body."""

    def __init__(self, doc):
        self.data = json.dumps(doc)


def _pytorchjob_model(doc):
    """Deserialize into the operator's PyTorchJob model and back: a field the model does not know (a typo, a
    misplaced key) is dropped and a wrongly typed value comes back changed, so the round trip must be exact."""
    api = pytest.importorskip("kubeflow.training.api_client", reason="pip install kubeflow-training")
    client = api.ApiClient()
    job = client.deserialize(_Response(doc), "KubeflowOrgV1PyTorchJob")
    assert client.sanitize_for_serialization(job) == doc
    return job


def _render_k8s(tmp_path, *args):
    from cola_megatron.analysis import plan

    out = tmp_path / "job.yaml"
    assert plan.main(["--config", DEMO, "--gpu-memory-gib", "16", "--top", "1", *args,
                      "--render-k8s", str(out)]) == 0
    return yaml.safe_load(out.read_text())


def _check_pod(job, procs: int, gpus: bool, config: str = DEMO):
    for name, spec in job.spec.pytorch_replica_specs.items():
        assert name in ("Master", "Worker") and spec.restart_policy == "ExitCode"
        pod = spec.template.spec
        container = pod.containers[0]
        assert container.name == "pytorch" and container.command == ["launch/train.sh"]
        assert container.args[0] == config
        assert any(a.startswith("parallel.tensor_parallel=") for a in container.args)
        env = {e.name: e.value for e in container.env}
        assert env["STOPPED_EXIT_CODE"] == "143"  # retryable under ExitCode: a saved stop is run again
        resources = container.resources
        assert resources.requests == resources.limits
        assert set(resources.limits) == ({"cpu", "memory", "nvidia.com/gpu"} if gpus else {"cpu", "memory"})
        if gpus:
            assert resources.limits["nvidia.com/gpu"] == str(procs)
        shm = [v for v in pod.volumes if v.name == "dshm"][0]
        assert shm.empty_dir.medium == "Memory" and shm.empty_dir.size_limit.endswith("Gi")
        assert {m.mount_path: m.name for m in container.volume_mounts}["/dev/shm"] == "dshm"


def test_rendered_multi_node_pytorchjob_matches_the_operator_model(rendered_demo):
    _, path = rendered_demo
    doc = yaml.safe_load(path.read_text())
    job = _pytorchjob_model(doc)
    assert job.kind == "PyTorchJob" and job.spec.nproc_per_node == "2"
    replicas = job.spec.pytorch_replica_specs
    assert replicas["Master"].replicas == 1 and replicas["Worker"].replicas == 1
    assert job.spec.run_policy.scheduling_policy.min_available == 2  # the gang: every pod or none
    _check_pod(job, 2, gpus=True)


def test_rendered_single_node_pytorchjob_has_no_worker(tmp_path):
    doc = _render_k8s(tmp_path, "--nodes", "1", "--gpus-per-node", "2")
    job = _pytorchjob_model(doc)
    assert list(job.spec.pytorch_replica_specs) == ["Master"]
    assert job.spec.run_policy.scheduling_policy.min_available == 1
    _check_pod(job, 2, gpus=True)


def test_rendered_cpu_pytorchjob_requests_no_gpu(tmp_path):
    doc = _render_k8s(tmp_path, "--nodes", "2", "--gpus-per-node", "2", "--device", "cpu")
    job = _pytorchjob_model(doc)
    assert job.spec.run_policy.scheduling_policy.min_available == 2
    _check_pod(job, 2, gpus=False)


def test_shipped_pytorchjob_matches_the_operator_model():
    with open(os.path.join(REPO, "launch", "k8s", "pytorchjob.yaml")) as f:
        job = _pytorchjob_model(yaml.safe_load(f))
    assert job.spec.pytorch_replica_specs["Worker"].replicas == 7
    assert job.spec.run_policy.scheduling_policy.min_available == 8
    for spec in job.spec.pytorch_replica_specs.values():
        assert spec.restart_policy in RESTART_POLICIES
    _check_pod(job, 8, gpus=True, config="configs/cola/llama_7b.yaml")
