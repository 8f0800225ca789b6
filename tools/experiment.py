#!/usr/bin/env python
"""Train an experiment's variants and plot them; same as the `cola-experiment` console script."""

import sys

from cola_megatron.analysis.experiment import main

if __name__ == "__main__":
    sys.exit(main())
