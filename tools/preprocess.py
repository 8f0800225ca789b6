"""Tokenize raw text into megatron .bin/.idx files (same as the `cola-preprocess` command).

    python tools/preprocess.py --input corpus/ --output-prefix data/train \
        --train-tokenizer data/tokenizer.json --vocab-size 32000 --workers 8
"""

import sys

if __name__ == "__main__":
    from cola_megatron.data.preprocess import main

    sys.exit(main())
