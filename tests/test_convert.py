"""cola-convert: torch_dist ↔ Hugging Face, resharding, dense warm starts, and clear errors.

One launched process does every conversion that needs megatron-core (process start-up dominates on a small CPU);
the reshard inside it spawns the four TP2×PP2 ranks. Checks that need no megatron-core run in the test process.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.distributed import run_distributed

SEED = 11
MODEL = dict(arch="cola", hidden_size=64, ffn_hidden_size=96, num_layers=4, num_attention_heads=4, rank=16,
             vocab_size=320, seq_length=32, cola_init_std=0.3)
TOKENS = [[5, 17, 260, 3, 99, 42, 7, 300, 12, 1, 64, 128], [250, 4, 4, 8, 15, 16, 23, 42, 108, 9, 2, 77]]
REFERENCE_SPECIAL_IDS = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": -1}  # the reference's LLaMA-style -1


def cola_m_layout(state, num_layers):
    """Plain reference names → the reference CoLA-M model's names (written out here, independently of names.py)."""
    renamed = {"self_attn.o_proj.cola_a": "self_attn.pre_o_proj.cola_a",
               "self_attn.o_proj.cola_b": "post_attn.post_o_proj.cola_b",
               "mlp.down_proj.cola_a": "self_mlp.pre_down_proj.cola_a"}
    for p in "qkv":
        renamed[f"self_attn.{p}_proj.cola_a"] = f"pre_attn.pre_{p}_proj.cola_a"
        renamed[f"self_attn.{p}_proj.cola_b"] = f"self_attn.post_{p}_proj.cola_b"
    for p in ("gate", "up"):
        renamed[f"mlp.{p}_proj.cola_a"] = f"pre_mlp.pre_{p}_proj.cola_a"
        renamed[f"mlp.{p}_proj.cola_b"] = f"self_mlp.post_{p}_proj.cola_b"
    out = {}
    for name, tensor in state.items():
        if not name.startswith("model.layers."):
            out[name] = tensor
            continue
        layer, rest = name[len("model.layers."):].split(".", 1)
        layer = int(layer)
        if rest == "mlp.down_proj.cola_b":  # stored with the next layer; the last layer's with itself
            out[f"model.layers.{layer + 1}.last_layer_post_mlp.post_down_proj.cola_b" if layer + 1 < num_layers
                else f"model.layers.{layer}.post_mlp.post_down_proj.cola_b"] = tensor
        else:
            out[f"model.layers.{layer}.{renamed.get(rest, rest)}"] = tensor
    assert len(out) == len(state)
    return out


def run_config(only_lr_act: bool, tokenizer=None, **model):
    from cola_megatron.config import config_from_dict

    return config_from_dict({
        "model": dict(MODEL, only_lr_act=only_lr_act, **model),
        "train": dict(precision="fp32", seed=SEED),
        "data": dict(mock=True, tokenizer=tokenizer),
    })


def train_tokenizer(path):
    from cola_megatron.data.tokenizer import train_bpe_tokenizer

    text = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 20
    train_bpe_tokenizer(text, vocab_size=300, min_frequency=1).save(str(path))


def make_dense_llama(path, kv_heads=2):
    """A tiny random dense LLaMA saved as transformers does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return config


# --------------------------------------------------------------------------------------------------------------
# Everything that runs megatron-core, in one launched process


def _initial_state(cfg):
    """The unsplit model a run starts from (initialisation does not depend on the layout)."""
    from cola_megatron.convert import megatron_io
    from cola_megatron.models.init import initialize_parameters

    cfg = megatron_io.unsplit(cfg)
    megatron_io.initialize(cfg)
    (model,) = megatron_io.build_chunks(cfg)
    initialize_parameters([model], cfg.train.seed, cfg.model.init_std)
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _train_two_steps(cfg, save_dir):
    """A real run's checkpoint (model, optimizer, scheduler, RNG, data position) at iteration 2."""
    from cola_megatron.config import config_from_dict
    from cola_megatron.training.run import run

    values = cfg.to_dict()
    values["train"].update(train_iters=2, micro_batch_size=2, global_batch_size=4, eval_iters=0)
    values["optimizer"].update(warmup_iters=1)
    values["checkpoint"].update(save_dir=save_dir, save_interval=2)
    run(config_from_dict(values), log=False)


def _tp1_model(ckpt):
    from cola_megatron.training import checkpoint as ckpt_lib
    from cola_megatron.convert import megatron_io

    ckpt = ckpt_lib.resolve_checkpoint(ckpt)
    cfg = megatron_io.unsplit(ckpt_lib.read_checkpoint_config(ckpt))
    megatron_io.initialize(cfg)
    (model,) = megatron_io.build_chunks(cfg)
    ckpt_lib.load_model_weights(ckpt, [model])
    return model.eval()


def _megatron_logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


def _reference_layouts(model):
    layouts = {}
    for i, layer in enumerate(model.decoder.layers):
        for slot in (layer.self_attention.linear_qkv, layer.mlp.linear_fc1):
            layouts[f"{i}.{type(slot).__name__}"] = [(a.detach().clone(), b.detach().clone())
                                                    for a, b in slot.reference_layout()]
    return layouts


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _plain_tensors(ckpt, prefix):
    from megatron.core import dist_checkpointing

    from cola_megatron.training import checkpoint as ckpt_lib

    tensors = dist_checkpointing.load_plain_tensors(ckpt_lib.resolve_checkpoint(ckpt))
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


def _hf_outputs(export, tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    out = {"module": type(model).__module__}
    with torch.no_grad():
        out["logits"] = model(tokens).logits
        out["generated"] = model.generate(tokens[:1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False).shape
    if os.path.isfile(os.path.join(export, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
        text = "the lazy fox"
        out["tokenizer"] = (isinstance(tokenizer, PreTrainedTokenizerFast),
                            tokenizer.decode(tokenizer(text)["input_ids"]) == text, tokenizer.eos_token)
    return out


def _error_of(fn, *args, **kwargs):
    from cola_megatron.convert import ConversionError

    try:
        fn(*args, **kwargs)
    except ConversionError as e:
        return str(e)
    return None


def _convert_everything(root):
    from megatron.core import dist_checkpointing

    from cola_megatron.training import checkpoint as ckpt_lib
    from cola_megatron.convert import cli, megatron_io, names

    tokens = torch.tensor(TOKENS)
    tokenizer = os.path.join(root, "tokenizer.json")
    train_tokenizer(tokenizer)
    results = {"root": root}
    for only in (False, True):
        tag = f"only_lr_act={only}"
        cfg = run_config(only, tokenizer if not only else None)
        tp1 = os.path.join(root, f"{tag}/tp1")
        if not only:  # a run's checkpoint, resharded with its training state to TP2 x PP2 (the acceptance layout)
            _train_two_steps(cfg, tp1)
            layout = ["--tp", "2", "--pp", "2"]
        else:  # converted weights, resharded weights-only to PP2 with two virtual stages
            megatron_io.write_full_state(_initial_state(cfg), cfg, tp1)
            layout = ["--tp", "1", "--pp", "2", "--vp", "2"]
        source = os.path.join(root, f"{tag}/resharded")
        assert cli.main(["reshard", tp1, source] + layout) == 0
        export = os.path.join(root, f"{tag}/hf")
        argv = ["to-hf", source, export] + (["--max-shard-size", "60KB"] if not only else [])
        assert cli.main(argv) == 0
        back = os.path.join(root, f"{tag}/back")
        assert cli.main(["from-hf", export, back]) == 0

        original = _tp1_model(tp1)
        resharded_ckpt = ckpt_lib.resolve_checkpoint(source)
        results[tag] = {
            "files": sorted(os.listdir(export)),
            "config": json.load(open(os.path.join(export, "config.json"))),
            "source_files": sorted(os.listdir(resharded_ckpt)),
            "source_config": ckpt_lib.read_checkpoint_config(resharded_ckpt).parallel.__dict__,
            "source_common": {k: v for k, v in dist_checkpointing.load_common_state_dict(resharded_ckpt).items()
                              if k in ("train_state", "scheduler", "layout", "contents")},
            "original_common": {k: v for k, v in dist_checkpointing.load_common_state_dict(
                ckpt_lib.resolve_checkpoint(tp1)).items() if k in ("train_state", "scheduler")},
            "optimizer": (_plain_tensors(tp1, "optimizer."), _plain_tensors(source, "optimizer.")),
            "initial": _state(original),
            "reference_layout": _reference_layouts(original),
            "roundtrip": _state(_tp1_model(back)),
            "megatron_logits": _megatron_logits(_tp1_model(source), tokens),
            "hf": _hf_outputs(export, tokens),
            "export_state": _read_export(export),
        }

    # Grouped-query attention (4 heads, 2 k/v groups): initial weights resharded to TP2 (one group per rank),
    # exported, read back and exported again.
    gqa_cfg = run_config(False, num_query_groups=2)
    tp1, source = os.path.join(root, "gqa/tp1"), os.path.join(root, "gqa/tp2")
    megatron_io.write_full_state(_initial_state(gqa_cfg), gqa_cfg, tp1)
    assert cli.main(["reshard", tp1, source, "--tp", "2"]) == 0
    export, back, again = (os.path.join(root, f"gqa/{name}") for name in ("hf", "back", "hf-again"))
    assert cli.main(["to-hf", source, export, "--no-tokenizer"]) == 0
    assert cli.main(["from-hf", export, back]) == 0
    assert cli.main(["to-hf", back, again, "--no-tokenizer"]) == 0
    results["gqa"] = {
        "config": json.load(open(os.path.join(export, "config.json"))),
        "initial": _state(_tp1_model(tp1)),
        "roundtrip": _state(_tp1_model(back)),
        "roundtrip_config": ckpt_lib.read_checkpoint_config(ckpt_lib.resolve_checkpoint(back)).model.num_query_groups,
        "megatron_logits": _megatron_logits(_tp1_model(source), tokens),
        "hf": _hf_outputs(export, tokens),
        "export_state": _read_export(export),
        "export_again_state": _read_export(again),
        "files": (sorted(os.listdir(export)), sorted(os.listdir(again))),
        "same_bytes": {name: open(os.path.join(export, name), "rb").read() == open(os.path.join(again, name), "rb").read()
                       for name in ("model.safetensors", "config.json")},
    }

    # A reference-written directory: pytorch_model.bin, the reference's config spellings (no only_lr_act, which the
    # reference defaults to true; the weights are those of the only_lr_act=True run), a rotary buffer, the
    # embedding's padding row at zero, special ids and no tokenizer.
    export = os.path.join(root, "only_lr_act=True/hf")
    reference_dir = os.path.join(root, "reference")
    os.makedirs(reference_dir)
    state = _read_export(export)
    state["model.embed_tokens.weight"][0] = 0.0
    results["reference_state"] = {k: v.clone() for k, v in state.items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, os.path.join(reference_dir, "pytorch_model.bin"))
    config = json.load(open(os.path.join(export, "config.json")))
    for key in ("auto_map", "only_lr_act", "lr_act_type", "dtype", "head_dim", "transformers_version",
                "tokenizer_class"):
        config.pop(key, None)
    config["max_sequence_length"] = config.pop("max_position_embeddings")
    config.update(REFERENCE_SPECIAL_IDS)
    json.dump(config, open(os.path.join(reference_dir, "config.json"), "w"))
    assert cli.main(["from-hf", reference_dir, os.path.join(root, "from-reference")]) == 0
    imported = _tp1_model(os.path.join(root, "from-reference"))
    results["from_reference"] = _state(imported)
    results["from_reference_logits"] = _megatron_logits(imported, tokens)
    results["from_reference_only_lr_act"] = ckpt_lib.read_checkpoint_config(
        ckpt_lib.resolve_checkpoint(os.path.join(root, "from-reference"))).model.only_lr_act

    # The same weights in the reference's CoLA-M layout, imported, then exported again without a tokenizer.
    from safetensors.torch import save_file

    cola_m_dir = os.path.join(root, "cola-m")
    os.makedirs(cola_m_dir)
    save_file({k: v.contiguous() for k, v in cola_m_layout(results["reference_state"], MODEL["num_layers"]).items()},
              os.path.join(cola_m_dir, "model.safetensors"), metadata={"format": "pt"})
    json.dump(dict(config, architectures=["ColaMForCausalLM"]), open(os.path.join(cola_m_dir, "config.json"), "w"))
    assert cli.main(["from-hf", cola_m_dir, os.path.join(root, "from-cola-m")]) == 0
    results["from_cola_m"] = _state(_tp1_model(os.path.join(root, "from-cola-m")))
    assert cli.main(["to-hf", os.path.join(root, "from-cola-m"), os.path.join(root, "cola-m-export")]) == 0
    results["cola_m_export"] = _read_export(os.path.join(root, "cola-m-export"))
    results["cola_m_export_config"] = json.load(open(os.path.join(root, "cola-m-export", "config.json")))

    # from-dense through the command line into a torch_dist checkpoint, then a run warm-starts from it.
    dense_dir = os.path.join(root, "dense")
    make_dense_llama(dense_dir)
    warm = os.path.join(root, "warm")
    assert cli.main(["from-dense", dense_dir, warm, "--rank", "8"]) == 0
    warm_cfg = ckpt_lib.read_checkpoint_config(ckpt_lib.resolve_checkpoint(warm))
    results["warm"] = (warm_cfg.model.rank, names.megatron_to_reference(_state(_tp1_model(warm)),
                                                                        warm_cfg.model))
    results["warm_start_losses"] = _warm_start(warm_cfg, warm)

    # A checkpoint whose config does not describe its weights.
    broken = os.path.join(root, "broken", "iter_0000000")
    shutil.copytree(ckpt_lib.resolve_checkpoint(os.path.join(root, "only_lr_act=True/tp1")), broken)
    with open(os.path.join(broken, ckpt_lib.CONFIG_FILE)) as f:
        values = yaml.safe_load(f)
    values["model"]["rank"] = 8
    with open(os.path.join(broken, ckpt_lib.CONFIG_FILE), "w") as f:
        yaml.safe_dump(values, f)
    results["mismatch"] = _error_of(cli.to_hf, cli.build_parser().parse_args(["to-hf", broken, root + "/x"]))
    # Through a file: tensors passed through the result queue live in shared memory that dies with this process.
    path = os.path.join(root, "results.pt")
    torch.save(results, path)
    return path


def _warm_start(cfg, load_dir):
    """cola-train continues from converted weights: fresh optimizer, schedule from the start."""
    from cola_megatron.config import config_from_dict
    from cola_megatron.training.run import run

    values = cfg.to_dict()
    values["train"].update(train_iters=2, micro_batch_size=2, global_batch_size=2, eval_iters=0, precision="fp32")
    values["optimizer"].update(warmup_iters=0)
    values["checkpoint"].update(load_dir=load_dir, load_optimizer=False, save_dir=None)
    return run(config_from_dict(values), log=False).history


def _continue_at_tp2_pp2(root):
    """Three more steps at TP2 x PP2 from the resharded run's checkpoint, and from the TP1 checkpoint it was made of
    (any torch_dist checkpoint loads at any layout)."""
    import torch.distributed as dist

    from cola_megatron.config import config_from_dict
    from cola_megatron.training import checkpoint as ckpt_lib
    from cola_megatron.training.run import run

    run_dir = os.path.join(root, "only_lr_act=False")
    resharded = ckpt_lib.resolve_checkpoint(os.path.join(run_dir, "resharded"))
    histories = {}
    for name in ("resharded", "tp1"):
        values = ckpt_lib.read_checkpoint_config(resharded).to_dict()
        values["train"].update(train_iters=5, micro_batch_size=2, global_batch_size=4, eval_iters=0)
        values["checkpoint"].update(load_dir=os.path.join(run_dir, name), save_dir=None, save_interval=0,
                                    scheduler_from="checkpoint")
        histories[name] = run(config_from_dict(values), log=False).history
        dist.barrier()
    return histories


@pytest.fixture(scope="module")
def continued(converted):
    return run_distributed(_continue_at_tp2_pp2, 4, converted["root"], timeout=600)


def test_a_resharded_run_continues_as_its_source_does_at_that_layout(continued):
    """The resharded checkpoint's optimizer state, schedule and data position are the source's: three more steps
    from it give the losses the TP1 checkpoint gives when resumed at TP2 x PP2 directly (the same kernels at the
    same layout, so bit-identical). From the second step on, the losses depend on the optimizer state.."""
    for histories in continued:
        assert len(histories["resharded"]) == 3 and histories["resharded"] == histories["tp1"], histories
    assert continued[0]["resharded"][0] != continued[0]["resharded"][1]


def _read_export(export):
    from cola_megatron.convert.hf_io import WeightReader

    return WeightReader(export).all()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(root / "hf_home")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the spawned process
    try:
        (path,) = run_distributed(_convert_everything, 1, str(root), timeout=900)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return torch.load(path)


# --------------------------------------------------------------------------------------------------------------
# Acceptance


@pytest.mark.parametrize("tag,layout,writers", [("only_lr_act=False", (2, 2, None), 4),
                                                 ("only_lr_act=True", (1, 2, 2), 2)])
def test_resharded_to_hf_to_tp1_is_bit_identical(converted, tag, layout, writers):
    """TP2 x PP2 (and PP2 x VP2) → Hugging Face → TP1: every tensor is the one the TP1 checkpoint holds."""
    result = converted[tag]
    parallel = result["source_config"]
    assert (parallel["tensor_parallel"], parallel["pipeline_parallel"], parallel["virtual_pipeline"]) == layout
    ranks = {f.split("_")[2] for f in result["source_files"] if f.endswith(".distcp")}
    assert len(ranks) == writers, f"not written by the {writers} ranks of the layout: {result['source_files']}"
    initial, roundtrip = result["initial"], result["roundtrip"]
    assert set(roundtrip) == set(initial)
    for name, tensor in initial.items():
        assert roundtrip[name].dtype == tensor.dtype and torch.equal(roundtrip[name], tensor), name


def test_reshard_keeps_a_runs_training_state(converted):
    result = converted["only_lr_act=False"]
    common, original = result["source_common"], result["original_common"]
    assert common["train_state"] == original["train_state"] and common["train_state"]["iteration"] == 2
    assert common["scheduler"]["num_steps"] == original["scheduler"]["num_steps"] > 0
    assert common["layout"] == {"tp": 2, "pp": 2, "dp": 1, "vp": 1}
    before, after = result["optimizer"]
    assert before and set(after) == set(before)
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key


def test_reshard_keeps_converted_weights_weights_only(converted):
    result = converted["only_lr_act=True"]
    assert result["source_common"]["contents"] == "weights" and result["source_common"]["train_state"]["iteration"] == 0
    assert result["optimizer"] == ({}, {})


def test_a_run_warm_starts_from_converted_weights(converted):
    losses = converted["warm_start_losses"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_export_has_reference_names_shapes_and_files(converted):
    from cola_megatron.hf.configuration_cola import ColaConfig
    from cola_megatron.hf.modeling_cola import expected_parameter_shapes

    for tag, only in (("only_lr_act=False", False), ("only_lr_act=True", True)):
        result = converted[tag]
        config = result["config"]
        assert config["model_type"] == "cola" and config["rank"] == 16 and config["only_lr_act"] is only
        assert config["lr_act_type"] == "silu" and config["intermediate_size"] == 96
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cola.ColaForCausalLM"
        assert {"config.json", "configuration_cola.py", "modeling_cola.py"} <= set(result["files"])
        shapes = {k: tuple(v.shape) for k, v in result["export_state"].items()}
        assert shapes == expected_parameter_shapes(ColaConfig(**{k: config[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rank")}))
        # The exported A/B are exactly what the megatron slots call their reference layout.
        for key, branches in result["reference_layout"].items():
            layer, slot = key.split(".")
            projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") if slot == "CoLAQKV" \
                else ("mlp.gate_proj", "mlp.up_proj")
            for (a, b), proj in zip(branches, projections):
                assert torch.equal(result["export_state"][f"model.layers.{layer}.{proj}.cola_a"], a)
                assert torch.equal(result["export_state"][f"model.layers.{layer}.{proj}.cola_b"], b)
    sharded = converted["only_lr_act=False"]["files"]
    assert "model.safetensors.index.json" in sharded and sum(f.startswith("model-0") for f in sharded) > 1
    single = converted["only_lr_act=True"]["files"]
    assert "model.safetensors" in single and "tokenizer.json" not in single


@pytest.mark.parametrize("tag", ["only_lr_act=False", "only_lr_act=True"])
def test_hf_logits_equal_megatron_logits(converted, tag):
    result = converted[tag]
    hf = result["hf"]
    assert not hf["module"].startswith("cola_megatron"), "the export must load its own shipped code"
    assert hf["logits"].dtype == torch.float32
    torch.testing.assert_close(hf["logits"], result["megatron_logits"], atol=1e-4, rtol=0)
    assert hf["generated"] == (1, 8)


def test_grouped_query_attention_exports_and_reads_back_exactly(converted):
    """A GQA model resharded to TP2 (a k/v group per rank): the export carries num_key_value_heads and narrow k/v,
    its logits are megatron's, and export → from-hf → export is bit-identical, as is the checkpoint read back."""
    result = converted["gqa"]
    config = result["config"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    export = result["export_state"]
    assert export["model.layers.0.self_attn.k_proj.cola_b"].shape == (16, 32)
    assert export["model.layers.0.self_attn.q_proj.cola_b"].shape == (16, 64)
    hf = result["hf"]
    assert not hf["module"].startswith("cola_megatron")
    torch.testing.assert_close(hf["logits"], result["megatron_logits"], atol=1e-4, rtol=0)
    assert hf["generated"] == (1, 8)
    assert result["roundtrip_config"] == 2
    assert set(result["roundtrip"]) == set(result["initial"])
    assert any(name.endswith("linear_qkv.b_kv_weight") for name in result["initial"])
    for name, tensor in result["initial"].items():
        assert torch.equal(result["roundtrip"][name], tensor), name
    again = result["export_again_state"]
    assert set(again) == set(export) and all(torch.equal(again[k], v) for k, v in export.items())
    assert result["files"][0] == result["files"][1]
    assert result["same_bytes"] == {"model.safetensors": True, "config.json": True}


def test_only_lr_act_changes_the_model(converted):
    """Guards the logits comparison against both settings silently building the same MLP."""
    a, b = (converted[t]["megatron_logits"] for t in ("only_lr_act=False", "only_lr_act=True"))
    assert not torch.allclose(a, b, atol=1e-3)


def test_tokenizer_is_shipped_and_loads(converted):
    result = converted["only_lr_act=False"]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(result["files"])
    fast, roundtrips, eos = result["hf"]["tokenizer"]
    assert fast and roundtrips and eos == "<|endoftext|>"
    assert result["config"]["eos_token_id"] == 0 and result["config"]["pad_token_id"] == 1


def test_from_hf_accepts_reference_checkpoints(converted):
    """pytorch_model.bin, max_sequence_length, no only_lr_act/lr_act_type, a rotary buffer: the same tensors, the
    padding row included, and only_lr_act true as in the reference."""
    from cola_megatron.convert import names

    reference = converted["reference_state"]
    assert torch.equal(reference["model.embed_tokens.weight"][0], torch.zeros(MODEL["hidden_size"]))
    want = names.reference_to_megatron(reference, run_config(True).model)
    loaded = converted["from_reference"]
    assert set(loaded) == set(want) and all(torch.equal(loaded[k], want[k]) for k in want)
    assert converted["from_reference_only_lr_act"] is True


def test_reference_config_without_only_lr_act_gives_the_reference_logits(converted):
    from cola_megatron.hf.configuration_cola import ColaConfig
    from tests.test_hf_modeling import reference_logits

    state = converted["reference_state"]
    shape = dict(vocab_size=MODEL["vocab_size"], hidden_size=MODEL["hidden_size"],
                 intermediate_size=MODEL["ffn_hidden_size"], num_hidden_layers=MODEL["num_layers"],
                 num_attention_heads=MODEL["num_attention_heads"], rank=MODEL["rank"])
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        want = reference_logits(state, ColaConfig(**shape, only_lr_act=True), tokens)
        other = reference_logits(state, ColaConfig(**shape, only_lr_act=False), tokens)
    assert not torch.allclose(want, other, atol=1e-2), "the test must tell the two MLPs apart"
    torch.testing.assert_close(converted["from_reference_logits"], want, atol=1e-4, rtol=0)


def test_cola_m_layout_imports_to_the_same_weights_and_exports_bit_identically(converted):
    plain, cola_m = converted["from_reference"], converted["from_cola_m"]
    assert set(cola_m) == set(plain)
    for name, tensor in plain.items():
        assert cola_m[name].dtype == tensor.dtype and torch.equal(cola_m[name], tensor), name
    reference, exported = converted["reference_state"], converted["cola_m_export"]
    assert set(exported) == set(reference)
    for name, tensor in reference.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    # No tokenizer anywhere: the ids come through from the reference config (-1 names no token and is dropped).
    config = converted["cola_m_export_config"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, None)
    assert config["only_lr_act"] is True


def test_from_dense_cli_writes_the_svd_factors(converted, tmp_path):
    from cola_megatron.convert import dense, hf_io

    rank, warm = converted["warm"]
    assert rank == 8
    # The same factors as computing them here: the command wrote and re-read them.
    make_dense_llama(tmp_path)
    raw = hf_io.read_config_json(str(tmp_path), "llama")
    expected, _ = dense.cola_from_dense(raw, hf_io.WeightReader(str(tmp_path)), 8)
    assert set(warm) == set(expected)
    for name, tensor in expected.items():
        # (LAPACK's results depend on the thread count, which differs between the two processes.)
        torch.testing.assert_close(warm[name], tensor.float(), atol=1e-6, rtol=0)


def test_config_that_does_not_describe_the_checkpoint_is_refused(converted):
    message = converted["mismatch"]
    assert message and "does not hold the model its cola_config.yaml describes" in message
    assert "linear_fc2.b_weight: checkpoint (4, 1, 64, 16), config (4, 1, 64, 8)" in message


# --------------------------------------------------------------------------------------------------------------
# from-dense maths (no megatron-core needed)


def test_from_dense_factors_are_the_truncated_svd(tmp_path, capsys):
    from cola_megatron.convert import cli, dense, hf_io
    from cola_megatron.hf.modeling_cola import ColaForCausalLM, load_cola_state_dict

    make_dense_llama(tmp_path / "dense", kv_heads=2)
    weights = hf_io.WeightReader(str(tmp_path / "dense"))
    rank = 8
    assert cli.main(["from-dense", str(tmp_path / "dense"), str(tmp_path / "cola"), "--rank", "8", "--format", "hf"]) == 0
    printed = capsys.readouterr().out.splitlines()
    table = printed[printed.index(next(l for l in printed if l.startswith("layer"))):][:3]
    assert table[0].split() == ["layer", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    errors = [dict(zip(table[0].split()[1:], map(float, row.split()[1:]))) for row in table[1:]]

    state = hf_io.WeightReader(str(tmp_path / "cola")).all()
    for i in range(2):
        for proj in dense.PROJECTIONS:
            w = weights.get(f"model.layers.{i}.{proj}.weight").double()
            if proj in ("self_attn.k_proj", "self_attn.v_proj"):  # one kv head per two query heads
                w = w.reshape(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            truncated = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
            a = state[f"model.layers.{i}.{proj}.cola_a"].double().T  # (r, d_in)
            b = state[f"model.layers.{i}.{proj}.cola_b"].double().T  # (d_out, r)
            torch.testing.assert_close(b @ a, truncated, atol=1e-5, rtol=0)
            # singular values split symmetrically: A·Aᵀ = Bᵀ·B = S_r
            torch.testing.assert_close(a @ a.T, torch.diag(s[:rank]), atol=1e-5, rtol=0)
            torch.testing.assert_close(b.T @ b, torch.diag(s[:rank]), atol=1e-5, rtol=0)
            error = ((w - b @ a).norm() / w.norm()).item()
            assert errors[i][proj.split(".")[1]] == pytest.approx(error, abs=1e-4)
    assert torch.equal(state["lm_head.weight"], weights.get("lm_head.weight"))
    # The warm-start export is a loadable CoLA model.
    config = json.loads((tmp_path / "cola" / "config.json").read_text())
    assert config["model_type"] == "cola" and config["rank"] == 8 and config["num_key_value_heads"] == 4
    model = ColaForCausalLM.from_pretrained(tmp_path / "cola").eval()
    load_cola_state_dict(model, state)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_gqa_expansion_is_what_llama_attention_does():
    from cola_megatron.convert.dense import expand_kv_heads

    w = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2 * 3, 5)  # 2 kv heads of head_dim 3
    expanded = expand_kv_heads(w, heads=4, kv_heads=2).reshape(4, 3, 5)
    for h in range(4):
        assert torch.equal(expanded[h], w.reshape(2, 3, 5)[h // 2])


# --------------------------------------------------------------------------------------------------------------
# Clear errors before any heavy work (these never import megatron-core)


def _cli(capsys, *argv):
    from cola_megatron.convert.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_not_a_checkpoint(tmp_path, capsys):
    code, err = _cli(capsys, "to-hf", str(tmp_path), str(tmp_path / "out"))
    assert code == 2 and "holds no checkpoint" in err and "save_dir" in err
    (tmp_path / "latest").write_text("iter_0000009\n")
    code, err = _cli(capsys, "reshard", str(tmp_path), str(tmp_path / "out"), "--tp", "2", "--pp", "1")
    assert code == 2 and "not a complete checkpoint" in err
    code, err = _cli(capsys, "from-hf", str(tmp_path), str(tmp_path / "out"))
    assert code == 2 and "not a Hugging Face model directory" in err


def test_unknown_model_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = _cli(capsys, "from-hf", str(tmp_path), str(tmp_path / "out"))
    assert code == 2 and "unknown model_type 'gpt2'" in err
    assert "from-dense" not in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # from-hf reads LLaMA into dense runs
    for argv in (["from-hf"], ["from-dense", "--rank", "8"]):
        code, err = _cli(capsys, argv[0], str(tmp_path), str(tmp_path / "out"), *argv[1:])
        assert code == 2 and "lacks" in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "cola"}))
    code, err = _cli(capsys, "from-dense", str(tmp_path), str(tmp_path / "out"), "--rank", "8")
    assert code == 2 and "from-hf" in err


def _small_hf_dir(path, drop=(), **overrides):
    """A tiny CoLA directory as save_pretrained writes it, its config without the keys in ``drop``."""
    from cola_megatron.hf.configuration_cola import ColaConfig
    from cola_megatron.hf.modeling_cola import ColaForCausalLM

    config = ColaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=2, rank=8)
    ColaForCausalLM(config).save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    raw = {k: v for k, v in dict(raw, **overrides).items() if k not in drop}
    (path / "config.json").write_text(json.dumps(raw))


def test_from_hf_names_tensors_of_no_known_layout(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _small_hf_dir(tmp_path, drop=("only_lr_act", "rms_norm_eps"))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.gate_proj.lora_A.weight"] = torch.zeros(4, 32)
    tensors["model.layers.0.self_attn.pre_q_proj.cola_a"] = tensors.pop("model.layers.0.self_attn.q_proj.cola_a")
    save_file(tensors, tmp_path / "model.safetensors")
    code, err = _cli(capsys, "from-hf", str(tmp_path), str(tmp_path / "out"))
    assert code == 2 and "neither the reference CoLA nor the CoLA-M layout" in err
    assert "model.layers.0.self_attn.pre_q_proj.cola_a" in err and "model.layers.1.mlp.gate_proj.lora_A.weight" in err
    assert "hidden_size" not in err and not (tmp_path / "out").exists()


def test_from_hf_says_which_reference_defaults_it_used(tmp_path, capsys):
    from cola_megatron.convert import names
    from cola_megatron.convert.cli import main

    _small_hf_dir(tmp_path, drop=("only_lr_act", "rms_norm_eps"))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert names.model_section_from_hf(raw)["only_lr_act"] is True
    assert names.reference_defaults_used(raw) == {"only_lr_act": True, "rms_norm_eps": 1e-6}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")  # stops the command after the config is read
    assert main(["from-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["config.json omits fields; used the reference defaults: only_lr_act=true, rms_norm_eps=1e-06"]


def test_hf_config_and_weights_shape_mismatch(tmp_path, capsys):
    from cola_megatron.hf.configuration_cola import ColaConfig
    from cola_megatron.hf.modeling_cola import ColaForCausalLM

    config = ColaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=2, rank=8)
    ColaForCausalLM(config).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, rank=4)))
    code, err = _cli(capsys, "from-hf", str(tmp_path), str(tmp_path / "out"))
    assert code == 2 and "wrong shape" in err and "cola_a: (32, 8) instead of (32, 4)" in err
    assert not (tmp_path / "out").exists(), "nothing may be written for bad input"


def test_dense_rank_too_large_and_existing_output(tmp_path, capsys):
    make_dense_llama(tmp_path / "dense")
    code, err = _cli(capsys, "from-dense", str(tmp_path / "dense"), str(tmp_path / "out"), "--rank", "80")
    assert code == 2 and "model.rank" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    code, err = _cli(capsys, "from-dense", str(tmp_path / "dense"), str(tmp_path / "out"), "--rank", "8")
    assert code == 2 and "already exists" in err and (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_tool_script_reports_errors(tmp_path):
    out = subprocess.run([sys.executable, "tools/convert.py", "to-hf", str(tmp_path / "missing"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_reference_layout_export_ships_no_code_and_refuses_gqa(tmp_path):
    """``to-hf --reference-layout``: the same tensors and config for the reference's own code, without auto_map or
    shipped modeling files; read back as a reference directory. A GQA model is refused by what the reference
    cannot represent, and so is a reference-layout directory claiming GQA, while an export claiming it is read."""
    from cola_megatron.config import ModelConfig
    from cola_megatron.convert import ConversionError, hf_io, names
    from cola_megatron.hf.configuration_cola import ColaConfig
    from cola_megatron.hf.modeling_cola import ColaForCausalLM

    mha = ModelConfig(hidden_size=32, ffn_hidden_size=48, num_layers=1, num_attention_heads=2, rank=8, vocab_size=64)
    fields = names.hf_config_fields(mha, reference_layout=True)
    hf_io.write_export(str(tmp_path / "ref"), ColaForCausalLM(ColaConfig(**fields)).state_dict(), fields,
                       ship_code=False)
    raw = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert "auto_map" not in raw and not names.is_export(raw)
    assert not {"configuration_cola.py", "modeling_cola.py"} & set(os.listdir(tmp_path / "ref"))
    _, state, layout = hf_io.read_cola_checkpoint(str(tmp_path / "ref"))
    assert layout == "CoLA" and state["model.layers.0.self_attn.k_proj.cola_b"].shape == (8, 32)

    gqa = ModelConfig(hidden_size=32, ffn_hidden_size=48, num_layers=1, num_attention_heads=2, num_query_groups=1,
                      rank=8, vocab_size=64)
    with pytest.raises(ConversionError, match="reference implementation cannot represent grouped-query attention"):
        names.hf_config_fields(gqa, reference_layout=True)
    exported = names.hf_config_fields(gqa)
    assert exported["num_key_value_heads"] == 1
    claimed = dict(raw, num_key_value_heads=1)
    with pytest.raises(ConversionError, match="reference implementation's layout but claims grouped-query"):
        names.model_section_from_hf(claimed)
    claimed["auto_map"] = ColaConfig(**exported).auto_map
    assert names.model_section_from_hf(claimed)["num_query_groups"] == 1


def test_progress_bar_shows_bytes_tensors_rate_only_on_a_terminal(monkeypatch):
    import io

    from cola_megatron.convert.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, enabled, shown in ((Terminal(), True, True), (Terminal(), False, False), (io.StringIO(), True, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        bar = Progress(3 << 20, 2, "to-hf", enabled)
        bar(1 << 20)
        bar(2 << 20)
        bar.close()
        text = stream.getvalue()
        assert ("2/2 tensors" in text and "3.15M/3.15M" in text and "B/s" in text and "<00:00" in text) == shown, text
