"""Hugging Face model directories: writing a CoLA export and reading CoLA (or dense LLaMA) checkpoints.

An export is self-contained: ``config.json`` (model_type ``cola``, ``auto_map``, ``tokenizer_class``), the shipped
``configuration_cola.py`` / ``modeling_cola.py`` (torch + transformers only), ``generation_config.json`` (the special
ids generation stops and pads with), the weights as safetensors (one ``model.safetensors``, or shards with
``model.safetensors.index.json`` above ``max_shard_size``, written by ``huggingface_hub``'s own sharding), and the
tokenizer when the run had one (its ``model_input_names`` are ids and mask only, so ``generate(**tokenizer(text))``
passes nothing the model does not take), so that

    AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    AutoTokenizer.from_pretrained(export, trust_remote_code=True)   # a PreTrainedTokenizerFast

work offline. (transformers 5 reads config.json, with its remote-code auto_map, even for the tokenizer, hence the
flag there too.)
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

from cola_megatron.errors import ConversionError

SHIPPED_MODULES = ("configuration_cola.py", "modeling_cola.py")
SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Buffers some checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# What the shipped tokenizer is and returns: a fast tokenizer, without the token_type_ids CoLA models do not take.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
MODEL_INPUT_NAMES = ("input_ids", "attention_mask")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConversionError("Hugging Face conversion needs transformers: pip install 'cola-megatron[hf]'") from None


def _shipped_dir() -> str:
    from cola_megatron import hf

    return os.path.dirname(os.path.abspath(hf.__file__))


# --------------------------------------------------------------------------------------------------------------
# Writing


def tokenizer_special_ids(tokenizer_file: str, model_vocab_size: Optional[int] = None) -> Dict[str, Optional[int]]:
    """eos (the end-of-document token) and pad ids of a ``tokenizer.json``, found as the data pipeline finds them;
    the tokenizer must fit the model's vocabulary."""
    from cola_megatron.errors import DataError
    from cola_megatron.data.tokenizer import TokenizerAdapter, check_vocab

    try:
        adapter = TokenizerAdapter(tokenizer_file)
        if model_vocab_size is not None:
            check_vocab(adapter, model_vocab_size)
    except DataError as e:
        raise ConversionError(f"{e} (or pass --tokenizer PATH / --no-tokenizer)") from None
    try:
        pad = adapter.pad
    except AttributeError:  # no pad token: generation pads with eos
        pad = None
    return {"bos_token_id": None, "eos_token_id": adapter.eod, "pad_token_id": pad}


def save_tokenizer(tokenizer_file: str, out_dir: str, model_max_length: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (PreTrainedTokenizerFast) so AutoTokenizer loads it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    ids = tokenizer_special_ids(tokenizer_file)
    backend = Tokenizer.from_file(tokenizer_file)
    names = {k.replace("_id", ""): backend.id_to_token(v) for k, v in ids.items() if v is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, model_max_length=model_max_length,
                                        model_input_names=list(MODEL_INPUT_NAMES), **names)
    tokenizer.save_pretrained(out_dir)
    # Name the class every transformers version resolves (v5 writes its own alias, unknown to v4).
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["tokenizer_class"] = TOKENIZER_CLASS
    tokenizer_config["model_input_names"] = list(MODEL_INPUT_NAMES)
    with open(config_path, "w") as f:
        json.dump(tokenizer_config, f, indent=2)


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class SafetensorsShards:
    """Safetensors files written one tensor at a time, in an order known in advance.

    ``safetensors.torch.save_file`` (and ``huggingface_hub``'s sharded saving on top of it) needs every tensor of a
    file in memory at once; a file's header (names, dtypes, shapes, byte ranges) only needs their shapes, so it is
    written first and each tensor's bytes follow as the tensor is converted, then freed. Files are split like
    Hugging Face's ``max_shard_size`` (``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``).
    """

    def __init__(self, out_dir: str, layout: Sequence[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_size: int):
        self.out_dir, self.dtype = out_dir, dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        shards, size = [[]], 0
        for name, shape in layout:
            nbytes = itemsize * _numel(shape)
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), nbytes))
            size += nbytes
        count = len(shards)
        self.files = [SAFETENSORS_FILE] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.shards = shards
        self.total_bytes = sum(n for shard in shards for _, _, n in shard)
        self.pending = [(f, name, nbytes) for f, shard in enumerate(shards) for name, _, nbytes in shard]
        self.position = 0
        self.stream = None
        self.current = -1

    def _open(self, index: int) -> None:
        if self.stream is not None:
            self.stream.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nbytes in self.shards[index]:
            header[name] = {"dtype": SAFETENSORS_DTYPES[self.dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
        self.stream = open(os.path.join(self.out_dir, self.files[index]), "wb")
        self.stream.write(len(encoded).to_bytes(8, "little") + encoded)
        self.current = index

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next tensor of the layout (cast to the export dtype); returns its bytes."""
        shard, expected, nbytes = self.pending[self.position]
        if name != expected:
            raise ConversionError(f"internal error: export tensor {name} written where {expected} belongs")
        if shard != self.current:
            self._open(shard)
        data = tensor.detach().to(self.dtype).contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != nbytes:
            raise ConversionError(f"{name} has {data.numel()} bytes, its header says {nbytes}")
        self.stream.write(memoryview(data.numpy()))
        self.position += 1
        return nbytes

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self.position != len(self.pending):
            raise ConversionError(f"internal error: {len(self.pending) - self.position} export tensors not written")
        if len(self.files) > 1:
            weight_map = {name: self.files[f] for f, name, _ in self.pending}
            with open(os.path.join(self.out_dir, SAFETENSORS_INDEX), "w") as out:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, out, indent=2)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def parse_size(size: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"60KB"`` or a number of bytes, as Hugging Face's ``max_shard_size``."""
    try:
        from huggingface_hub.serialization._base import parse_size_to_int

        return parse_size_to_int(size)
    except (ValueError, TypeError):
        raise ConversionError(f"--max-shard-size {size!r} is not a size: pass e.g. 5GB, 500MB or a number of "
                              "bytes") from None


def hf_config(config_fields: Mapping[str, Any], dtype: str, tokenizer_file: Optional[str]):
    """The transformers config of an export: ``ColaConfig`` or, for a dense model, ``LlamaConfig``."""
    _require_transformers()
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    fields = dict(config_fields)
    if tokenizer_file:
        # pipeline() and AutoTokenizer find the tokenizer of a model type they do not know through this.
        fields["tokenizer_class"] = TOKENIZER_CLASS
    if fields.get("architectures") == ["LlamaForCausalLM"]:
        from transformers import LlamaConfig

        return LlamaConfig(**fields, torch_dtype=dtype)
    from cola_megatron.hf.configuration_cola import ColaConfig

    return ColaConfig(**fields, dtype=dtype)


def expected_shapes(config) -> Dict[str, Tuple[int, ...]]:
    if config.model_type == "llama":
        from cola_megatron.convert.names import llama_shapes

        return llama_shapes(config.to_dict())
    from cola_megatron.hf.modeling_cola import expected_parameter_shapes

    return expected_parameter_shapes(config)


def write_export(out_dir: str, state: Mapping[str, torch.Tensor], config_fields: Mapping[str, Any],
                 tokenizer_file: Optional[str] = None, max_shard_size: str = "5GB",
                 dtype: str = "float32", ship_code: bool = True) -> None:
    """A loadable Hugging Face directory from reference-named tensors in memory and the config's fields."""
    layout = [(k, tuple(v.shape)) for k, v in state.items()]
    stream_export(out_dir, layout, iter(state.items()), config_fields, tokenizer_file, max_shard_size, dtype,
                  ship_code=ship_code)


def stream_export(out_dir: str, layout: Sequence[Tuple[str, Tuple[int, ...]]], tensors, config_fields,
                  tokenizer_file: Optional[str] = None, max_shard_size: str = "5GB", dtype: str = "float32",
                  progress=None, ship_code: bool = True) -> None:
    """A loadable Hugging Face directory whose tensors come from the iterator ``tensors`` of ``(name, tensor)``
    in ``layout``'s order; each is written as it comes (``progress(nbytes)`` after each). Without ``ship_code`` a
    CoLA export is for the reference implementation's own code (no auto_map, no shipped modeling files)."""
    from transformers import GenerationConfig

    config = hf_config(config_fields, dtype, tokenizer_file)
    check_shapes(dict(layout), expected_shapes(config), "export")
    os.makedirs(out_dir, exist_ok=True)
    shards = SafetensorsShards(out_dir, layout, DTYPES[dtype], parse_size(max_shard_size))
    for name, tensor in tensors:
        nbytes = shards.write(name, tensor)
        if progress:
            progress(nbytes)
    shards.close()
    config.save_pretrained(out_dir)
    _record_dtype(out_dir, dtype)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    if config.model_type == "cola":
        if ship_code:
            for name in SHIPPED_MODULES:
                shutil.copyfile(os.path.join(_shipped_dir(), name), os.path.join(out_dir, name))
        else:
            _drop_auto_map(out_dir)
    if tokenizer_file:
        save_tokenizer(tokenizer_file, out_dir, config.max_position_embeddings)


def _drop_auto_map(out_dir: str) -> None:
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.pop("auto_map", None)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    for name in SHIPPED_MODULES:  # save_pretrained copies the registered configuration class's file
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def _record_dtype(out_dir: str, dtype: str) -> None:
    """config.json names the weights' dtype under both spellings (transformers 5 reads ``dtype``, 4 ``torch_dtype``)."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        values = json.load(f)
    values.update(dtype=dtype, torch_dtype=dtype)
    with open(path, "w") as f:
        json.dump(values, f, indent=2, sort_keys=True)


def check_shapes(got: Mapping[str, Tuple[int, ...]], expected: Mapping[str, Tuple[int, ...]], what: str) -> None:
    """One error naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k}: {tuple(got[k])} instead of {tuple(expected[k])}" for k in expected
             if k in got and tuple(got[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = [f"{label} {items[:4]}{' …' if len(items) > 4 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                 if items]
        raise ConversionError(f"{what} weights do not match their config ({'; '.join(parts)}): the config.json "
                              "must describe these weights (hidden_size, intermediate_size, rank, layers, vocab_size)")


# --------------------------------------------------------------------------------------------------------------
# Reading


def read_config_json(model_dir: str, expected_type) -> Dict[str, Any]:
    """``config.json`` of a Hugging Face model directory, checked for its ``model_type`` (one or a tuple)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    model_type = raw.get("model_type")
    expected = (expected_type,) if isinstance(expected_type, str) else tuple(expected_type)
    if model_type not in expected:
        expected_type = expected[0]
        hint = {
            ("cola", "llama"): "for a dense LLaMA checkpoint use `cola-convert from-dense --rank R`",
            ("llama", "cola"): "for a CoLA checkpoint use `cola-convert from-hf`",
        }.get((expected_type, model_type), f"only model_type {expected_type!r} converts here")
        raise ConversionError(f"{path}: unknown model_type {model_type!r}, expected {' or '.join(map(repr, expected))}"
                              f"; {hint}")
    return raw


def _weight_files(model_dir: str):
    """(kind, files) of the weights, preferring safetensors like transformers does."""
    for index, kind in ((SAFETENSORS_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        path = os.path.join(model_dir, index)
        if os.path.isfile(path):
            with open(path) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            absent = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
            if absent:
                raise ConversionError(f"{path} names shard files that are missing: {absent[:4]}")
            return kind, [os.path.join(model_dir, f) for f in files]
    for single, kind in ((SAFETENSORS_FILE, "safetensors"), (BIN_FILE, "bin")):
        path = os.path.join(model_dir, single)
        if os.path.isfile(path):
            return kind, [path]
    raise ConversionError(f"{model_dir} holds no weights ({SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {BIN_FILE} or "
                          f"{BIN_INDEX})")


class WeightReader:
    """Lazy access to the tensors of a Hugging Face directory: shapes first (to fail early), data on demand."""

    def __init__(self, model_dir: str):
        self.kind, self.files = _weight_files(model_dir)
        self._location: Dict[str, str] = {}
        self._bins: Dict[str, Dict[str, torch.Tensor]] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.dtypes: Dict[str, Optional[torch.dtype]] = {}
        for path in self.files:
            if self.kind == "safetensors":
                from safetensors import safe_open

                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        piece = f.get_slice(name)
                        self._add(name, path, tuple(piece.get_shape()), SAFETENSORS_NAMES.get(piece.get_dtype()))
            else:
                # mmap: shapes without reading the data.
                tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                self._bins[path] = tensors
                for name, tensor in tensors.items():
                    self._add(name, path, tuple(tensor.shape), tensor.dtype)

    def _add(self, name: str, path: str, shape: Tuple[int, ...], dtype: Optional[torch.dtype]) -> None:
        if name.endswith(IGNORED_SUFFIXES):
            return
        self._location[name] = path
        self.shapes[name] = shape
        self.dtypes[name] = dtype

    def dtype(self) -> torch.dtype:
        """The dtype of the weights (the embedding's; conversion keeps it)."""
        name = "model.embed_tokens.weight" if "model.embed_tokens.weight" in self.dtypes else next(iter(self.dtypes))
        dtype = self.dtypes[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{name} is stored as {dtype}; only float32, bfloat16 and float16 weights convert")
        return dtype

    def get(self, name: str) -> torch.Tensor:
        path = self._location[name]
        if self.kind == "bin":
            return self._bins[path][name]
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)

    def all(self) -> Dict[str, torch.Tensor]:
        return {name: self.get(name) for name in self.shapes}


def open_cola_checkpoint(model_dir: str) -> Tuple[Dict[str, Any], WeightReader, Dict[str, str], str]:
    """config.json, a lazy reader of a CoLA Hugging Face directory (the reference's CoLA or CoLA-M layout, or an
    export), ``{plain reference name: stored name}`` and the layout's name, checked against each other before any
    tensor is read."""
    _require_transformers()
    from cola_megatron.convert.names import model_section_from_hf, plain_reference_names
    from cola_megatron.hf.configuration_cola import ColaConfig
    from cola_megatron.hf.modeling_cola import expected_parameter_shapes

    raw = read_config_json(model_dir, "cola")
    model_section_from_hf(raw)  # field checks with conversion-specific messages
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    try:
        config = ColaConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{model_dir}/config.json is not a valid CoLA config: {e}") from None
    reader = WeightReader(model_dir)
    plain, layout = plain_reference_names(reader.shapes, model_dir)
    check_shapes({plain[k]: shape for k, shape in reader.shapes.items()}, expected_parameter_shapes(config), model_dir)
    return raw, reader, {p: stored for stored, p in plain.items()}, layout


def open_llama_checkpoint(model_dir: str) -> Tuple[Dict[str, Any], WeightReader]:
    """config.json and a lazy reader of a dense LLaMA directory, shapes checked before any tensor is read."""
    from cola_megatron.convert.names import llama_shapes

    raw = read_config_json(model_dir, "llama")
    reader = WeightReader(model_dir)
    check_shapes(reader.shapes, llama_shapes(raw), model_dir)
    return raw, reader


def read_cola_checkpoint(model_dir: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], str]:
    """config.json, every plain reference-named tensor in memory (small models) and the layout's name."""
    raw, reader, stored, layout = open_cola_checkpoint(model_dir)
    return raw, {p: reader.get(name) for p, name in stored.items()}, layout
