"""Config tree: loading, precedence, the paper's sizes, and one clear error per bad configuration."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cola_megatron.config import ConfigError, config_from_dict, load_config, parse_overrides
from cola_megatron.models.accounting import count_parameters

REPO = Path(__file__).resolve().parents[1]

# docs/design.md §2: parameter counts with an untied head, V = 32000 (millions).
PAPER_COUNTS = {
    "60m": (42.8, 58.1),
    "130m": (94.0, 134.1),
    "350m": (185.2, 368.0),
    "1b": (609.3, 1339.1),
    "7b": (2820.0, 6738.0),
}


@pytest.mark.parametrize("size", PAPER_COUNTS)
def test_paper_parameter_counts(size):
    cola_m, dense_m = PAPER_COUNTS[size]
    cola = count_parameters(load_config(f"configs/cola/llama_{size}.yaml").model).total / 1e6
    dense = count_parameters(load_config(f"configs/dense/llama_{size}.yaml").model).total / 1e6
    # The table rounds 2.82B and 6738M; the others to 0.1M.
    tol = 1.0 if size == "7b" else 0.05
    assert cola == pytest.approx(cola_m, abs=tol)
    assert dense == pytest.approx(dense_m, abs=tol)


def llama3_8b_counts(d=4096, f=14336, layers=32, heads=32, groups=8, vocab=128256, r=1024):
    """Parameter counts of the Llama-3-8B shape written out: (CoLA, dense)."""
    kv = d // heads * groups
    widths = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # q k v o gate up down: (d_in, d_out)
    norms = 2 * d
    cola_layer = sum(r * (d_in + d_out) for d_in, d_out in widths) + norms
    dense_layer = sum(d_in * d_out for d_in, d_out in widths) + norms
    outside = 2 * vocab * d + d  # untied embedding and output layer, final norm
    return outside + layers * cola_layer, outside + layers * dense_layer


def test_llama3_8b_parameter_counts():
    cola_count, dense_count = llama3_8b_counts()
    cola = load_config("configs/cola/llama3_8b.yaml").model
    dense = load_config("configs/dense/llama3_8b.yaml").model
    assert (cola.num_query_groups, cola.vocab_size, cola.seq_length, cola.rope_theta, cola.rank) == (
        8, 128256, 8192, 500000.0, 1024)
    assert count_parameters(cola).total == cola_count == 3_735_293_952
    assert count_parameters(dense).total == dense_count == 8_030_261_248  # Llama-3-8B's 8.03B


@pytest.mark.parametrize("name", [f"llama_{size}" for size in PAPER_COUNTS] + ["llama3_8b"])
def test_cola_m_configs_are_cola_plus_recompute(name):
    cola = load_config(f"configs/cola/{name}.yaml")
    cola_m = load_config(f"configs/cola_m/{name}.yaml")
    assert cola_m.model.recompute == "cola_m"
    cola_m.model.recompute = "none"
    assert cola_m.model == cola.model


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model: {hidden_size: 128, num_attention_heads: 4, rank: 32}\ntrain: {train_iters: 7}\n")
    child = tmp_path / "child.yaml"
    child.write_text("include: base.yaml\ntrain: {train_iters: 9, seed: 3}\n")
    cfg = load_config(str(child), ["train.seed=11", "optimizer.lr=1e-3", "data.mock=true"])
    assert cfg.model.hidden_size == 128  # from the included file
    assert cfg.train.train_iters == 9  # YAML over include
    assert cfg.train.seed == 11  # CLI over YAML
    assert cfg.optimizer.lr == pytest.approx(1e-3)  # '1e-3' parsed as a number
    assert cfg.model.ffn_hidden_size == 1376  # default


def test_overrides_parse_types():
    assert parse_overrides(["a.b=3", "a.c=true", "d.e=[x, y]", "d.f=null"]) == {
        "a": {"b": 3, "c": True}, "d": {"e": ["x", "y"], "f": None}}


def test_blend_weights_may_be_numbers():
    cfg = config_from_dict({"data": {"paths": [0.3, "a", 0.7, "b"]}})
    assert cfg.data.paths == ["0.3", "a", "0.7", "b"]


BASE = {"data": {"mock": True}}

# (overrides, world_size, substring the error must contain)
BAD = [
    ({"model": {"hidden_sizee": 64}}, None, "model.hidden_sizee: unknown key. Fix: did you mean 'model.hidden_size'?"),
    ({"modle": {}}, None, "modle: unknown key"),
    ({"model": {"hidden_size": "big"}}, None, "model.hidden_size: expected an integer"),
    ({"model": {"only_lr_act": "yes"}}, None, "model.only_lr_act: expected true/false"),
    ({"optimizer": {"lr": "fast"}}, None, "optimizer.lr: expected a number"),
    ({"model": {"arch": "moe"}}, None, "model.arch: 'moe' is not one of"),
    ({"model": {"hidden_size": 100, "num_attention_heads": 8}}, None, "model.hidden_size: 100 is not divisible by model.num_attention_heads=8"),
    ({"model": {"rank": 0}}, None, "model.rank: must be > 0"),
    ({"model": {"rank": 4096}}, None, "model.rank: 4096 exceeds"),
    ({"model": {"num_query_groups": 3}}, None, "model.num_attention_heads: 8 is not divisible by model.num_query_groups=3"),
    ({"model": {"num_query_groups": 2}, "parallel": {"tensor_parallel": 4}}, None, "model.num_query_groups: 2 is not divisible by parallel.tensor_parallel=4"),
    ({"model": {"recompute": "some"}}, None, "model.recompute: 'some' is not one of"),
    ({"model": {"recompute": "cola_m", "hidden_dropout": 0.1}}, None, "model.recompute: cola_m recomputes without replaying dropout masks"),
    ({"model": {"arch": "dense", "recompute": "cola_m"}}, None, "model.recompute: cola_m needs CoLA projections"),
    ({"model": {"num_attention_heads": 8}, "parallel": {"tensor_parallel": 3}}, None, "model.num_attention_heads: 8 is not divisible by parallel.tensor_parallel=3"),
    ({"model": {"num_attention_heads": 4, "hidden_size": 256, "ffn_hidden_size": 5461, "rank": 64}, "parallel": {"tensor_parallel": 4}}, None, "model.ffn_hidden_size (after ffn_multiple_of padding): 5461 is not divisible by parallel.tensor_parallel=4"),
    ({"model": {"vocab_size": 32001}, "parallel": {"tensor_parallel": 2}}, None, "model.vocab_size: 32001 is not divisible"),
    ({"model": {"rank": 126}, "parallel": {"tensor_parallel": 4, "cola_tp_scheme": "pair"}}, None, "model.rank: 126 is not divisible by parallel.tensor_parallel=4"),
    ({"parallel": {"cola_tp_scheme": "ring"}}, None, "parallel.cola_tp_scheme: 'ring' is not one of"),
    ({"parallel": {"sequence_parallel": True}}, None, "parallel.sequence_parallel: needs tensor_parallel > 1"),
    ({"model": {"seq_length": 250}, "parallel": {"tensor_parallel": 4, "sequence_parallel": True}}, None, "model.seq_length: 250 is not divisible by parallel.tensor_parallel=4"),
    ({"model": {"num_layers": 6}, "parallel": {"pipeline_parallel": 4}}, None, "model.num_layers: 6 is not divisible by pipeline_parallel x virtual_pipeline=4"),
    ({"model": {"num_layers": 8}, "parallel": {"pipeline_parallel": 2, "virtual_pipeline": 3}}, None, "model.num_layers: 8 is not divisible by pipeline_parallel x virtual_pipeline=6"),
    ({"parallel": {"virtual_pipeline": 2}}, None, "parallel.virtual_pipeline: needs pipeline_parallel > 1"),
    ({"parallel": {"overlap_param_gather": True}}, None, "parallel.overlap_param_gather: needs the distributed optimizer"),
    ({"train": {"global_batch_size": 10, "micro_batch_size": 4}}, None, "train.global_batch_size: 10 is not divisible by train.micro_batch_size=4"),
    ({"train": {"global_batch_size": 8, "micro_batch_size": 2}}, 8, "with data_parallel=8, use a global batch that is a multiple of 16"),
    ({"parallel": {"tensor_parallel": 2}}, 3, "parallel: world size 3 is not divisible by tensor_parallel x pipeline_parallel=2"),
    ({"train": {"precision": "fp8"}}, None, "train.precision: 'fp8' is not one of"),
    ({"train": {"precision": "fp32", "pure_bf16": True}}, None, "train.pure_bf16: needs precision=bf16"),
    ({"optimizer": {"warmup_iters": 200}, "train": {"train_iters": 100}}, None, "optimizer.warmup_iters: 200 is not below the decay length 100"),
    ({"optimizer": {"min_lr_ratio": 1.5}}, None, "optimizer.min_lr_ratio: 1.5 is outside [0, 1]"),
    ({"optimizer": {"adam_beta2": 1.0}}, None, "optimizer.adam_beta2: 1.0 is outside [0, 1)"),
    ({"optimizer": {"lr": -1}}, None, "optimizer.lr: must be > 0"),
    ({"checkpoint": {"save_interval": 100}}, None, "checkpoint.save_interval: is set but checkpoint.save_dir is not"),
    ({"checkpoint": {"save_dir": "x", "keep_last": 0}}, None, "checkpoint.keep_last: must be > 0"),
    ({"data": {"mock": False}}, None, "no training data: set data.paths"),
    ({"data": {"layout": "ragged"}}, None, "data.layout must be one of"),
]


@pytest.mark.parametrize("overrides,world_size,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_configuration_names_key_and_fix(overrides, world_size, message):
    values = {**BASE, **overrides}
    if "data" in overrides:
        values["data"] = {**BASE["data"], **overrides["data"]}
    with pytest.raises(ConfigError) as err:
        config_from_dict(values, world_size=world_size)
    assert message in str(err.value)


def test_missing_config_file_is_clear():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_bad_override_syntax_is_clear():
    with pytest.raises(ConfigError, match="is not a key=value override"):
        load_config(None, ["train.train_iters"])


def test_cli_reports_config_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        model: {hidden_size: 64, num_attention_heads: 4, rank: 16}
        parallel: {tensor_parallel: 3}
        data: {mock: true}
    """))
    out = subprocess.run([sys.executable, "-m", "cola_megatron.train", "--config", str(bad), "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "cola-train: error: model.num_attention_heads: 4 is not divisible by parallel.tensor_parallel=3" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("config", ["configs/cola/llama_7b.yaml", "configs/dense/llama_7b.yaml",
                                    "configs/cola_m/llama_1b.yaml", "configs/demo.yaml",
                                    "configs/cola/llama3_8b.yaml", "configs/dense/llama3_8b.yaml"])
def test_dry_run_validates_and_allocates_nothing(config):
    # A 7B model would need tens of GB; the dry run must stay tiny (its RSS is checked via ulimit-free bound).
    code = (
        "import resource, sys; from cola_megatron.train import main; rc = main(['--config', sys.argv[1], "
        "'--dry-run', *sys.argv[2:]]); print('maxrss_mib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024); "
        "sys.exit(rc)"
    )
    # The paper configs name C4 files that are not shipped: synthetic data stands in for them.
    corpus = os.path.exists("data_cache/sample_corpus/bpe8192/manifest.json")
    mock = [] if config.endswith("demo.yaml") and corpus else ["data.mock=true", "data.tokenizer=null"]
    out = subprocess.run([sys.executable, "-c", code, config, *mock], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "parameters:" in out.stdout and "training FLOPs per token" in out.stdout
    assert "tensor_parallel=" in out.stdout
    rss = int(out.stdout.split("maxrss_mib")[1].split()[0])
    assert rss < 2048, f"dry run used {rss} MiB"
    if "llama3_8b" in config:  # grouped-query attention: 8 k/v heads, the KV cache a quarter of 32 heads'
        cola_count, dense_count = llama3_8b_counts()
        assert f"parameters: {cola_count if '/cola/' in config else dense_count:,} " in out.stdout
        assert "heads=32 query_groups=8" in out.stdout
        assert f"KV cache per token: {2 * 8 * 128 * 32:,} elements" in out.stdout


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO)) for p in REPO.glob("configs/[cd]*/*.yaml")))
def test_shipped_configs_pass_the_memory_bound_and_absurd_sequences_do_not(config):
    """The up-front memory bound (one micro-batch's activations vs the largest accelerator) never refuses a paper
    config at its own layout, and refuses a 10M-token sequence."""
    from cola_megatron.training.preflight import check_memory

    check_memory(load_config(str(REPO / config)))
    with pytest.raises(ConfigError, match="more than any accelerator holds"):
        check_memory(load_config(str(REPO / config), ["model.seq_length=10000000"]))


def test_duplicate_keys_are_refused_in_included_files_too(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  seed: 1\n  seed: 2\n")
    (tmp_path / "run.yaml").write_text("include: base.yaml\ndata: {mock: true}\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: key 'seed' appears twice \(lines 2 and 3\)"):
        load_config(str(tmp_path / "run.yaml"))
