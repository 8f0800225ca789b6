"""cola-megatron: CoLA (low-rank activation) language-model pre-training on megatron-core."""

__version__ = "0.1.0"
