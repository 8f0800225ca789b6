"""Compare training runs: loss curves against tokens and FLOPs, plus a summary table.

Each run is a log directory (or a metrics file) given as ``NAME=PATH`` or ``PATH`` (the name is then the
directory's name). The trainer writes ``metrics.jsonl`` there, one JSON object per line::

    {"kind": "train", "iteration": 10, "tokens": 1310720, "flops": 3.1e15, "loss": 9.8, "lr": ...,
     "grad_norm": ..., "tokens_per_s": ..., "tflops_per_gpu": ..., "mfu": ..., "peak_mem_gib": ...}
    {"kind": "valid", "iteration": 100, "tokens": ..., "flops": ..., "loss": 4.2, "ppl": 66.7}

``flops`` is the cumulative training FLOPs so far. Unknown keys and record kinds are ignored, and so is a line
that does not parse (a run killed mid-write leaves a truncated last line; a resumed run appends after it).

Every start or resume first writes a header, ``{"kind": "run", "run_id": ..., "resumed_iteration": N, ...}``. A
file is read as segments: a header with the run's id resumes it at iteration N, so records the previous segment
logged after N (it was killed past its last checkpoint) are dropped and the run reads as one curve; a header with
another id is a new run in the same directory, and only the last run is read (with a note). Without headers (older
files), when a resumed run logs an iteration again, the later records replace the earlier ones from that
iteration on.

Without ``metrics.jsonl`` the TensorBoard event files of the run are read instead: scalars ``train/loss`` and
``valid/loss`` with step = iteration; ``train/tokens`` and ``train/flops`` at the same steps place them on the
token and FLOP axes (linear interpolation between logged steps); optional ``train/tokens_per_s``,
``train/peak_mem_gib`` and ``valid/ppl`` fill the table. TensorBoard stores scalars as float32, so token and
FLOP counts read from it are rounded to about 7 significant digits.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cola_megatron.cli import ArgumentParser, run_command
from cola_megatron.errors import ColaError
METRICS_FILE = "metrics.jsonl"
EVENT_FILE_GLOB = "events.out.tfevents.*"
KINDS = ("train", "valid")
RUN_KIND = "run"  # the header every start or resume writes

# The PNG is FIGSIZE * DPI pixels.
FIGSIZE = (12.0, 8.0)
DPI = 100

TABLE_COLUMNS = (
    "run",
    "final valid loss",
    "final valid ppl",
    "tokens",
    "FLOPs",
    "mean tokens/s",
    "peak mem (GiB)",
)


class CompareError(ColaError):
    """Bad input: the message says what is wrong and how to fix it."""


@dataclass
class Record:
    iteration: int
    loss: float
    tokens: float | None = None
    flops: float | None = None
    # optional per-record values: ppl, tokens_per_s, peak_mem_gib
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class RunLog:
    name: str
    source: Path
    train: list[Record]
    valid: list[Record]
    notes: list[str] = field(default_factory=list)

    def records(self, kind: str) -> list[Record]:
        return self.train if kind == "train" else self.valid

    def has_axis(self, kind: str, axis: str) -> bool:
        """True when every `kind` record carries a value for `axis` ("tokens" or "flops")."""
        return all(getattr(r, axis) is not None for r in self.records(kind))


@dataclass
class RunSummary:
    name: str
    final_valid_loss: float | None
    final_valid_ppl: float | None
    tokens: float | None
    flops: float | None
    mean_tokens_per_s: float | None
    peak_mem_gib: float | None


# ---------------------------------------------------------------- run specs


def parse_run_spec(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` -> (name, path); the default name is the run directory's name."""
    name, sep, rest = spec.partition("=")
    if sep and "/" not in name:
        if not name:
            raise CompareError(f"run {spec!r} has an empty name; write NAME=PATH or just PATH")
        path = Path(rest)
    else:
        name, path = "", Path(spec)
    if not str(path):
        raise CompareError(f"run {spec!r} has an empty path; write NAME=PATH or just PATH")
    if not name:
        resolved = path.resolve()
        name = (resolved.parent if resolved.is_file() else resolved).name
    return name, path


def check_run_specs(specs: list[tuple[str, Path]]) -> None:
    """Fail on missing paths and duplicate names before reading anything."""
    seen: dict[str, Path] = {}
    for name, path in specs:
        if name in seen:
            raise CompareError(
                f"two runs are named {name!r} ({seen[name]} and {path}); "
                f"name them apart with NAME=PATH"
            )
        seen[name] = path
        if not path.exists():
            raise CompareError(f"run {name!r}: path {path} does not exist; give the run's logging.log_dir or its "
                               "metrics.jsonl")


# ---------------------------------------------------------------- reading


def load_run(name: str, path: Path) -> RunLog:
    """Read one run from a log directory, a metrics.jsonl file or a TensorBoard event file/directory."""
    if path.is_file():
        if path.name.endswith(".jsonl"):
            return _load_jsonl_run(name, path)
        if "tfevents" in path.name:
            return _load_tensorboard_run(name, path)
        raise CompareError(
            f"run {name!r}: {path} is neither a {METRICS_FILE} file nor a TensorBoard event file; "
            f"pass the run's log directory"
        )
    metrics = path / METRICS_FILE
    if metrics.is_file():
        return _load_jsonl_run(name, metrics)
    event_dirs = sorted({p.parent for p in path.rglob(EVENT_FILE_GLOB)})
    if not event_dirs:
        raise CompareError(
            f"run {name!r}: no metrics found in {path} (neither {METRICS_FILE} nor TensorBoard event files); "
            f"pass the trainer's log directory"
        )
    if path in event_dirs:
        return _load_tensorboard_run(name, path)
    if len(event_dirs) > 1:
        listed = ", ".join(str(d) for d in event_dirs)
        raise CompareError(
            f"run {name!r}: several TensorBoard logs under {path} ({listed}); pass one of them as the run path"
        )
    return _load_tensorboard_run(name, event_dirs[0])


def _load_jsonl_run(name: str, path: Path) -> RunLog:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    by_kind: dict[str, list[Record]] = {kind: [] for kind in KINDS}
    notes: list[str] = []
    unparsable = []
    run_id, earlier_runs = None, []
    for lineno, line in numbered:
        obj = _parse_line(line)
        if not isinstance(obj, dict):
            unparsable.append(lineno)
            continue
        kind = obj.get("kind")
        if kind == RUN_KIND:
            if run_id is not None and obj.get("run_id") != run_id:
                earlier_runs.append(run_id)  # another run reusing the log directory: the last one counts
                by_kind = {k: [] for k in KINDS}
            run_id = obj.get("run_id")
            _cut_after(by_kind, obj.get("resumed_iteration"))
        elif kind in by_kind:
            by_kind[kind].append(_record_from_json(obj, path, lineno))
    if earlier_runs:
        plural = "s" if len(earlier_runs) > 1 else ""
        notes.append(f"{path} holds {len(earlier_runs) + 1} runs: read the last ({run_id}), ignored the earlier "
                     f"one{plural} ({', '.join(map(str, earlier_runs))})")
    if unparsable:
        last = numbered[-1][0]
        if unparsable == [last]:
            notes.append(f"ignored a truncated last line ({path}:{last})")
        else:
            plural = "s" if len(unparsable) > 1 else ""
            notes.append(f"ignored {len(unparsable)} unreadable line{plural} of {path} ({_short_list(unparsable)})")
    run = RunLog(name, path, _apply_rewinds(by_kind["train"]), _apply_rewinds(by_kind["valid"]), notes)
    if not run.train and not run.valid:
        raise CompareError(f"run {name!r}: no metrics found in {path} (no 'train' or 'valid' records)")
    return run


def _parse_line(line: str):
    """The JSON value on `line`, or None. A record glued behind a partial write
    (killed mid-line, then resumed and appended) is recovered."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    start = line.find("{", 1)
    while start != -1:
        try:
            obj, end = decoder.raw_decode(line, start)
        except json.JSONDecodeError:
            obj, end = None, -1
        if end == len(line.rstrip()):
            return obj
        start = line.find("{", start + 1)
    return None


def _record_from_json(obj: dict, path: Path, lineno: int) -> Record:
    def number(key: str, required: bool) -> float | None:
        value = obj.get(key)
        if value is None:
            if required:
                raise CompareError(f"{path}:{lineno}: {obj['kind']} record lacks {key!r}")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CompareError(f"{path}:{lineno}: {key!r} must be a number, got {value!r}")
        return value

    extra = {k: v for k in ("ppl", "tokens_per_s", "peak_mem_gib") if (v := number(k, False)) is not None}
    return Record(
        iteration=int(number("iteration", True)),
        loss=float(number("loss", True)),
        tokens=number("tokens", False),
        flops=number("flops", False),
        extra=extra,
    )


def _cut_after(by_kind: dict[str, list[Record]], iteration) -> None:
    """A segment resumed from the checkpoint at ``iteration``: what its predecessor logged later was undone."""
    if isinstance(iteration, int) and not isinstance(iteration, bool):
        for kind, records in by_kind.items():
            by_kind[kind] = [r for r in records if r.iteration <= iteration]


def _apply_rewinds(records: list[Record]) -> list[Record]:
    """A resumed run re-logs iterations after its checkpoint; keep the latest record stream."""
    kept: list[Record] = []
    for record in records:
        while kept and kept[-1].iteration >= record.iteration:
            kept.pop()
        kept.append(record)
    return kept


def _short_list(numbers: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(n) for n in numbers[:limit])
    return ("line " if len(numbers) == 1 else "lines ") + shown + (", ..." if len(numbers) > limit else "")


def _load_tensorboard_run(name: str, path: Path) -> RunLog:
    # Imported here: tensorboard is slow to import and only needed for this fallback.
    from tensorboard.backend.event_processing import event_accumulator

    # size_guidance 0 keeps every scalar; the default reservoir-samples long runs.
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))

    def series(tag: str) -> dict[int, float]:
        return {int(e.step): float(e.value) for e in acc.Scalars(tag)} if tag in tags else {}

    if "train/loss" not in tags and "valid/loss" not in tags:
        found = ", ".join(sorted(tags)) or "none"
        raise CompareError(
            f"run {name!r}: no metrics found in TensorBoard log {path} "
            f"(no 'train/loss' or 'valid/loss' scalars; tags found: {found})"
        )
    tokens, flops = series("train/tokens"), series("train/flops")
    notes = [f"read TensorBoard events from {path} (no {METRICS_FILE})"]
    for tag, values in (("train/tokens", tokens), ("train/flops", flops)):
        if not values:
            notes.append(f"no '{tag}' scalars: its x axis is iterations")

    optional = {
        "train": {"tokens_per_s": series("train/tokens_per_s"), "peak_mem_gib": series("train/peak_mem_gib")},
        "valid": {"ppl": series("valid/ppl")},
    }
    by_kind = {}
    for kind in KINDS:
        losses = series(f"{kind}/loss")
        by_kind[kind] = [
            Record(
                iteration=step,
                loss=loss,
                tokens=_value_at(tokens, step),
                flops=_value_at(flops, step),
                extra={k: v[step] for k, v in optional[kind].items() if step in v},
            )
            for step, loss in sorted(losses.items())
        ]
    return RunLog(name, path, by_kind["train"], by_kind["valid"], notes)


def _value_at(values: dict[int, float], step: int) -> float | None:
    """Value logged at `step`, linearly interpolated between logged steps; None outside them."""
    if step in values:
        return values[step]
    steps = sorted(values)
    if not steps or step < steps[0] or step > steps[-1]:
        return None
    return float(np.interp(step, steps, [values[s] for s in steps]))


# ---------------------------------------------------------------- summary table


def summarize(run: RunLog) -> RunSummary:
    last_valid = run.valid[-1] if run.valid else None
    ppl = None
    if last_valid is not None:
        ppl = last_valid.extra.get("ppl")
        if ppl is None:
            ppl = _safe_exp(last_valid.loss)
    ends = run.train[-1:] + run.valid[-1:]
    throughput = [r.extra["tokens_per_s"] for r in run.train if "tokens_per_s" in r.extra]
    memory = [r.extra["peak_mem_gib"] for r in run.train if "peak_mem_gib" in r.extra]
    return RunSummary(
        name=run.name,
        final_valid_loss=last_valid.loss if last_valid else None,
        final_valid_ppl=ppl,
        tokens=_max_or_none(r.tokens for r in ends),
        flops=_max_or_none(r.flops for r in ends),
        mean_tokens_per_s=sum(throughput) / len(throughput) if throughput else None,
        peak_mem_gib=max(memory) if memory else None,
    )


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _max_or_none(values) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def table_rows(summaries: list[RunSummary]) -> list[list[str]]:
    return [
        [
            s.name,
            _fmt(s.final_valid_loss, "{:.4f}"),
            _fmt(s.final_valid_ppl, "{:.2f}"),
            _fmt(s.tokens, _count),
            _fmt(s.flops, "{:.3e}"),
            _fmt(s.mean_tokens_per_s, "{:,.0f}"),
            _fmt(s.peak_mem_gib, "{:.2f}"),
        ]
        for s in summaries
    ]


def _fmt(value: float | None, spec) -> str:
    if value is None:
        return "-"
    return spec(value) if callable(spec) else spec.format(value)


def _count(value: float) -> str:
    """Token counts the way people quote them: 52.43M, 1.311B."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:.0f}"


def format_text_table(rows: list[list[str]]) -> str:
    cells = [list(TABLE_COLUMNS)] + rows
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE_COLUMNS))]

    def line(row: list[str]) -> str:
        # run names left-aligned, numbers right-aligned
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in rows])


def format_markdown_table(rows: list[list[str]]) -> str:
    def line(row) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    align = "|" + "|".join([":---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|"
    return "\n".join([line(TABLE_COLUMNS), align] + [line(r) for r in rows]) + "\n"


# ---------------------------------------------------------------- plot

PANELS = (("train", "tokens"), ("train", "flops"), ("valid", "tokens"), ("valid", "flops"))
AXIS_LABELS = {"tokens": "tokens", "flops": "training FLOPs", "iteration": "iteration"}
MISSING_NAMES = {"tokens": "token counts", "flops": "FLOP counts"}


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over `window` points; the first points average what exists so far."""
    y = np.asarray(values, dtype=float)
    if window <= 1 or len(y) == 0:
        return y
    csum = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def plot_runs(runs: list[RunLog], out: Path, title: str | None = None, smooth: int = 1) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError as exc:
        raise CompareError("plotting needs matplotlib: pip install matplotlib") from exc

    # A bare Figure on the Agg canvas: no pyplot state, no display needed.
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    handles = {}
    for ax, (kind, axis) in zip(axes.flat, PANELS):
        missing = [run.name for run in runs if run.records(kind) and not run.has_axis(kind, axis)]
        x_key = "iteration" if missing else axis
        visible_y = []
        for i, run in enumerate(runs):
            records = run.records(kind)
            if not records:
                continue
            color = f"C{i % 10}"
            xs = [getattr(r, x_key) for r in records]
            ys = [r.loss for r in records]
            if kind == "train" and smooth > 1:
                ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
                ys = moving_average(ys, smooth)
            style = {"marker": "o", "markersize": 3} if kind == "valid" else {}
            (line,) = ax.plot(xs, ys, color=color, linewidth=1.5, label=run.name, **style)
            handles.setdefault(run.name, line)
            visible_y.append(np.asarray(ys, dtype=float))
        _set_loss_ylim(ax, visible_y)
        what = f"{kind} loss" + (f" (smoothed over {smooth} points)" if kind == "train" and smooth > 1 else "")
        if missing:
            ax.set_title(f"{what} vs iterations (no {MISSING_NAMES[axis]} for {', '.join(missing)})", fontsize=10)
        else:
            ax.set_title(f"{what} vs {AXIS_LABELS[axis]}", fontsize=10)
        ax.set_xlabel(AXIS_LABELS[x_key])
        ax.set_ylabel(f"{kind} loss")
        if x_key == "tokens":
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _count(v) if v else "0"))
        ax.grid(True, alpha=0.3)
        if not any(run.records(kind) for run in runs):
            ax.text(0.5, 0.5, f"no {kind} records", ha="center", va="center", transform=ax.transAxes)
    if handles:
        fig.legend(
            list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 5), frameon=False
        )
    if title:
        fig.suptitle(title)
    fig.savefig(out, format="png")


def _set_loss_ylim(ax, series: list[np.ndarray]) -> None:
    """Keep the first steps' high loss from squashing the part of the curves worth comparing."""
    finite = [s[np.isfinite(s)] for s in series]
    finite = [s for s in finite if len(s)]
    if not finite:
        return
    low = min(float(s.min()) for s in finite)
    # short series (a handful of evaluations) are shown whole
    settled = max(float(s[len(s) // 10 if len(s) >= 20 else 0 :].max()) for s in finite)
    high = max(float(s.max()) for s in finite)
    top = min(high, settled + 0.1 * (settled - low)) if high > settled else high
    pad = 0.05 * (top - low) or 0.05 * abs(top) or 0.1
    ax.set_ylim(low - pad, top + pad)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="cola-compare",
        description="Plot training/validation loss of several runs against tokens and FLOPs and print a summary table.",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="[NAME=]PATH",
        help=f"a run's log directory (with {METRICS_FILE} or TensorBoard events) or metrics file",
    )
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write the 2x2 plot to")
    parser.add_argument("--title", help="title above the plot")
    parser.add_argument("--smooth", type=int, default=1, metavar="N", help="moving average of train loss over N points")
    parser.add_argument("--table", type=Path, metavar="FILE.md", help="also write the table as Markdown")
    return parser


def compare_runs(run_specs: list[str], out: Path, table: Path | None = None, title: str | None = None,
                 smooth: int = 1) -> None:
    """Plot ``NAME=PATH`` runs into ``out`` (PNG), print the summary table and write it to ``table`` (Markdown)."""
    out, table = Path(out), Path(table) if table is not None else None
    if out.suffix.lower() != ".png":
        raise CompareError(f"--out {out}: the plot is a PNG; give a file name ending in .png")
    if smooth < 1:
        raise CompareError(f"--smooth {smooth}: the window must be at least 1 point (1 = no smoothing)")
    for option, target in (("--out", out), ("--table", table)):
        if target is not None and not target.parent.is_dir():
            raise CompareError(f"{option} {target}: directory {target.parent} does not exist; create it first")
    specs = [parse_run_spec(spec) for spec in run_specs]
    check_run_specs(specs)

    runs = [load_run(name, path) for name, path in specs]
    for run in runs:
        for note in run.notes:
            print(f"cola-compare: {run.name}: {note}", file=sys.stderr)
    plot_runs(runs, out, title=title, smooth=smooth)
    rows = table_rows([summarize(run) for run in runs])
    print(format_text_table(rows))
    if table is not None:
        table.write_text(format_markdown_table(rows), encoding="utf-8")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    compare_runs(args.runs, args.out, args.table, args.title, args.smooth)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("cola-compare", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
