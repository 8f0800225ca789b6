"""What a short run reports, read back from its console output, metrics.jsonl and TensorBoard events.

One launched pair of gloo processes (data parallel 2) runs the command line five times: a fresh run whose last
checkpoint is then lost (as when a job dies while saving), a resume that re-trains from the checkpoint before it, the
same command again (nothing left to train), an fp16 run whose first steps overflow, a run traced by the profiler
on rank 1 only, and a finished run whose "nothing left to train" advice is then followed.
"""

import contextlib
import glob
import io
import json
import math
import os
import re
import shutil
from datetime import datetime, timezone

import pytest
import yaml

from tests.distributed import run_distributed

SHAPE = ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_layers=2", "model.num_attention_heads=4",
         "model.rank=16", "model.vocab_size=256", "model.seq_length=32"]
MOCK = ["data.mock=true", "data.train_paths=[]", "data.valid_paths=[]", "data.tokenizer=null"]
TOKENS_PER_STEP = 4 * 32  # global batch x sequence length
WORLD = 2


def base_args(tmp):
    return ["--config", "configs/demo.yaml", *MOCK, *SHAPE, "train.global_batch_size=4", "train.micro_batch_size=2",
            "train.eval_iters=1", "train.eval_interval=2", "optimizer.warmup_iters=1", "optimizer.decay_iters=6",
            "logging.log_interval=2",
            f"logging.log_dir={tmp}/log", f"checkpoint.save_dir={tmp}/ckpt", "checkpoint.save_interval=2",
            "checkpoint.keep_last=null"]


def _cli(tmp, name, argv):
    from cola_megatron.train import main

    _new_group(tmp, name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, out.getvalue()


def _runs(tmp):
    from cola_megatron.training.checkpoint import write_latest

    out = {"first": _cli(tmp, "first", base_args(tmp) + ["train.train_iters=4"])}
    # The save at iteration 4 never committed: `latest` still names iter_2 and the last segment logged past it.
    if os.environ["RANK"] == "0":
        shutil.rmtree(f"{tmp}/ckpt/iter_0000004")
        write_latest(f"{tmp}/ckpt", "iter_0000002")
    out["resumed"] = _cli(tmp, "resumed", base_args(tmp) + ["train.train_iters=6"])
    out["again"] = _cli(tmp, "again", base_args(tmp) + ["train.train_iters=6"])
    out["fp16"] = _cli(tmp, "fp16", ["--config", "configs/demo.yaml", *MOCK, *SHAPE, "train.global_batch_size=4",
                        "train.micro_batch_size=2", "train.train_iters=2", "train.precision=fp16",
                        "train.eval_iters=0", "optimizer.warmup_iters=1", "logging.log_interval=1",
                        "logging.peak_tflops=1.0", f"logging.log_dir={tmp}/fp16", "checkpoint.save_dir=null",
                        "checkpoint.save_interval=0"])
    out["profiled"] = _cli(tmp, "profiled", ["--config", "configs/demo.yaml", *MOCK, *SHAPE, "train.global_batch_size=4",
                            "train.micro_batch_size=2", "train.train_iters=4", "train.eval_iters=0",
                            "optimizer.warmup_iters=1", "logging.log_interval=2", f"logging.log_dir={tmp}/prof",
                            "checkpoint.save_dir=null", "checkpoint.save_interval=0", "train.profile.enabled=true",
                            "train.profile.start_step=2", "train.profile.end_step=3", "train.profile.ranks=[1]"])
    # A finished run whose decay length follows train_iters (the demo's): its advice, followed literally.
    advice = ["--config", "configs/demo.yaml", *MOCK, *SHAPE, "train.global_batch_size=4", "train.micro_batch_size=2",
              "train.eval_iters=0", "optimizer.warmup_iters=1", "logging.log_dir=null",
              f"checkpoint.save_dir={tmp}/advice", "checkpoint.save_interval=2"]
    out["advice_done"] = _cli(tmp, "advice_done", advice + ["train.train_iters=2"])
    out["advice_again"] = _cli(tmp, "advice_again", advice + ["train.train_iters=2"])
    suggested = _from_rank0(tmp, "advice", _suggested_overrides(out["advice_again"][1]))
    out["advice_followed"] = _cli(tmp, "advice_followed", advice + suggested)
    return out


def _suggested_overrides(stdout):
    """The overrides the "nothing left to train" message suggests (None where it was not printed)."""
    line = next((line for line in stdout.splitlines() if "nothing left to train" in line), None)
    return line and line.split("(e.g. ")[1].split(")")[0].split()


def _from_rank0(tmp, name, value):
    """Rank 0's value on every rank (only rank 0 prints the run's messages)."""
    import time

    path = os.path.join(tmp, f"{name}.json")
    if os.environ["RANK"] == "0":
        with open(path + ".tmp", "w") as f:
            json.dump(value, f)
        os.replace(path + ".tmp", path)
    while not os.path.exists(path):
        time.sleep(0.05)
    with open(path) as f:
        return json.load(f)


def _new_group(tmp, n):
    """Each command-line run ends its process group; the next one meets on a new port that rank 0 picks (once it
    has done its file work) and hands over in a file."""
    import time

    from cola_megatron.training.distributed import free_port

    path = os.path.join(tmp, f"port{n}")
    if os.environ["RANK"] == "0":
        with open(path + ".tmp", "w") as f:
            f.write(str(free_port()))
        os.replace(path + ".tmp", path)
    while not os.path.exists(path):
        time.sleep(0.05)
    with open(path) as f:
        os.environ["MASTER_PORT"] = f.read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics_run")
    out = run_distributed(_runs, 2, str(tmp))[0]  # rank 0's console
    return tmp, out


def records(path):
    return [json.loads(line) for line in open(path)]


def segments(recs):
    """Split at run records: [(header, [records...]), ...]."""
    out = []
    for r in recs:
        if r["kind"] == "run":
            out.append((r, []))
        else:
            out[-1][1].append(r)
    return out


def train_lines(stdout):
    return [line for line in stdout.splitlines() if re.match(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ\] iter ", line)]


LINE = re.compile(
    r"^\[(?P<ts>[\d\- :]+)Z\] iter +(?P<it>\d+)/(?P<total>\d+) \| elapsed (?P<elapsed>\d+:\d\d:\d\d) \| "
    r"(?P<ms>[\d.]+) ms/iter \(data (?P<data>[\d.]+) ms\) \| ETA (?P<eta>\d+:\d\d:\d\d) \| tokens (?P<tokens>\S+) \| "
    r"loss (?P<loss>\S+) \| lr (?P<lr>\S+) \| grad_norm (?P<gn>\S+) \| tok/s (?P<tps>\S+) \((?P<tpg>\S+)/gpu\) \| "
    r"TFLOP/s/gpu (?P<tflops>\S+) \| MFU (?P<mfu>n/a \(peak unknown: set logging.peak_tflops\)|[\d.]+%) \| "
    r"HFU (?P<hfu>n/a \(peak unknown: set logging.peak_tflops\)|[\d.]+%) \| "
    r"peak mem (?P<mem>[\d.]+) GiB alloc / (?P<reserved>n/a reserved \(CPU: peak RSS\)|[\d.]+ GiB reserved) \| "
    r"skipped (?P<skipped>\d+)(?P<rest>.*)$")


def hms(seconds):
    from cola_megatron.training.metrics import format_duration

    return format_duration(seconds)


def test_metric_line_matches_its_record(runs):
    tmp, out = runs
    rc, stdout = out["first"]
    assert rc == 0
    lines = train_lines(stdout)
    train = [r for r in records(tmp / "log" / "metrics.jsonl") if r["kind"] == "train"][:2]  # the first segment
    assert [r["iteration"] for r in train] == [2, 4] and len(lines) == 2
    for line, r in zip(lines, train):
        m = LINE.match(line)
        assert m, line
        assert m["ts"] == r["timestamp"][:19].replace("T", " ")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["timestamp"])
        assert (int(m["it"]), int(m["total"])) == (r["iteration"], 4)
        assert m["elapsed"] == hms(r["elapsed_s"]) and m["eta"] == hms(r["eta_s"])
        assert float(m["ms"]) == pytest.approx(r["ms_per_iter"], abs=0.051)
        assert float(m["data"]) == pytest.approx(r["data_ms_per_iter"], abs=0.051)
        assert 0 < r["data_ms_per_iter"] < r["ms_per_iter"]
        assert r["tokens"] == r["iteration"] * TOKENS_PER_STEP and float(m["tokens"]) == r["tokens"]
        assert float(m["loss"]) == pytest.approx(r["loss"], abs=5e-5) and math.isfinite(r["loss"])
        assert float(m["lr"]) == pytest.approx(r["lr"], rel=1e-3)
        assert float(m["gn"]) == pytest.approx(r["grad_norm"], abs=5e-4)
        assert float(m["tps"]) == pytest.approx(r["tokens_per_s"], rel=1e-3)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / WORLD, rel=1e-12)
        assert float(m["tpg"]) == pytest.approx(r["tokens_per_s_per_gpu"], rel=1e-3)
        assert float(m["tflops"]) == pytest.approx(r["tflops_per_gpu"], abs=0.006)
        assert r["mfu"] is None and m["mfu"].startswith("n/a (peak unknown")  # CPU: no peak to divide by
        assert r["hfu"] is None and m["hfu"].startswith("n/a (peak unknown")
        assert float(m["mem"]) == pytest.approx(r["peak_mem_gib"], abs=0.006) and r["peak_mem_gib"] > 0
        assert r["peak_mem_reserved_gib"] is None and m["reserved"].startswith("n/a")
        assert int(m["skipped"]) == r["skipped"] == 0
        assert r["loss_scale"] is None and "loss_scale" not in line  # not fp16
    # ETA: the iterations left at the segment's mean time per iteration; 0 at the end.
    first = train[0]
    assert first["eta_s"] == pytest.approx(2 * first["elapsed_s"] / 2, rel=1e-6)
    assert train[1]["eta_s"] == 0 and lines[1].split("| ETA ")[1].startswith("0:00:00")


def test_interval_with_eval_and_save_excludes_their_time(runs):
    tmp, out = runs
    _, stdout = out["first"]
    header, recs = segments(records(tmp / "log" / "metrics.jsonl"))[0]
    valid2 = next(r for r in recs if r["kind"] == "valid" and r["iteration"] == 2)
    save2 = next(r for r in recs if r["kind"] == "checkpoint" and r["iteration"] == 2)
    train4 = next(r for r in recs if r["kind"] == "train" and r["iteration"] == 4)
    # their own lines, with their durations
    assert re.search(rf"\] validation at iter 2: loss {valid2['loss']:.4f} \| perplexity {valid2['ppl']:.2f} \| "
                     rf"{valid2['seconds']:.2f} s", stdout)
    assert f"] checkpoint at iter 2: {save2['seconds']:.2f} s" in stdout
    assert save2["path"].endswith("ckpt/iter_0000002") and save2["async"] is False
    assert valid2["seconds"] > 0 and save2["seconds"] > 0
    # the interval (2, 4] held that evaluation and that save; its rates are over the rest of its time
    assert train4["excluded_s"] == pytest.approx(valid2["seconds"] + save2["seconds"], abs=0.05)
    assert train4["train_s"] == pytest.approx(train4["interval_s"] - train4["excluded_s"], rel=1e-9)
    assert train4["tokens_per_s"] == pytest.approx(2 * TOKENS_PER_STEP / train4["train_s"], rel=1e-9)
    assert train4["ms_per_iter"] == pytest.approx(1000 * train4["train_s"] / 2, rel=1e-9)
    assert train4["tokens_per_s"] * train4["interval_s"] > 2 * TOKENS_PER_STEP  # wall-clock rate would be lower
    assert "excl." in train_lines(stdout)[1] and f"{train4['excluded_s']:.2f} s eval/save" in train_lines(stdout)[1]
    # the first interval held neither
    train2 = next(r for r in recs if r["kind"] == "train" and r["iteration"] == 2)
    assert train2["excluded_s"] < 0.01 and train2["train_s"] == pytest.approx(train2["interval_s"], abs=0.01)


def test_run_records_one_per_segment(runs):
    tmp, out = runs
    import torch

    import cola_megatron

    segs = segments(records(tmp / "log" / "metrics.jsonl"))
    headers = [h for h, _ in segs]
    assert [h["resumed_iteration"] for h in headers] == [0, 2, 6]
    assert headers[0]["resumed_from"] is None
    assert headers[1]["resumed_from"].endswith("ckpt/iter_0000002")
    assert headers[2]["resumed_from"].endswith("ckpt/iter_0000006")
    assert len({h["run_id"] for h in headers}) == 1 and re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", headers[0]["run_id"])
    for h in headers:
        assert h["layout"] == {"tp": 1, "pp": 1, "dp": 2, "vp": 1, "world_size": 2}
        assert h["versions"]["torch"] == torch.__version__
        assert h["versions"]["cola-megatron"] == cola_megatron.__version__
        assert h["versions"]["megatron-core"].startswith("0.")
        assert h["hosts"] == 1 and h["device"] == "cpu"
        assert re.fullmatch(r"[0-9a-f]{12}", h["config_hash"])
    assert [h["train_iters"] for h in headers] == [4, 6, 6]
    assert headers[0]["config_hash"] != headers[1]["config_hash"] == headers[2]["config_hash"]
    # console: the run line of every start
    for name in ("first", "resumed", "again"):
        assert re.search(r"^cola-train: run \d{8}-\d{6}-[0-9a-f]{6} \| config [0-9a-f]{12} \| torch ",
                         out[name][1], re.M)
    # no segment logs a step twice, nor one at or before the iteration it resumed from
    for header, recs in segs:
        for kind in ("train", "valid", "checkpoint"):
            its = [r["iteration"] for r in recs if r["kind"] == kind]
            assert its == sorted(set(its)), (kind, its)
            assert all(i > header["resumed_iteration"] for i in its), (kind, its)
    assert [(r["kind"], r["iteration"]) for r in segs[1][1] if r["kind"] != "checkpoint"] == [
        ("train", 4), ("valid", 4), ("train", 6), ("valid", 6)]


def test_resume_says_what_it_does(runs):
    tmp, out = runs
    rc, stdout = out["resumed"]
    assert rc == 0
    assert f"cola-train: resumed from {tmp}/ckpt/iter_0000002: 2 of 6 iterations done, 4 to go" in stdout
    rc, stdout = out["again"]
    assert rc == 0
    assert f"cola-train: resumed from {tmp}/ckpt/iter_0000006: 6 of 6 iterations done\n" in stdout
    assert ("cola-train: nothing left to train: the run is at iteration 6 and train.train_iters=6. To train on, "
            "raise train.train_iters (e.g. train.train_iters=12); to start a new run, choose a new "
            "checkpoint.save_dir") in stdout
    assert not train_lines(stdout) and "validation" not in stdout and "saved checkpoint" not in stdout
    assert segments(records(tmp / "log" / "metrics.jsonl"))[-1][1] == []  # a header, and nothing repeated


def test_nothing_left_advice_trains_on(runs):
    """With a decay length that follows train_iters, raising train_iters alone would be refused for the schedule
    it changes; the advice names the key that settles it, and following it trains on."""
    tmp, out = runs
    assert out["advice_done"][0] == 0 and out["advice_again"][0] == 0
    assert _suggested_overrides(out["advice_again"][1]) == ["train.train_iters=4", "checkpoint.scheduler_from=checkpoint"]
    rc, stdout = out["advice_followed"]
    assert rc == 0, stdout[-3000:]
    assert "2 of 4 iterations done, 2 to go" in stdout
    assert (tmp / "advice" / "latest").read_text().strip() == "iter_0000004"


def test_compare_reads_the_segmented_file_as_one_curve(runs, tmp_path):
    from cola_megatron.analysis.compare import load_run, main

    tmp, _ = runs
    recs = records(tmp / "log" / "metrics.jsonl")
    resumed4 = [r for r in recs if r["kind"] == "train" and r["iteration"] == 4][1]
    run = load_run("resumed", tmp / "log" / "metrics.jsonl")
    assert [(r.iteration, r.loss) for r in run.train] == [
        (2, recs[1]["loss"]), (4, resumed4["loss"]), (6, [r for r in recs if r["kind"] == "train"][-1]["loss"])]
    assert [r.iteration for r in run.valid] == [2, 4, 6]
    assert run.notes == []
    assert main([str(tmp / "log"), "--out", str(tmp_path / "p.png")]) == 0


def test_tensorboard_events_carry_the_fields_and_the_config(runs):
    from tensorboard.backend.event_processing import event_accumulator

    from cola_megatron.config import config_from_dict

    tmp, _ = runs
    acc = event_accumulator.EventAccumulator(str(tmp / "log"), size_guidance={event_accumulator.SCALARS: 0,
                                                                               event_accumulator.TENSORS: 0})
    acc.Reload()
    recs = records(tmp / "log" / "metrics.jsonl")
    # the resumed segment's records, and the first segment's up to its checkpoint (purged after it)
    expect = {"train": {r["iteration"]: r for r in recs if r["kind"] == "train"},
              "valid": {r["iteration"]: r for r in recs if r["kind"] == "valid"},
              "checkpoint": {r["iteration"]: r for r in recs if r["kind"] == "checkpoint"}}
    fields = {"train": ["loss", "lr", "grad_norm", "elapsed_s", "interval_s", "excluded_s", "train_s", "ms_per_iter",
                        "data_ms_per_iter", "eta_s", "tokens", "flops", "tokens_per_s", "tokens_per_s_per_gpu",
                        "tflops_per_gpu", "peak_mem_gib", "skipped"],
              "valid": ["loss", "ppl", "seconds"], "checkpoint": ["seconds"]}
    for kind, keys in fields.items():
        for key in keys:
            events = acc.Scalars(f"{kind}/{key}")
            assert [e.step for e in events] == sorted(expect[kind]), (kind, key)
            for e in events:
                assert e.value == pytest.approx(expect[kind][e.step][key], rel=1e-6, abs=1e-6), (kind, key, e.step)
    # an event's wall time is the record's timestamp (TensorBoard keeps it with every scalar)
    for e in acc.Scalars("train/loss"):
        stamp = datetime.strptime(expect["train"][e.step]["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
        assert abs(e.wall_time - stamp.replace(tzinfo=timezone.utc).timestamp()) < 60
    tags = acc.Tags()
    assert "train/mfu" not in tags["scalars"] and "train/loss_scale" not in tags["scalars"]  # unknown; not fp16
    texts = {tag: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
             for tag in tags["tensors"]}
    assert [step for step, _ in texts["config/text_summary"]] == [0, 2, 6]
    config_text = "\n".join(line[4:] for line in texts["config/text_summary"][-1][1].splitlines())
    assert config_from_dict(yaml.safe_load(config_text)).train.train_iters == 6
    with open(tmp / "ckpt" / "iter_0000006" / "cola_config.yaml") as f:
        assert config_text.strip() == f.read().strip()
    run_text = "\n".join(line[4:] for line in texts["run/text_summary"][1][1].splitlines())
    assert {"kind": "run", **json.loads(run_text)} == segments(recs)[1][0]


def test_print_config_is_the_checkpoint_config(runs, capsys):
    from cola_megatron.config import config_from_dict, load_config
    from cola_megatron.train import main

    tmp, _ = runs
    args = base_args(tmp) + ["train.train_iters=6"]
    assert main(args + ["--print-config"]) == 0
    text = capsys.readouterr().out
    with open(tmp / "ckpt" / "iter_0000006" / "cola_config.yaml") as f:
        assert text == f.read()  # the same file the run wrote with its checkpoint
    assert config_from_dict(yaml.safe_load(text)) == load_config(args[1], args[2:])
    assert "profile:\n    enabled: false" in text


def test_fp16_overflow_skips_and_loss_scale(runs):
    tmp, out = runs
    rc, stdout = out["fp16"]
    assert rc == 0
    train = [r for r in records(tmp / "fp16" / "metrics.jsonl") if r["kind"] == "train"]
    # megatron's dynamic scaler starts at 2**32; these tiny fp16 gradients overflow, each update is skipped and
    # (hysteresis 2) the second overflow halves the scale.
    assert [r["skipped"] for r in train] == [1, 2]
    assert [r["loss_scale"] for r in train] == [2.0**32, 2.0**31]
    assert all(math.isfinite(r["loss"]) for r in train)
    lines = train_lines(stdout)
    assert [LINE.match(line)["skipped"] for line in lines] == ["1", "2"]
    assert "| loss_scale 4.29497e+09" in lines[0] and "| loss_scale 2.14748e+09" in lines[1]
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(tmp / "fp16"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss_scale")] == [(1, 2.0**32), (2, 2.0**31)]
    assert [(e.step, e.value) for e in acc.Scalars("train/skipped")] == [(1, 1), (2, 2)]
    assert [e.value for e in acc.Scalars("train/mfu")] == pytest.approx([r["mfu"] for r in train], rel=1e-6)
    # with logging.peak_tflops the MFU is computed against it
    for line, r in zip(lines, train):
        assert r["mfu"] == pytest.approx(100 * r["tflops_per_gpu"] / 1.0, rel=1e-9)
        assert r["hfu"] == pytest.approx(r["mfu"], rel=1e-9)  # no recomputation: hardware FLOPs = model FLOPs
        assert f"| MFU {r['mfu']:.1f}% | HFU {r['hfu']:.1f}% |" in line


def test_nan_loss_logged_as_nan():
    from cola_megatron.training.metrics import format_train_line

    record = {"iteration": 3, "timestamp": "2026-01-31T12:00:00.000Z", "elapsed_s": 3725.0, "ms_per_iter": 12.34,
              "data_ms_per_iter": 0.5, "eta_s": 90061.0, "tokens": 1000, "loss": float("nan"), "lr": 1e-3,
              "grad_norm": float("nan"), "tokens_per_s": 10.0, "tokens_per_s_per_gpu": 5.0, "tflops_per_gpu": 1.0,
              "mfu": None, "peak_mem_gib": 1.0, "peak_mem_reserved_gib": 2.0, "skipped": 3, "loss_scale": None}
    line = format_train_line(record, 10)
    assert line.startswith("[2026-01-31 12:00:00Z] iter       3/10 | elapsed 1:02:05 | 12.3 ms/iter (data 0.5 ms) "
                           "| ETA 1d 01:01:01 |")
    assert "| loss nan |" in line and "| grad_norm nan |" in line and "| skipped 3" in line
    assert "| peak mem 1.00 GiB alloc / 2.00 GiB reserved |" in line
    assert "HFU" not in line
    assert "| MFU n/a (peak unknown: set logging.peak_tflops) | HFU 40.0% |" in format_train_line(
        dict(record, hfu=40.0), 10)
    assert os.linesep not in line


def test_profiler_trace_of_the_requested_iterations_on_the_requested_rank(runs):
    tmp, _ = runs
    trace_dir = tmp / "prof" / "profile"
    traces = glob.glob(str(trace_dir / "*.pt.trace.json"))
    assert [os.path.basename(t).split(".")[0] for t in traces] == ["rank1"]  # rank 0 was not asked for
    assert sorted(os.listdir(trace_dir)) == sorted([os.path.basename(traces[0]), "rank1.ops.txt"])
    with open(traces[0]) as f:
        trace = json.load(f)  # the Chrome trace format, named as TensorBoard's profiler plugin looks for it
    labels = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("iteration ")}
    assert labels == {"iteration 2", "iteration 3"}
    assert any(e.get("name") == "aten::mm" for e in trace["traceEvents"])  # the model's work is in the window
    assert "aten::mm" in (trace_dir / "rank1.ops.txt").read_text()
    assert not glob.glob(str(trace_dir / "*memory_snapshot*"))  # CUDA only


def test_metric_line_says_where_the_profiler_trace_went(runs):
    tmp, out = runs
    lines = train_lines(out["profiled"][1])
    assert len(lines) == 2
    assert "profiler" not in lines[0]  # iteration 2: the window (2-3) is still open
    where = f"{tmp}/prof/profile (iterations 2-3, rank 1)"
    assert lines[1].endswith(f"| profiler trace -> {where}")
    train = [r for r in records(tmp / "prof" / "metrics.jsonl") if r["kind"] == "train"]
    assert "profile_dir" not in train[0] and train[1]["profile_dir"] == where
