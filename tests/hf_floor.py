"""The second environment the export suite runs in: the lowest supported transformers and its contemporaries.

A virtual environment in ``.test-envs/`` (git-ignored), created once and reused. It holds only these packages and
their pure-Python dependencies; a ``.pth`` file appended to its site-packages lets it see the test environment's
packages (torch, megatron-core, ...) behind its own, so its versions win and no second torch is downloaded. peft and
accelerate are installed without dependencies for the same reason. The floors in pyproject.toml are these versions.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FLOOR = {
    "transformers": "4.45.2",
    "tokenizers": "0.20.3",
    "huggingface_hub": "0.26.5",
    # The Trainer imports datasets whenever it is installed; the project's one needs a newer huggingface_hub.
    "datasets": "3.0.1",
}
FLOOR_NO_DEPS = {"peft": "0.17.1", "accelerate": "1.0.1"}  # peft 0.17: the first with target_parameters


def _specs(packages):
    return [f"{name}=={version}" for name, version in packages.items()]


def environment_dir() -> Path:
    key = hashlib.sha256(" ".join(_specs(FLOOR) + _specs(FLOOR_NO_DEPS) + [sys.version]).encode()).hexdigest()[:12]
    return REPO / ".test-envs" / f"hf-floor-{key}"


def python(env: Path) -> Path:
    return env / "bin" / "python"


def _pip(env: Path, *args) -> None:
    cmd = [sys.executable, "-m", "pip", "--python", str(python(env)), "install", "-q", "--disable-pip-version-check",
           "--no-input", *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(f"cannot install the lowest supported transformers stack ({last}); PyPI must be reachable once")


def _see_this_environment(env: Path) -> None:
    """Append this interpreter's site-packages to the new environment's path, behind its own."""
    site = subprocess.run([str(python(env)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    here = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    (Path(site) / "cola_test_parent_env.pth").write_text("".join(p + "\n" for p in here))


def ensure_environment() -> Path:
    """The environment's directory, created on first use (about a minute, 0.5 GB) and reused afterwards."""
    target = environment_dir()
    if (target / ".complete").exists():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(partial)], check=True, timeout=300)
    _see_this_environment(partial)
    _pip(partial, *_specs(FLOOR))
    _pip(partial, "--no-deps", *_specs(FLOOR_NO_DEPS))
    (partial / ".complete").write_text(" ".join(_specs(FLOOR) + _specs(FLOOR_NO_DEPS)) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target
