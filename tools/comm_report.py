#!/usr/bin/env python
"""Tensor-parallel communication per transformer block: dense vs CoLA 'pair' vs CoLA 'bottleneck', measured on CPU
gloo processes and analytic, side by side.

    python tools/comm_report.py --config configs/cola/llama_1b.yaml --tp 4 --sp
    python tools/comm_report.py --d 2048 --r 512 --ffn 5464 --seq 256 --micro-batch 8 --tp 4 --sp

The logic and the byte formulas live in cola_megatron/analysis/comm_report.py.
"""

import sys

from cola_megatron.analysis.comm_report import main

if __name__ == "__main__":
    sys.exit(main())
