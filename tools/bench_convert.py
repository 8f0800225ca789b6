#!/usr/bin/env python
"""Benchmark cola-convert at scale: a random CoLA checkpoint in the reference implementation's layout (7B by
default), then ``from-hf`` → ``reshard --tp 4 --pp 2`` → ``to-hf``, each as its own command.

Per step it prints the wall time, the peak memory of all the command's processes together (Pss_Anon + Pss_Shmem of
/proc/PID/smaps_rollup, sampled every 10 ms: what the kernel cannot reclaim), the throughput (weight bytes / wall)
and the disk-bound time: the step's bytes read and written at this disk's sequential speeds, measured first on a
scratch file in the work directory (written with fsync; read after dropping that file's cached pages).

    python tools/bench_convert.py                      # 7B (5.25 GiB of bf16 weights); needs ~25 GB of disk
    python tools/bench_convert.py --layers 4 --dir /tmp/bench
"""

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time


def disk_speed_once(directory: str, size: int):
    path = os.path.join(directory, "disk-speed")
    block = os.urandom(16 << 20)
    start = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = size / (time.monotonic() - start)
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # this file's pages only
        start = time.monotonic()
        while f.read(16 << 20):
            pass
    read = size / (time.monotonic() - start)
    os.remove(path)
    return write, read


def disk_speeds(directory: str, size: int = 1 << 30, tries: int = 3):
    """(write, read) bytes per second of sequential I/O in ``directory``: the best of ``tries`` probes, after
    earlier writes are flushed (a virtual disk's speed varies from probe to probe; the best makes the disk-bound
    time the least, and so the wall/bound ratio the most conservative)."""
    os.sync()
    probes = [disk_speed_once(directory, size) for _ in range(tries)]
    return max(w for w, _ in probes), max(r for _, r in probes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="7b", choices=["7b", "1b", "60m"], help="the reference model's shape")
    parser.add_argument("--layers", type=int, help="fewer layers than the shape has (a quicker run)")
    parser.add_argument("--dir", help="work directory (default: a new one under the system's temp directory)")
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints written")
    args = parser.parse_args(argv)

    import torch

    from cola_megatron.convert import measure

    work = tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        write_speed, read_speed = disk_speeds(work)
        fields = measure.reference_config(args.size, args.layers)
        start = time.monotonic()
        model_bytes = measure.write_random_reference(os.path.join(work, "reference"), fields, torch.bfloat16)
        print(f"random CoLA-{args.size} ({fields['num_hidden_layers']} layers, bf16): {model_bytes / 2**30:.2f} GiB "
              f"of weights in {time.monotonic() - start:.0f} s; disk: write {write_speed / 1e6:.0f} MB/s, "
              f"read {read_speed / 1e6:.0f} MB/s")
        print(f"host: {os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} "
              f"GiB RAM, Python {platform.python_version()}, torch {torch.__version__}")
        steps = [
            ("from-hf", ["from-hf", "reference", "ckpt"], "reference", "ckpt"),
            (f"reshard TP{args.tp} PP{args.pp}", ["reshard", "ckpt", "resharded", "--tp", str(args.tp),
                                                   "--pp", str(args.pp)], "ckpt", "resharded"),
            ("to-hf", ["to-hf", "resharded", "hf", "--no-tokenizer"], "resharded", "hf"),
        ]
        print(f"{'step':<18} {'wall s':>8} {'peak GB':>8} {'MB/s':>7} {'disk-bound s':>13} "
              f"{'wall/bound':>11}")
        failed = False
        for name, argv, source, output in steps:
            command = [sys.executable, "-m", "cola_megatron.convert.cli", *[
                os.path.join(work, a) if a in ("reference", "ckpt", "resharded", "hf") else a for a in argv]]
            done, peak, wall = measure.run_measured(command, env=env)
            if done.returncode != 0:
                print(f"{name}: failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
                failed = True
                break
            read = measure.tree_bytes(os.path.join(work, source))
            written = measure.tree_bytes(os.path.join(work, output))
            bound = read / read_speed + written / write_speed
            print(f"{name:<18} {wall:8.1f} {peak / 1e9:8.2f} {model_bytes / 1e6 / wall:7.0f} "
                  f"{bound:13.1f} {wall / bound:11.2f}")
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
