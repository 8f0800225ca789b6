#!/usr/bin/env python
"""Check a GPU run end to end in one command (docs/gpu-check.md): environment, correctness, speed, memory model and
the 60M quality run, each phase in its own time box; `--cpu` runs the same phases at tiny shapes."""

import os
import sys

# This checkout's package first, also where none is installed (a GPU machine with only the carried wheels).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cola_megatron.analysis.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
