"""``cola-convert``: checkpoint conversion on CPU.

    cola-convert to-hf      CKPT OUT       megatron torch_dist (any TP/PP) → Hugging Face directory
    cola-convert from-hf    HF_DIR OUT     Hugging Face CoLA (ours, the reference's CoLA or CoLA-M) → torch_dist
    cola-convert reshard    CKPT OUT --tp N --pp M [--vp V]          the same checkpoint at another layout
    cola-convert from-dense LLAMA_DIR OUT --rank R    dense LLaMA → CoLA by truncated SVD (warm start)

CKPT is a run's ``checkpoint.save_dir`` (its ``latest`` is followed) or one ``iter_NNNNNNN`` directory. torch_dist
outputs are ``OUT/iter_NNNNNNN`` plus ``OUT/latest`` and load at any layout. ``reshard`` keeps a run's whole training
state; ``from-hf`` and ``from-dense`` write weights only, which a run continues from with
``checkpoint.load_dir=OUT checkpoint.load_optimizer=false``. Exports load with
``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` (and ``AutoTokenizer`` likewise);
``to-hf --reference-layout`` writes for the reference implementation's own code instead (multi-head models only).
Bad input fails before heavy work with exit code 2 and one message naming the fix.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional, Sequence

from cola_megatron.cli import ArgumentParser, run_command
from cola_megatron.errors import ConversionError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="cola-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("to-hf", help="torch_dist checkpoint → Hugging Face directory")
    p.add_argument("checkpoint", help="run save_dir or iter_NNNNNNN directory")
    p.add_argument("output", help="new Hugging Face directory")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="tokenizer.json to ship (default: the run's data.tokenizer)")
    tok.add_argument("--no-tokenizer", action="store_true", help="export without a tokenizer")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the exported weights (default: the checkpoint's, i.e. the run's parameter dtype)")
    p.add_argument("--reference-layout", action="store_true",
                   help="for the reference implementation's own code: no auto_map, no shipped modeling files "
                        "(multi-head attention only)")

    p = sub.add_parser("from-hf", help="Hugging Face CoLA (or dense LLaMA) directory → torch_dist checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("output", help="new checkpoint save_dir")
    p.add_argument("--config", help="run YAML whose non-model sections to record (model comes from config.json)")

    p = sub.add_parser("reshard", help="torch_dist → torch_dist written by the ranks of another TP/PP layout")
    p.add_argument("checkpoint")
    p.add_argument("output", help="new checkpoint save_dir")
    p.add_argument("--tensor-parallel", "--tp", type=int, default=1)
    p.add_argument("--pipeline-parallel", "--pp", type=int, default=1)
    p.add_argument("--virtual-pipeline", "--vp", type=int)
    p.add_argument("--cola-tp-scheme", choices=["bottleneck", "pair"])

    p = sub.add_parser("from-dense", help="dense LLaMA (Hugging Face) → CoLA by truncated SVD, for warm starts")
    p.add_argument("hf_dir")
    p.add_argument("output")
    p.add_argument("--rank", type=int, required=True, help="bottleneck width r (the paper uses hidden_size / 4)")
    p.add_argument("--only-lr-act", action="store_true", help="MLP down(gate(x) * up(x)) instead of SiLU(gate)")
    p.add_argument("--format", choices=["megatron", "hf"], default="megatron",
                   help="write a torch_dist checkpoint (default) or a Hugging Face CoLA directory")
    p.add_argument("--config", help="run YAML whose non-model sections to record (megatron format)")
    for p in sub.choices.values():
        p.add_argument("--no-progress", action="store_true", help="no progress bar (none is shown off a terminal)")
    return parser


# --------------------------------------------------------------------------------------------------------------
# Commands


def _fresh_output(path: str):
    """A context for writing a new output: removed again if the conversion fails, so nothing half-written is left
    that could pass for a complete checkpoint or export."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        existed = os.path.isdir(path)
        try:
            yield
        except BaseException:
            if existed:
                for entry in os.listdir(path):
                    full = os.path.join(path, entry)
                    shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
            else:
                shutil.rmtree(path, ignore_errors=True)
            raise

    return guard()


def to_hf(args) -> None:
    from cola_megatron.training import checkpoint as ckpt_lib
    from cola_megatron.convert import hf_io, megatron_io, names
    from cola_megatron.convert.progress import Progress

    ckpt = ckpt_lib.resolve_checkpoint(args.checkpoint)
    cfg = ckpt_lib.read_checkpoint_config(ckpt)
    tokenizer = None if args.no_tokenizer else (args.tokenizer or cfg.data.tokenizer)
    if tokenizer and not os.path.isfile(tokenizer):
        raise ConversionError(f"the tokenizer {tokenizer} is not found: pass --tokenizer PATH (the run's "
                              "tokenizer.json) or --no-tokenizer")
    special = hf_io.tokenizer_special_ids(tokenizer, cfg.model.vocab_size) if tokenizer else None
    special = special or megatron_io.read_special_tokens(ckpt)  # converted weights keep their config's ids
    fields = names.hf_config_fields(cfg.model, special, reference_layout=args.reference_layout)
    hf_io.parse_size(args.max_shard_size)
    megatron_io.require_new_output(args.output)
    ckpt_lib.verify_checkpoint(ckpt)  # names a truncated or corrupted file before anything is read
    reader = megatron_io.CheckpointReader(ckpt, cfg)
    dtype = args.dtype or {v: k for k, v in hf_io.DTYPES.items()}[reader.dtype]
    groups = names.unit_groups(cfg.model)
    layout = [(name, tuple(t.shape)) for group in groups for unit in group
              for name, t in names.to_reference(unit, reader.entries[unit.megatron].data).items()]
    itemsize = hf_io.DTYPES[dtype].itemsize
    progress = Progress(sum(itemsize * _numel(shape) for _, shape in layout), len(layout), "to-hf",
                        not args.no_progress)

    def tensors():
        for group in groups:
            got = reader.read([u.megatron for u in group])
            bad = [k for k, v in got.items() if not bool(v.isfinite().all())]
            if bad:
                raise ConversionError(f"{ckpt} holds NaN/inf weights ({', '.join(bad[:3])}"
                                      f"{', ...' if len(bad) > 3 else ''}); refusing to export them. Fix: convert an "
                                      "earlier checkpoint of the run")
            for unit in group:
                yield from names.to_reference(unit, got.pop(unit.megatron)).items()

    with _fresh_output(args.output):
        hf_io.stream_export(args.output, layout, tensors(), fields, tokenizer, args.max_shard_size, dtype,
                            progress=progress, ship_code=not args.reference_layout)
    progress.close()
    print(f"wrote {args.output} from {ckpt} ({dtype})")


def _run_config(model_section: dict, config_path: Optional[str], tokenizer: Optional[str]):
    """A run config recording converted weights: the YAML's sections (or defaults), the given model section."""
    from cola_megatron.config import Config, ConfigError, config_from_dict, load_config

    try:
        values = (load_config(config_path) if config_path else Config()).to_dict()
    except ConfigError as e:
        raise ConversionError(f"--config {config_path}: {e}") from None
    values["model"] = dict(values.get("model") or {}, **model_section)
    data = values.setdefault("data", {})
    if tokenizer:
        data["tokenizer"] = tokenizer
    if not any(data.get(k) for k in ("paths", "train_paths")):
        data["mock"] = True  # no data is attached to converted weights; a run supplies its own
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConversionError(f"the converted model does not form a valid run config: {e}") from None


def _copy_tokenizer(hf_dir: str, output: str) -> Optional[str]:
    source = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(source):
        return None
    os.makedirs(output, exist_ok=True)
    target = os.path.abspath(os.path.join(output, "tokenizer.json"))
    shutil.copyfile(source, target)
    return target


def from_hf(args) -> None:
    from cola_megatron.convert import hf_io, megatron_io, names
    from cola_megatron.convert.progress import Progress

    raw = hf_io.read_config_json(args.hf_dir, ("cola", "llama"))
    source = os.path.join(args.hf_dir, "config.json")
    if raw["model_type"] == "llama":
        section = names.model_section_from_hf(raw, keep_dense=True, source=source)
        _, reader = hf_io.open_llama_checkpoint(args.hf_dir)
        stored, layout = {name: name for name in reader.shapes}, "LLaMA"
    else:
        section = names.model_section_from_hf(raw, source=source)
        defaults = names.reference_defaults_used(raw)
        if defaults:
            print("config.json omits fields; used the reference defaults: "
                  + ", ".join(f"{k}={json.dumps(v)}" for k, v in defaults.items()))
        _, reader, stored, layout = hf_io.open_cola_checkpoint(args.hf_dir)
    cfg = _run_config(section, args.config, None)
    megatron_io.require_new_output(args.output)
    dtype = reader.dtype()
    with _fresh_output(args.output):
        tokenizer = _copy_tokenizer(args.hf_dir, args.output)
        if tokenizer:
            cfg = _run_config(section, args.config, tokenizer)
        groups = names.unit_groups(cfg.model)
        total = sum(dtype.itemsize * _numel(reader.shapes[stored[n]]) for g in groups for u in g for n in u.reference)
        progress = Progress(total, sum(len(g) for g in groups), "from-hf", not args.no_progress)

        def fill(state):
            (entries,) = state.values()
            for group in groups:
                for unit in group:
                    parts = [reader.get(stored[n]) for n in unit.reference]
                    names.to_megatron(unit, parts, out=entries[unit.megatron].data)
                    progress(sum(p.numel() * p.element_size() for p in parts))
            progress.close()

        ckpt = megatron_io.write_weights(megatron_io.unsplit(cfg), args.output, dtype, fill,
                                         special_tokens=names.special_token_ids(raw))
    print(f"wrote {ckpt} from {args.hf_dir} ({layout} layout, {str(dtype).replace('torch.', '')})")


def _numel(shape) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def reshard(args) -> None:
    from cola_megatron.convert.reshard import reshard as run_reshard

    ckpt = run_reshard(args.checkpoint, args.output, args.tensor_parallel, args.pipeline_parallel,
                       args.virtual_pipeline, args.cola_tp_scheme, show_progress=not args.no_progress)
    print(f"wrote {ckpt} at TP={args.tensor_parallel} PP={args.pipeline_parallel}")


def from_dense(args) -> None:
    from cola_megatron.convert import dense, hf_io, megatron_io, names
    from cola_megatron.convert.progress import Progress

    raw = hf_io.read_config_json(args.hf_dir, "llama")
    section = names.model_section_from_hf(raw, rank=args.rank, only_lr_act=args.only_lr_act, dense=True,
                                          source=os.path.join(args.hf_dir, "config.json"))
    cfg = _run_config(section, args.config, None)  # validates the rank against the model's widths
    megatron_io.require_new_output(args.output)
    factors = dense.CoLAFactors(raw, hf_io.WeightReader(args.hf_dir), args.rank)
    groups = names.unit_groups(cfg.model)
    fields = names.hf_config_fields(cfg.model, {k: raw.get(k) for k in names.SPECIAL_TOKEN_FIELDS})
    shapes = hf_io.expected_shapes(hf_io.hf_config(fields, "float32", None))
    layout = [(n, shapes[n]) for g in groups for u in g for n in u.reference]
    progress = Progress(sum(factors.dtype.itemsize * _numel(s) for _, s in layout), len(layout), "from-dense",
                        not args.no_progress)
    with _fresh_output(args.output):
        if args.format == "hf":
            hf_io.stream_export(args.output, layout, ((n, factors.get(n)) for n, _ in layout), fields,
                                dtype={v: k for k, v in hf_io.DTYPES.items()}[factors.dtype], progress=progress)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if os.path.isfile(os.path.join(args.hf_dir, name)):
                    shutil.copyfile(os.path.join(args.hf_dir, name), os.path.join(args.output, name))
            written = args.output
        else:
            tokenizer = _copy_tokenizer(args.hf_dir, args.output)
            if tokenizer:
                cfg = _run_config(section, args.config, tokenizer)

            def fill(state):
                (entries,) = state.values()
                for group in groups:
                    for unit in group:
                        parts = [factors.get(n) for n in unit.reference]
                        names.to_megatron(unit, parts, out=entries[unit.megatron].data)
                        for p in parts:
                            progress(p.numel() * p.element_size())

            written = megatron_io.write_weights(megatron_io.unsplit(cfg), args.output, factors.dtype, fill)
        progress.close()
    print("relative error ‖W − B·A‖_F / ‖W‖_F of the rank-{} truncated SVD per layer (SiLU between A and B makes "
          "the CoLA layer differ further):".format(args.rank))
    for line in dense.format_errors(factors.errors):
        print(line)
    print(f"wrote {written}")


def _release_process_groups() -> None:
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        from cola_megatron.training.distributed import destroy_distributed

        destroy_distributed()


COMMANDS = {"to-hf": to_hf, "from-hf": from_hf, "reshard": reshard, "from-dense": from_dense}


def _main(argv: Optional[Sequence[str]]) -> int:
    from cola_megatron.convert.memory import return_freed_buffers

    args = build_parser().parse_args(argv)
    return_freed_buffers()
    try:
        COMMANDS[args.command](args)
    finally:
        _release_process_groups()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command("cola-convert", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
