"""tools/bench_convert.py end to end on a small model: a random reference checkpoint, from-hf → reshard → to-hf as
real commands, and a table whose numbers agree with each other and with the files it wrote."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = re.compile(r"^(from-hf|reshard TP2 PP1|to-hf)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$")


def test_bench_convert_reports_each_step_and_cleans_up(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_convert.py"), "--size", "60m",
                           "--layers", "2", "--tp", "2", "--pp", "1", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    header = re.search(r"random CoLA-60m \(2 layers, bf16\): ([\d.]+) GiB of weights", done.stdout)
    assert header, done.stdout
    model_mb = float(header.group(1)) * 2**30 / 1e6
    rows = [ROW.match(line.strip()) for line in done.stdout.splitlines()]
    rows = {m.group(1): [float(x) for x in m.groups()[1:]] for m in rows if m}
    assert list(rows) == ["from-hf", "reshard TP2 PP1", "to-hf"], done.stdout
    for step, (wall, peak_gb, mb_per_s, bound, ratio) in rows.items():
        assert 0.1 < peak_gb < 4, (step, done.stdout)  # an interpreter with torch loaded, far from the whole host
        assert abs(mb_per_s - model_mb / wall) <= 0.05 * mb_per_s + 1, (step, done.stdout)  # wall is rounded
        assert bound > 0 and ratio > 0, (step, done.stdout)  # the model read and written at the disk's speeds
    assert os.listdir(tmp_path) == []  # the work directory is removed without --keep
