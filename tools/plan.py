#!/usr/bin/env python
"""Choose a parallel layout: predicted per-GPU memory and per-step communication of every layout, ranked.

Same as the `cola-plan` console script; see cola_megatron/analysis/plan.py for the model and options.
"""

import sys

from cola_megatron.analysis.plan import main

if __name__ == "__main__":
    sys.exit(main())
