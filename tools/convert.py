"""Convert checkpoints (same as the `cola-convert` command): torch_dist ↔ Hugging Face, reshard, dense warm starts.

    python tools/convert.py to-hf checkpoints/run export/
    python tools/convert.py from-hf export/ checkpoints/imported
    python tools/convert.py reshard checkpoints/run checkpoints/run-tp2 --tensor-parallel 2 --pipeline-parallel 1
    python tools/convert.py from-dense llama-dir/ checkpoints/warm --rank 256
"""

import sys

if __name__ == "__main__":
    from cola_megatron.convert.cli import main

    sys.exit(main())
