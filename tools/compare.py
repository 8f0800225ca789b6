#!/usr/bin/env python
"""Compare training runs: loss vs tokens and FLOPs in one PNG, plus a summary table.

Same as the `cola-compare` console script; see cola_megatron/analysis/compare.py for the input formats.
"""

import sys

from cola_megatron.analysis.compare import main

if __name__ == "__main__":
    sys.exit(main())
