"""The package's shape: its import graph, one error path for every console script, and a wheel that works on its
own outside the checkout."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cola_megatron"
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
ENTRY_MODULES = {target.split(":")[0] for target in SCRIPTS.values()}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, top_level_only: bool):
    """(imported module, imported names) of every import statement of ``module`` inside the package."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cola_megatron"):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if not target.startswith("cola_megatron"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            yield target, [n for n in names if f"{target}.{n}" not in MODULES]
            for sub in submodules:
                yield sub, []


def _graph(top_level_only: bool):
    return {m: {t for t, _ in _imports(m, top_level_only) if t in MODULES and t != m} for m in MODULES}


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_package_is_split_by_concern():
    top = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith((".", "__")))
    folders = [n for n in top if (PACKAGE / n).is_dir()]
    assert folders == ["analysis", "compat", "configs", "convert", "cost", "data", "hf", "launch", "models",
                       "training"]
    assert [n for n in top if n.endswith(".py")] == ["cli.py", "config.py", "errors.py", "faults.py",
                                                      "filesystem.py", "resources.py", "train.py"]


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "all-imports"])
def test_no_import_cycles(top_level_only):
    assert _cycle(_graph(top_level_only)) is None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_training_side_never_imports_the_analysis_side():
    """training/ (and the entry point cola-train) run on the cluster: what they need of the planner (memory model,
    slow-shape warnings) lives in cost/, which imports nothing of analysis/ either."""
    training = [m for m in MODULES if m.startswith(("cola_megatron.training", "cola_megatron.cost"))
                or m == "cola_megatron.train"]
    offenders = [f"{m} imports {t}" for m in training for t, _ in _imports(m, False)
                 if t.startswith("cola_megatron.analysis")]
    assert offenders == []


def test_no_module_imports_private_names_of_another():
    offenders = [f"{m} imports {t}.{n}" for m in MODULES for t, names in _imports(m, False) for n in names
                 if n.startswith("_") and not n.startswith("__") and t != m]
    assert offenders == []


def test_no_module_imports_a_command_line_entry_point():
    """Entry points are thin: nothing in the package imports `cola_megatron.train`, `convert.cli` or any `main`."""
    entry_only = {"cola_megatron.train", "cola_megatron.convert.cli"}
    offenders = []
    for m in MODULES:
        for target, names in _imports(m, False):
            if target in entry_only and m != target:
                offenders.append(f"{m} imports {target}")
            if target in ENTRY_MODULES and target != m and "main" in names:
                offenders.append(f"{m} imports {target}.main")
    assert offenders == []


def test_every_error_is_a_cola_error_and_a_stop_is_not_system_exit():
    from cola_megatron import errors
    from cola_megatron.analysis.compare import CompareError
    from cola_megatron.data.corpus.rdata import RDataError
    from cola_megatron.data.corpus.sample_corpus import FetchError

    for cls in (errors.ConfigError, errors.DataError, errors.CheckpointError, errors.ConversionError,
                errors.TrainingStopped, CompareError, RDataError, FetchError):
        assert issubclass(cls, errors.ColaError), cls
    assert not issubclass(errors.TrainingStopped, SystemExit)
    assert issubclass(errors.TrainingStopped, Exception)  # `except Exception` callers (bench) see it
    assert errors.TrainingStopped.exit_code == 1 and errors.ConfigError.exit_code == 2


# --------------------------------------------------------------------------------------------------------------
# Every console script: one bad input, one line, exit 2, no traceback

BAD_INPUT = {
    "cola-train": ["--config", "configs/demo.yaml", "model.hiden_size=3"],
    "cola-preprocess": ["--input", "/nonexistent/corpus.jsonl", "--output-prefix", "{tmp}/out",
                        "--tokenizer", "/nonexistent/tokenizer.json"],
    "cola-fetch-corpus": ["--vocab-size", "7"],
    "cola-compare": ["run=/nonexistent/run", "--out", "{tmp}/plot.png"],
    "cola-bench": ["--tiny", "--variants", "cola,nope"],
    "cola-experiment": ["/nonexistent/experiment.yaml"],
    "cola-convert": ["to-hf", "/nonexistent/checkpoint", "{tmp}/hf"],
    "cola-plan": ["--config", "configs/demo.yaml", "--nodes", "0"],
}


def test_the_bad_input_table_covers_every_console_script():
    assert sorted(BAD_INPUT) == sorted(SCRIPTS)


def _script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_bad_input_is_one_line_exit_2(script, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in BAD_INPUT[script]]
    before = sorted(os.listdir(tmp_path))
    result = subprocess.run([_script(script), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{script}: error: ")
    assert any(word in lines[0].lower() for word in ("fix", "give", "choose", "pass", "use", "check", "create",
                                                      "set", "write", "see"))
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_argparse_errors_are_one_line_too():
    result = subprocess.run([_script("cola-train")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cola-train: error: the following arguments are required: --config (see cola-train --help)"]


# --------------------------------------------------------------------------------------------------------------
# A wheel works outside the checkout


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The project's wheel installed (--no-deps) into a fresh venv that sees this venv's packages."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    wheels = list(dist.glob("cola_megatron-*.whl"))
    assert len(wheels) == 1
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # This venv's packages, after the new venv's own site-packages (a plain path: its .pth files, e.g. the
    # checkout's editable install, are not processed).
    Path(site, "outer_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                              str(wheels[0])], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    return env_dir, root


def test_the_wheel_works_outside_the_checkout(installed_wheel):
    env_dir, root = installed_wheel
    work = root / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import cola_megatron; print(cola_megatron.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert str(REPO) not in where and str(env_dir) in where

    mock = ["data.mock=true", "data.tokenizer=null"]  # the paper configs' C4 files are not shipped
    dry = subprocess.run([str(env_dir / "bin" / "cola-train"), "--config", "cola/llama_1b.yaml", "--dry-run", *mock],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "config ok: cola d=2048" in dry.stdout and "609.3M" in dry.stdout

    dense = subprocess.run([str(env_dir / "bin" / "cola-train"), "--config", "configs/dense/llama_60m.yaml",
                            "--dry-run", *mock], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert dense.returncode == 0 and "58.1M" in dense.stdout, dense.stderr  # its include: resolves inside the wheel

    plan = subprocess.run([str(env_dir / "bin" / "cola-plan"), "--config", "cola/llama_1b.yaml", "--nodes", "1",
                           "--render-slurm", "job.sbatch"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert plan.returncode == 0, plan.stderr
    rendered = (work / "job.sbatch").read_text()
    assert "#SBATCH --nodes=1" in rendered and "{{" not in rendered
