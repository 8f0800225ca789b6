"""cola-compare on synthetic run logs: table values, the PNG, tolerated damage, bad input, TensorBoard fallback."""

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cola_megatron.analysis import compare
from cola_megatron.analysis.compare import load_run, main, parse_run_spec, summarize

REPO = Path(__file__).resolve().parents[1]


def train_record(iteration, loss, tokens_per_s, peak_mem_gib, tokens_per_iter=1000, flops_per_token=6e8, **extra):
    tokens = iteration * tokens_per_iter
    return {
        "kind": "train", "iteration": iteration, "tokens": tokens, "flops": tokens * flops_per_token,
        "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": tokens_per_s, "tflops_per_gpu": 100.0,
        "mfu": 0.3, "peak_mem_gib": peak_mem_gib, **extra,
    }


def valid_record(iteration, loss, ppl=None, tokens_per_iter=1000, flops_per_token=6e8):
    tokens = iteration * tokens_per_iter
    record = {"kind": "valid", "iteration": iteration, "tokens": tokens, "flops": tokens * flops_per_token,
              "loss": loss}
    if ppl is not None:
        record["ppl"] = ppl
    return record


def write_run(directory: Path, records, tail: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (directory / "metrics.jsonl").write_text(text)
    return directory


def cola_records():
    """Valid ppl logged (and deliberately not exp(loss), to see which one the table takes)."""
    return [
        train_record(10, 9.0, tokens_per_s=1000.0, peak_mem_gib=10.5),
        train_record(20, 6.0, tokens_per_s=2000.0, peak_mem_gib=12.25, some_future_key=[1, 2]),
        valid_record(20, 5.5, ppl=250.0),
        train_record(30, 4.0, tokens_per_s=4000.0, peak_mem_gib=11.0),
        {"kind": "config", "note": "an unknown record kind is ignored"},
        train_record(40, 3.5, tokens_per_s=5000.0, peak_mem_gib=12.0),
        valid_record(40, 3.25, ppl=26.0),
    ]


def dense_records():
    """No ppl logged: the table computes exp(final valid loss)."""
    return [
        train_record(10, 9.5, 500.0, 20.0, tokens_per_iter=2000, flops_per_token=1e9),
        valid_record(10, 8.0, tokens_per_iter=2000, flops_per_token=1e9),
        train_record(20, 7.5, 700.0, 21.5, tokens_per_iter=2000, flops_per_token=1e9),
        valid_record(20, 3.0, tokens_per_iter=2000, flops_per_token=1e9),
    ]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def expected_png_size() -> tuple[int, int]:
    return round(compare.FIGSIZE[0] * compare.DPI), round(compare.FIGSIZE[1] * compare.DPI)


def test_table_values_are_exact(tmp_path):
    cola = summarize(load_run("cola", write_run(tmp_path / "cola", cola_records())))
    assert cola.final_valid_loss == 3.25
    assert cola.final_valid_ppl == 26.0  # the logged ppl
    assert cola.tokens == 40_000
    assert cola.flops == 40_000 * 6e8
    assert cola.mean_tokens_per_s == 3000.0
    assert cola.peak_mem_gib == 12.25

    dense = summarize(load_run("dense", write_run(tmp_path / "dense", dense_records())))
    assert dense.final_valid_loss == 3.0
    assert dense.final_valid_ppl == math.exp(3.0)
    assert dense.tokens == 40_000
    assert dense.flops == 40_000 * 1e9
    assert dense.mean_tokens_per_s == 600.0
    assert dense.peak_mem_gib == 21.5


def test_cli_writes_plot_and_tables(tmp_path, capsys):
    write_run(tmp_path / "cola", cola_records())
    write_run(tmp_path / "dense", dense_records())
    out, table = tmp_path / "plot.png", tmp_path / "table.md"
    rc = main([str(tmp_path / "cola"), f"LLaMA dense={tmp_path / 'dense'}", "--out", str(out),
               "--title", "test", "--smooth", "2", "--table", str(table)])
    assert rc == 0
    assert out.stat().st_size > 10_000
    assert png_size(out) == expected_png_size()

    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0].split() == ["run", "final", "valid", "loss", "final", "valid", "ppl", "tokens", "FLOPs",
                                 "mean", "tokens/s", "peak", "mem", "(GiB)"]
    assert stdout[2].split() == ["cola", "3.2500", "26.00", "40K", "2.400e+13", "3,000", "12.25"]
    assert stdout[3].split() == ["LLaMA", "dense", "3.0000", f"{math.exp(3.0):.2f}", "40K", "4.000e+13", "600",
                                 "21.50"]
    assert table.read_text().splitlines() == [
        "| run | final valid loss | final valid ppl | tokens | FLOPs | mean tokens/s | peak mem (GiB) |",
        "|:---|---:|---:|---:|---:|---:|---:|",
        "| cola | 3.2500 | 26.00 | 40K | 2.400e+13 | 3,000 | 12.25 |",
        "| LLaMA dense | 3.0000 | 20.09 | 40K | 4.000e+13 | 600 | 21.50 |",
    ]


def test_truncated_last_line_is_ignored(tmp_path, capsys):
    run_dir = write_run(tmp_path / "killed", cola_records(), tail='{"kind": "train", "iteration": 50, "tok')
    run = load_run("killed", run_dir)
    assert [r.iteration for r in run.train] == [10, 20, 30, 40]
    assert any("truncated last line" in note for note in run.notes)
    assert main([str(run_dir), "--out", str(tmp_path / "p.png")]) == 0
    assert "truncated last line" in capsys.readouterr().err


def test_resumed_run_replaces_relogged_iterations(tmp_path):
    records = [
        train_record(10, 9.0, 1.0, 1.0),
        train_record(20, 8.0, 1.0, 1.0),
        train_record(30, 7.0, 1.0, 1.0),
    ]
    # killed after iteration 30 mid-write, resumed from the checkpoint at iteration 20
    tail = '{"kind": "train", "iter' + "".join(
        json.dumps(r) + "\n" for r in [train_record(30, 6.5, 1.0, 1.0), train_record(40, 6.0, 1.0, 1.0)]
    )
    run = load_run("resumed", write_run(tmp_path / "resumed", records, tail=tail))
    # the resumed record glued behind the partial write is recovered and replaces the old iteration 30
    assert [(r.iteration, r.loss) for r in run.train] == [(10, 9.0), (20, 8.0), (30, 6.5), (40, 6.0)]
    assert run.notes == []


def test_unreadable_lines_in_the_middle_are_skipped_with_a_note(tmp_path):
    records = cola_records()
    run_dir = write_run(tmp_path / "damaged", records[:2])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("garbage {not json\n" + "".join(json.dumps(r) + "\n" for r in records[2:]))
    run = load_run("damaged", run_dir)
    assert [r.iteration for r in run.train] == [10, 20, 30, 40]
    assert run.notes == [f"ignored 1 unreadable line of {run_dir / 'metrics.jsonl'} (line 3)"]


def test_run_specs():
    assert parse_run_spec("cola=logs/a") == ("cola", Path("logs/a"))
    assert parse_run_spec("logs/cola-1b") == ("cola-1b", Path("logs/cola-1b"))
    assert parse_run_spec("logs/run=3/x") == ("x", Path("logs/run=3/x"))  # '=' inside a path, no name


def test_metrics_file_path_is_named_after_its_directory(tmp_path):
    write_run(tmp_path / "cola-60m", cola_records())
    name, path = parse_run_spec(str(tmp_path / "cola-60m" / "metrics.jsonl"))
    assert name == "cola-60m"
    assert summarize(load_run(name, path)).final_valid_loss == 3.25


def error_of(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_path", "does not exist"),
        ("empty_dir", "no metrics found"),
        ("empty_metrics", "no metrics found"),
        ("duplicate_dir_names", "two runs are named 'run'"),
        ("duplicate_explicit_names", "two runs are named 'same'"),
        ("empty_name", "empty name"),
        ("record_without_loss", "lacks 'loss'"),
        ("non_numeric_loss", "must be a number"),
        ("not_png", "ending in .png"),
        ("bad_smooth", "at least 1"),
        ("missing_out_dir", "does not exist; create it first"),
    ],
)
def test_bad_input_gives_one_clear_error(case, expected, tmp_path, capsys):
    good = write_run(tmp_path / "good", cola_records())
    out = tmp_path / "plot.png"
    runs = {
        "missing_path": [str(tmp_path / "nowhere")],
        "empty_dir": [str((tmp_path / "empty").mkdir() or tmp_path / "empty")],
        "empty_metrics": [str(write_run(tmp_path / "e", [], tail="\n\n"))],
        "duplicate_dir_names": [str(write_run(tmp_path / "a" / "run", cola_records())),
                                str(write_run(tmp_path / "b" / "run", cola_records()))],
        "duplicate_explicit_names": [f"same={good}", f"same={write_run(tmp_path / 'other', dense_records())}"],
        "empty_name": [f"={good}"],
        "record_without_loss": [str(write_run(tmp_path / "n", [{"kind": "train", "iteration": 1}]))],
        "non_numeric_loss": [str(write_run(tmp_path / "s", [train_record(1, "nan?", 1.0, 1.0)]))],
    }.get(case, [str(good)])
    options = {
        "not_png": ["--out", str(tmp_path / "plot.pdf")],
        "bad_smooth": ["--out", str(out), "--smooth", "0"],
        "missing_out_dir": ["--out", str(tmp_path / "no" / "plot.png")],
    }.get(case, ["--out", str(out)])
    err = error_of(runs + options, capsys)
    assert expected in err
    assert err.startswith("cola-compare: error: ") and err.count("\n") == 1
    assert not out.exists()  # failed before drawing anything


def write_tensorboard(directory: Path, with_tokens: bool = True) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    for it in (10, 20, 30, 40):
        writer.add_scalar("train/loss", 10.0 - it / 10, it)
        writer.add_scalar("train/tokens_per_s", 1000.0 * it, it)
        writer.add_scalar("train/peak_mem_gib", 2.0 + it / 40, it)
        if with_tokens:
            # powers of two survive TensorBoard's float32 storage exactly
            writer.add_scalar("train/tokens", it * 1024, it)
            writer.add_scalar("train/flops", it * 2.0**40, it)
    for it in (20, 40):
        writer.add_scalar("valid/loss", 5.0 - it / 20, it)
    writer.add_scalar("other/ignored", 1.0, 1)
    writer.close()


def test_tensorboard_fallback(tmp_path, capsys):
    run_dir = tmp_path / "tb-run"
    write_tensorboard(run_dir / "tensorboard")  # the event files may sit in a subdirectory
    run = load_run("tb-run", run_dir)
    assert [(r.iteration, r.loss, r.tokens, r.flops) for r in run.train] == [
        (it, float(np.float32(10.0 - it / 10)), it * 1024, it * 2.0**40) for it in (10, 20, 30, 40)
    ]
    assert [(r.iteration, r.tokens) for r in run.valid] == [(20, 20 * 1024), (40, 40 * 1024)]
    summary = summarize(run)
    assert summary.final_valid_loss == 3.0
    assert summary.final_valid_ppl == math.exp(3.0)
    assert summary.tokens == 40 * 1024
    assert summary.flops == 40 * 2.0**40
    assert summary.mean_tokens_per_s == 25_000.0
    assert summary.peak_mem_gib == 3.0

    out = tmp_path / "tb.png"
    assert main([str(run_dir), "--out", str(out)]) == 0
    assert png_size(out) == expected_png_size()
    assert "TensorBoard" in capsys.readouterr().err


def test_tensorboard_without_token_counts_plots_against_iterations(tmp_path, capsys):
    write_tensorboard(tmp_path / "iters", with_tokens=False)
    run = load_run("iters", tmp_path / "iters")
    assert all(r.tokens is None and r.flops is None for r in run.train + run.valid)
    assert summarize(run).tokens is None
    assert main([str(tmp_path / "iters"), "--out", str(tmp_path / "i.png")]) == 0
    captured = capsys.readouterr()
    assert "x axis is iterations" in captured.err
    assert captured.out.splitlines()[2].split()[3:5] == ["-", "-"]  # tokens and FLOPs unknown


def test_tensorboard_dir_without_loss_tags(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path / "tb")) as writer:
        writer.add_scalar("lr", 0.1, 1)
    assert "no metrics found in TensorBoard log" in error_of([str(tmp_path / "tb"), "--out",
                                                             str(tmp_path / "p.png")], capsys)


def test_moving_average():
    assert compare.moving_average([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert compare.moving_average([1.0, 3.0], 1).tolist() == [1.0, 3.0]


def test_wrapper_script_runs(tmp_path):
    write_run(tmp_path / "cola", cola_records())
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "compare.py"), str(tmp_path / "cola"), "--out",
         str(tmp_path / "w.png")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "cola" in result.stdout and (tmp_path / "w.png").exists()


def run_header(run_id, resumed_iteration):
    return {"kind": "run", "run_id": run_id, "resumed_iteration": resumed_iteration, "config_hash": "0" * 12}


def test_segments_of_a_resumed_run_read_as_one_curve(tmp_path):
    """The first segment logged 30 and 40 past its checkpoint at 20 and died; the resume logs every 20."""
    records = [
        run_header("a", 0),
        train_record(10, 9.0, 1.0, 1.0), train_record(20, 8.0, 1.0, 1.0), valid_record(20, 7.9),
        train_record(30, 7.0, 1.0, 1.0), train_record(40, 6.9, 1.0, 1.0), valid_record(40, 6.8),
        run_header("a", 20),
        train_record(40, 6.5, 1.0, 1.0), valid_record(40, 6.4), train_record(60, 6.0, 1.0, 1.0),
        run_header("a", 60),  # started again at the end: nothing more
    ]
    run = load_run("resumed", write_run(tmp_path / "resumed", records))
    assert [(r.iteration, r.loss) for r in run.train] == [(10, 9.0), (20, 8.0), (40, 6.5), (60, 6.0)]
    assert [(r.iteration, r.loss) for r in run.valid] == [(20, 7.9), (40, 6.4)]
    assert run.notes == []


def test_a_new_run_in_the_same_directory_replaces_the_old_one(tmp_path, capsys):
    records = [run_header("old", 0), train_record(10, 9.0, 1.0, 1.0), train_record(20, 8.0, 1.0, 1.0),
               run_header("new", 0), train_record(10, 5.0, 1.0, 1.0)]
    run_dir = write_run(tmp_path / "reused", records)
    run = load_run("reused", run_dir)
    assert [(r.iteration, r.loss) for r in run.train] == [(10, 5.0)]
    assert run.notes == [f"{run_dir / 'metrics.jsonl'} holds 2 runs: read the last (new), ignored the earlier one "
                         "(old)"]
    assert main([str(run_dir), "--out", str(tmp_path / "p.png")]) == 0
    assert "holds 2 runs" in capsys.readouterr().err
