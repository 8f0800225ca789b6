#!/usr/bin/env python
"""Pre-train a CoLA or dense model; same as the `cola-train` console script (and `python -m cola_megatron.train`).

    torchrun --nproc-per-node 8 tools/train.py --config configs/cola/llama_1b.yaml
"""

import sys

from cola_megatron.train import main

if __name__ == "__main__":
    sys.exit(main())
