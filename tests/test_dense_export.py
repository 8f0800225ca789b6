"""Dense runs through the Hugging Face tools: ``cola-convert to-hf`` writes a plain ``LlamaForCausalLM`` directory
(no remote code) whose logits are megatron's, and ``from-hf`` reads it back into a dense run bit-identically.

Like tests/test_hf_export.py, the transformers-side tests run twice: with the installed transformers, and through
``test_the_suite_passes_on_the_lowest_supported_transformers`` in the environment of the lowest supported one
(tests/hf_floor.py), against the export and the megatron logits written here.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests import hf_floor

EXPORT_ENV = "COLA_DENSE_EXPORT"  # set in the second environment's run: the directory the installed stack wrote
EXPECT_ENV = "COLA_HF_EXPECT_TRANSFORMERS"
# Grouped query attention (2 k/v heads for 4 query heads) so the fused qkv layout's grouping is exercised.
MODEL = dict(arch="dense", hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4,
             num_query_groups=2, vocab_size=320, seq_length=32)
TOKENS = [[5, 17, 260, 3, 99, 42, 7, 300, 12, 1, 64, 128], [250, 4, 4, 8, 15, 16, 23, 42, 108, 9, 2, 77]]


def _convert(root):
    """A random dense run's weights (fp32), its logits, the export and the re-import, written under ``root``."""
    from cola_megatron.config import config_from_dict
    from cola_megatron.convert import cli, megatron_io
    from cola_megatron.models.init import initialize_parameters
    from cola_megatron.training import checkpoint as ckpt_lib

    cfg = megatron_io.unsplit(config_from_dict({"model": MODEL, "train": {"precision": "fp32", "seed": 3},
                                                "data": {"mock": True}}))
    megatron_io.initialize(cfg)
    (model,) = megatron_io.build_chunks(cfg)
    initialize_parameters([model], cfg.train.seed, 0.2)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    megatron_io.write_full_state(state, cfg, os.path.join(root, "run"))
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        logits = model.eval()(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
    assert cli.main(["to-hf", os.path.join(root, "run"), os.path.join(root, "export"), "--no-tokenizer"]) == 0
    assert cli.main(["from-hf", os.path.join(root, "export"), os.path.join(root, "back")]) == 0
    back = os.path.join(root, "back")
    reader = megatron_io.CheckpointReader(ckpt_lib.resolve_checkpoint(back), ckpt_lib.read_checkpoint_config(
        ckpt_lib.resolve_checkpoint(back)))
    again = reader.read(list(state))
    torch.save({"logits": logits, "state": state, "again": again,
                "arch": ckpt_lib.read_checkpoint_config(ckpt_lib.resolve_checkpoint(back)).model.arch},
               os.path.join(root, "megatron.pt"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if os.environ.get(EXPORT_ENV):
        return Path(os.environ[EXPORT_ENV])
    from tests.distributed import run_distributed

    root = tmp_path_factory.mktemp("dense_export")
    run_distributed(_convert, 1, str(root), timeout=600)
    return root


pytestmark = pytest.mark.usefixtures("hf_offline")


def test_runs_the_expected_transformers():
    import transformers

    expected = os.environ.get(EXPECT_ENV)
    if expected:
        assert transformers.__version__ == expected


def test_export_is_a_plain_llama_with_megatrons_logits(converted):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    export = converted / "export"
    assert not [f for f in os.listdir(export) if f.endswith(".py")]  # no remote code
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["torch_dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert type(model) is LlamaForCausalLM
    tokens = torch.tensor(TOKENS)
    with torch.no_grad():
        logits = model(tokens).logits
        generated = model.generate(tokens[:1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    # Different attention and matmul kernels on both sides: fp32 rounding of logits of size ~1, as test_convert's
    # CoLA export comparison allows.
    torch.testing.assert_close(logits, torch.load(converted / "megatron.pt")["logits"], atol=1e-4, rtol=0)
    assert generated.shape == (1, 8)


def test_from_hf_reads_the_llama_back_into_a_dense_run(converted):
    saved = torch.load(converted / "megatron.pt")
    assert saved["arch"] == "dense" and set(saved["again"]) == set(saved["state"])
    for name, tensor in saved["state"].items():
        assert torch.equal(saved["again"][name], tensor), name


def test_the_suite_passes_on_the_lowest_supported_transformers(converted):
    if os.environ.get(EXPORT_ENV):
        pytest.skip("this is the run in the lowest supported environment")
    floor = hf_floor.ensure_environment()
    env = dict(os.environ, PYTHONPATH=str(hf_floor.REPO),
               **{EXPORT_ENV: str(converted), EXPECT_ENV: hf_floor.FLOOR["transformers"]})
    run = subprocess.run([str(hf_floor.python(floor)), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                         cwd=hf_floor.REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" in run.stdout
