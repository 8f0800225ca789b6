"""``cola-experiment``: train several variants on the same data and tokens, then plot and tabulate them.

An experiment file names a base config, overrides shared by every run, and the variants::

    base: ../demo.yaml                  # relative to the experiment file
    out_dir: runs/experiments/tiny_cpu
    nproc: 1                            # processes per run (torchrun); 1 runs in a plain process
    overrides: [train.train_iters=300]
    variants:
      dense:  [model.arch=dense, optimizer.lr=1.0e-3]
      cola:   [model.arch=cola]
    plot: docs/experiments/tiny_cpu.png
    table: docs/experiments/tiny_cpu.md

Each variant trains with ``logging.log_dir=OUT_DIR/NAME`` (its metrics.jsonl and TensorBoard events); then
``cola-compare`` draws the loss curves against tokens and FLOPs and writes the table.

    cola-experiment configs/experiments/tiny_cpu.yaml
    cola-experiment configs/experiments/tiny_cpu.yaml --smoke      # a few steps per variant, output in a tmp dir
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import yaml

from cola_megatron.cli import ArgumentParser, run_command
from cola_megatron.config import ConfigError, load_config

SMOKE_OVERRIDES = ["train.train_iters=3", "optimizer.warmup_iters=1", "train.eval_interval=0", "train.eval_iters=1",
                   "logging.log_interval=1"]


@dataclass
class Experiment:
    path: str
    base: str
    out_dir: str
    variants: Dict[str, List[str]]
    overrides: List[str] = field(default_factory=list)
    nproc: int = 1
    plot: Optional[str] = None
    table: Optional[str] = None
    title: Optional[str] = None


def load_experiment(path: str) -> Experiment:
    if not os.path.isfile(path):
        raise ConfigError(f"experiment file {path!r} does not exist. Fix: pass e.g. configs/experiments/tiny_cpu.yaml")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    known = {"base", "out_dir", "variants", "overrides", "nproc", "plot", "table", "title"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}. Fix: use only {sorted(known)}")
    for key in ("base", "out_dir", "variants"):
        if key not in raw:
            raise ConfigError(f"{path}: missing '{key}'. Fix: add it (see cola_megatron/analysis/experiment.py)")
    if not isinstance(raw["variants"], dict) or not raw["variants"]:
        raise ConfigError(f"{path}: variants must map names to override lists")
    here = os.path.dirname(path)
    return Experiment(
        path=path,
        base=os.path.normpath(os.path.join(here, raw["base"])),
        out_dir=raw["out_dir"],
        variants={str(k): [str(o) for o in (v or [])] for k, v in raw["variants"].items()},
        overrides=[str(o) for o in raw.get("overrides") or []],
        nproc=int(raw.get("nproc", 1)),
        plot=raw.get("plot"),
        table=raw.get("table"),
        title=raw.get("title"),
    )


def run_overrides(exp: Experiment, name: str, out_dir: str, extra: Sequence[str]) -> List[str]:
    return [*exp.overrides, *exp.variants[name], *extra, f"logging.log_dir={os.path.join(out_dir, name)}",
            "checkpoint.save_dir=null", "checkpoint.save_interval=0"]


def train_command(exp: Experiment, overrides: Sequence[str]) -> List[str]:
    if exp.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={exp.nproc}"]
    else:
        launcher = [sys.executable]
    return [*launcher, "-m", "cola_megatron.train", "--config", exp.base, *overrides]


def _main(argv: Optional[Sequence[str]]) -> int:
    from cola_megatron.analysis.compare import compare_runs

    p = ArgumentParser(prog="cola-experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help="experiment YAML (configs/experiments/)")
    p.add_argument("--smoke", action="store_true", help="a few steps per variant; outputs go to a temporary dir")
    p.add_argument("--only", help="comma list of variants to run (default: all)")
    args = p.parse_args(argv)
    exp = load_experiment(args.experiment)
    names = [n for n in (args.only.split(",") if args.only else exp.variants)]
    missing = [n for n in names if n not in exp.variants]
    if missing:
        raise ConfigError(f"--only: unknown variants {missing}. Fix: choose from {list(exp.variants)}")
    extra = SMOKE_OVERRIDES if args.smoke else []
    out_dir = tempfile.mkdtemp(prefix="cola-experiment-") if args.smoke else exp.out_dir
    for name in names:  # validate every run before training any
        load_config(exp.base, run_overrides(exp, name, out_dir, extra), world_size=exp.nproc)
    for name in names:
        print(f"cola-experiment: training {name}", flush=True)
        rc = subprocess.call(train_command(exp, run_overrides(exp, name, out_dir, extra)))
        if rc != 0:
            print(f"cola-experiment: variant {name} failed with exit code {rc}", file=sys.stderr)
            return rc
    plot = os.path.join(out_dir, "loss.png") if args.smoke or not exp.plot else exp.plot
    table = os.path.join(out_dir, "loss.md") if args.smoke or not exp.table else exp.table
    for path in (plot, table):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    compare_runs([f"{n}={os.path.join(out_dir, n)}" for n in names], plot, table, title=exp.title)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command("cola-experiment", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
