#!/usr/bin/env python
"""Benchmark model variants side by side with full training steps; same as the `cola-bench` console script."""

import sys

from cola_megatron.analysis.bench import main

if __name__ == "__main__":
    sys.exit(main())
