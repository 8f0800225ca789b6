"""Checkpoint conversion: megatron ``torch_dist`` ↔ Hugging Face, resharding, and warm starts from dense LLaMA.

``cola-convert`` (:mod:`cola_megatron.convert.cli`) is the command line; the modules below each hold one concern:

- :mod:`.names`: megatron's tensors ↔ the reference implementation's (or LLaMA's) parameter names, and the configs.
- :mod:`.megatron_io`: reading a few unsplit tensors at a time from a ``torch_dist`` checkpoint of any layout, and
  writing one from file-backed scratch tensors.
- :mod:`.hf_io`: the Hugging Face directory (config.json, shipped code, safetensors shards written tensor by tensor,
  tokenizer) both ways.
- :mod:`.dense`: CoLA factors of a dense LLaMA by truncated SVD, a layer at a time.
- :mod:`.reshard`: rewriting a checkpoint from the processes of another TP/PP layout.
- :mod:`.progress`, :mod:`.memory`: the progress bar; returning freed buffers to the kernel.
- :mod:`.measure`: random reference checkpoints and the memory sampler (benchmarks and tests).
"""

from cola_megatron.errors import ConversionError

__all__ = ["ConversionError"]
