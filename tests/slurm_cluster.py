"""A real single-node Slurm cluster for the tests: munged, slurmctld and slurmd from Debian's `slurm-wlm` and
`munge` packages, configured in a temporary directory with non-default ports and stopped by process id.

When the daemons are missing and this runs as root with apt-get (CI), :func:`ensure_installed` installs them;
otherwise :func:`start` raises :class:`Unavailable` with the reason and the tests skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sacct", "squeue", "scancel"]
STARTUP_TIMEOUT = 60


class Unavailable(Exception):
    """Slurm cannot run here; the message says why."""


def _missing() -> List[str]:
    return [name for name in DAEMONS if shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
            is None]


def ensure_installed() -> float:
    """Install the Debian packages when they are missing and we are root; returns the seconds it took."""
    if not _missing():
        return 0.0
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable(f"Slurm is not installed ({', '.join(_missing())} missing) and this is not root with "
                          f"apt-get: apt-get install {' '.join(PACKAGES)}")
    start = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    try:
        if subprocess.run(install, capture_output=True, env=env, timeout=300).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=300)
            result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=300)
            if result.returncode != 0:
                raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-500:]}")
    except subprocess.TimeoutExpired as e:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} timed out") from e
    if _missing():
        raise Unavailable(f"after apt-get install, still missing: {', '.join(_missing())}")
    return time.monotonic() - start


def _free_ports(n: int) -> List[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


SLURM_CONF = """\
ClusterName=colatest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job is eligible again after it (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.log
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait={kill_wait}
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


@dataclass
class Cluster:
    root: str
    conf: str
    node: str
    cpus: int
    processes: Dict[str, subprocess.Popen] = field(default_factory=dict)
    install_seconds: float = 0.0

    @property
    def env(self) -> Dict[str, str]:
        return dict(os.environ, SLURM_CONF=self.conf)

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        result = subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def sbatch(self, script: str, *args: str, cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> int:
        result = subprocess.run(["sbatch", "--parsable", *args, script], capture_output=True, text=True,
                                env=dict(self.env, **(env or {})), cwd=cwd, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        """`scontrol show job` as a dict (empty once the job has left slurmctld's memory)."""
        result = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True,
                                env=self.env, timeout=60)
        if result.returncode != 0:
            return {}
        fields = {}
        for item in result.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_state(self, job_id: int, states, timeout: float, poll: float = 1.0) -> Dict[str, str]:
        """Wait until the job's state is one of ``states``; returns its fields."""
        deadline = time.monotonic() + timeout
        info: Dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} did not reach {states} in {timeout:.0f} s; last: {info.get('JobState')} "
                           f"{info.get('Reason')}\n{self.logs()}")

    def wait_idle(self, timeout: float = 120) -> None:
        """Wait until no job holds the node any more (a cancelled job is "completing" until its processes end)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-t", "CG,R", "-o", "%i", check=False).strip():
                return
            time.sleep(0.5)
        raise TimeoutError(f"jobs still running or completing after {timeout:.0f} s\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = os.path.join(self.root, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name} (tail)\n" + "".join(f.readlines()[-40:]))
        return "\n".join(out)

    def stop(self) -> None:
        # Jobs first (their processes outlive slurmd), then the daemons in reverse order.
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--signal=KILL", "--user=root", check=False)
            try:
                self.wait_idle(timeout=60)
            except TimeoutError:
                pass
        # Reverse order: slurmd, slurmctld, munged; SIGTERM, then SIGKILL after a grace period.
        for name in reversed(list(self.processes)):
            proc = self.processes[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        self.processes.clear()


def _wait_for(check, what: str, cluster: Cluster, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise Unavailable(f"{name} exited ({proc.returncode}) while waiting for {what}\n{cluster.logs()}")
        if check():
            return
        time.sleep(0.3)
    raise Unavailable(f"timed out waiting for {what}\n{cluster.logs()}")


def start(root: str, kill_wait: int = 30) -> Cluster:
    """Bring up munged, slurmctld and slurmd under ``root``; raises Unavailable with the reason."""
    install_seconds = ensure_installed()
    if os.geteuid() != 0:
        raise Unavailable("the test cluster runs slurmd as root (it starts jobs as the submitting user)")
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    os.makedirs(os.path.join(root, "state"), exist_ok=True)
    os.makedirs(os.path.join(root, "spool"), exist_ok=True)
    munge_dir = os.path.join(root, "munge")
    os.makedirs(munge_dir, mode=0o700, exist_ok=True)
    key = os.path.join(munge_dir, "munge.key")
    subprocess.run(["mungekey", "--create", "--keyfile", key], check=True, capture_output=True)
    os.chmod(key, 0o600)
    munge_socket = os.path.join(munge_dir, "munge.socket")
    ctld_port, slurmd_port = _free_ports(2)
    conf = os.path.join(root, "slurm.conf")
    with open(conf, "w") as f:
        f.write(SLURM_CONF.format(host=host, node=host, cpus=cpus, root=root, munge_socket=munge_socket,
                                  ctld_port=ctld_port, slurmd_port=slurmd_port, kill_wait=kill_wait))
    cluster = Cluster(root=root, conf=conf, node=host, cpus=cpus, install_seconds=install_seconds)

    def daemon(name: str, argv: List[str]) -> None:
        log = open(os.path.join(root, f"{name}.out"), "w")
        cluster.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=cluster.env,
                                                   start_new_session=True)

    try:
        daemon("munged", ["munged", "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}",
                          f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                          f"--seed-file={munge_dir}/munged.seed"])
        _wait_for(lambda: os.path.exists(munge_socket), "munged's socket", cluster)
        daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", conf])
        _wait_for(lambda: subprocess.run(["scontrol", "ping"], capture_output=True, env=cluster.env,
                                         timeout=30).returncode == 0, "slurmctld", cluster)
        daemon("slurmd", ["slurmd", "-D", "-N", cluster.node, "-f", conf])
        _wait_for(lambda: "idle" in cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False),
                  "the node to become idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster
