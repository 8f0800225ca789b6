"""Checkpoint conversion: megatron ``torch_dist`` ↔ Hugging Face, resharding, and warm starts from dense LLaMA.

``cola-convert`` (:mod:`cola_megatron.convert.cli`) is the command line; the modules below each hold one concern:

- :mod:`.names`: megatron's global tensors ↔ the reference implementation's parameter names, and the two configs.
- :mod:`.megatron_io`: reading full tensors from a ``torch_dist`` checkpoint of any layout, writing one.
- :mod:`.hf_io`: the Hugging Face directory (config.json, shipped code, safetensors shards, tokenizer) both ways.
- :mod:`.dense`: a CoLA state dict from a dense LLaMA by truncated SVD.
- :mod:`.reshard`: rewriting a checkpoint from the processes of another TP/PP layout.
"""

from cola_megatron.errors import ConversionError

__all__ = ["ConversionError"]
