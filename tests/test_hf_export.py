"""An export as users take it: real transformers, tokenizer, pipeline, PEFT and Trainer on a tiny random export.

The suite runs twice in ``make test``: here, with the transformers the project installs, and through
``test_the_suite_passes_on_the_lowest_supported_transformers`` in a second environment holding the lowest supported
transformers / tokenizers / peft / accelerate (see ``tests/hf_floor.py``), against the export written here. Exports
are made as ``cola-convert to-hf`` makes them (``hf_io.write_export`` from reference-named tensors), without training.
The model has grouped-query attention (4 query heads, 2 k/v heads), so every check here covers it; multi-head
exports are the ``test_convert.py`` ones.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import hf_floor

EXPORT_ENV = "COLA_HF_EXPORT"  # set in the second environment's run: the export written by the installed stack
EXPECT_ENV = "COLA_HF_EXPECT_TRANSFORMERS"
MODEL = dict(arch="cola", hidden_size=64, ffn_hidden_size=96, num_layers=2, num_attention_heads=4, rank=16,
             vocab_size=320, seq_length=32, num_query_groups=2)
PROMPTS = ["the quick brown fox", "a stitch in time saves nine and the lazy dog"]


def build_export(root: Path) -> Path:
    """A tokenizer and random weights (large enough that layout or masking bugs move the logits), exported."""
    from cola_megatron.config import config_from_dict
    from cola_megatron.convert import hf_io, names
    from cola_megatron.data.tokenizer import train_bpe_tokenizer
    from cola_megatron.hf.configuration_cola import ColaConfig
    from cola_megatron.hf.modeling_cola import ColaForCausalLM

    tokenizer = root / "tokenizer.json"
    text = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 20
    train_bpe_tokenizer(text, vocab_size=300, min_frequency=1).save(str(tokenizer))
    cfg = config_from_dict({"model": MODEL, "data": {"mock": True, "tokenizer": str(tokenizer)}})
    fields = names.hf_config_fields(cfg.model, hf_io.tokenizer_special_ids(str(tokenizer), cfg.model.vocab_size))
    torch.manual_seed(0)
    model = ColaForCausalLM(ColaConfig(**fields))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cola_a", "cola_b")):
                param.normal_(0.0, 0.2)
            elif name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    export = root / "export"
    hf_io.write_export(str(export), model.state_dict(), fields, str(tokenizer))
    return export


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    if os.environ.get(EXPORT_ENV):
        return Path(os.environ[EXPORT_ENV])
    return build_export(tmp_path_factory.mktemp("hf_export"))


pytestmark = pytest.mark.usefixtures("hf_offline")


def load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs).eval()


def load_tokenizer(path, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=True, **kwargs)


def greedy(model, input_ids, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, **kwargs)


def test_runs_the_expected_transformers():
    import transformers

    expected = os.environ.get(EXPECT_ENV)
    if expected:
        assert transformers.__version__ == expected


# ---------------------------------------------------------------- loading and generation


def test_auto_classes_load_the_shipped_code(export):
    from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

    config = AutoConfig.from_pretrained(export, trust_remote_code=True)
    assert type(config).__name__ == "ColaConfig" and config.tokenizer_class == "PreTrainedTokenizerFast"
    model = load(export)
    base = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    for m, name in ((model, "ColaForCausalLM"), (base, "ColaModel")):
        assert type(m).__name__ == name and not type(m).__module__.startswith("cola_megatron"), type(m).__module__
    ids = torch.tensor([[5, 17, 260, 3, 99, 42]])
    with torch.no_grad():
        torch.testing.assert_close(model.model(ids).last_hidden_state, base(ids).last_hidden_state, atol=0, rtol=0)
    tokenizer = load_tokenizer(export)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    encoded = tokenizer(PROMPTS[0])
    assert set(encoded) == {"input_ids", "attention_mask"}  # no token_type_ids the model would refuse
    assert tokenizer.decode(encoded["input_ids"]) == PROMPTS[0]
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 0
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 1


def test_generate_from_tokenizer_output(export):
    model, tokenizer = load(export), load_tokenizer(export)
    inputs = tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(out, greedy(model, inputs["input_ids"], attention_mask=inputs["attention_mask"]))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6


def test_text_generation_pipeline(export):
    from transformers import pipeline

    model, tokenizer = load(export), load_tokenizer(export)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    want = tokenizer.decode(greedy(model, ids)[0])
    for kwargs in ({}, {"tokenizer": str(export)}):
        generator = pipeline("text-generation", model=str(export), trust_remote_code=True, **kwargs)
        out = generator(PROMPTS[0], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert out[0]["generated_text"] == want, kwargs


def test_greedy_same_with_and_without_cache(export):
    model = load(export)
    prompt = torch.tensor([[5, 17, 260, 3, 99, 42], [250, 4, 4, 8, 15, 16]])
    cached = greedy(model, prompt, use_cache=True)
    assert torch.equal(cached, greedy(model, prompt, use_cache=False))


def cache_tensors(cache):
    """(keys, values) of every layer of a transformers cache, in either release's layout."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def test_kv_cache_holds_the_key_value_heads_only(export):
    """Grouped-query attention: the cache stores 2 k/v heads per layer, not the 4 query heads, and decoding one
    more token from it gives the logits of the whole sequence at once."""
    model = load(export)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    ids = torch.tensor([[5, 17, 260, 3, 99, 42, 7]])
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        tensors = cache_tensors(cache)
        assert len(tensors) == model.config.num_hidden_layers
        for keys, values in tensors:
            assert keys.shape == values.shape == (1, 2, 6, 16)
        step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
        whole = model(ids).logits[:, -1]
    assert all(keys.shape[2] == 7 for keys, _ in cache_tensors(cache))
    torch.testing.assert_close(step, whole, atol=1e-5, rtol=1e-5)  # fp32 rounding of O(1) logits: ~1e-6


def test_left_padded_batch_equals_single_prompts(export):
    model, tokenizer = load(export), load_tokenizer(export, padding_side="left")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][0] == 0).any(), "the test needs prompts of different lengths"
    together = greedy(model, batch["input_ids"], attention_mask=batch["attention_mask"])
    for row, prompt in enumerate(PROMPTS):
        single = tokenizer(prompt, return_tensors="pt")
        alone = greedy(model, single["input_ids"], attention_mask=single["attention_mask"])
        assert torch.equal(together[row, -alone.shape[1]:], alone[0]), prompt


def test_generation_from_inputs_embeds(export):
    model = load(export)
    prompt = torch.tensor([[5, 17, 260, 3, 99, 42]])
    embeds = model.get_input_embeddings()(prompt).detach()
    want = greedy(model, prompt)[:, prompt.shape[1]:]
    for use_cache in (True, False):
        out = greedy(model, None, inputs_embeds=embeds, attention_mask=torch.ones_like(prompt), use_cache=use_cache)
        assert torch.equal(out[:, -want.shape[1]:], want), use_cache


def test_save_pretrained_copies_the_code_and_reloads(export, tmp_path):
    model = load(export)
    model.save_pretrained(tmp_path / "saved")
    load_tokenizer(export).save_pretrained(tmp_path / "saved")
    saved = tmp_path / "saved"
    assert {"modeling_cola.py", "configuration_cola.py", "config.json", "generation_config.json"} <= set(
        os.listdir(saved))
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_cola.ColaForCausalLM"
    reloaded = load(saved)
    assert type(reloaded).__module__ != type(model).__module__  # the copied file, not the export's
    ids = torch.tensor([[5, 17, 260, 3, 99, 42, 7, 300]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert load_tokenizer(saved)(PROMPTS[0])["input_ids"] == load_tokenizer(export)(PROMPTS[0])["input_ids"]


# ---------------------------------------------------------------- outputs and attention implementations


def test_hidden_states_and_eager_attentions(export, monkeypatch):
    ids = torch.tensor([[5, 17, 260, 3, 99, 42, 7]])
    sdpa = load(export)
    eager = load(export, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        out = sdpa(ids, output_hidden_states=True)
        hidden = out.hidden_states
        assert len(hidden) == sdpa.config.num_hidden_layers + 1
        torch.testing.assert_close(hidden[0], sdpa.model.embed_tokens(ids), atol=0, rtol=0)
        torch.testing.assert_close(hidden[-1], sdpa.model(ids).last_hidden_state, atol=0, rtol=0)
        torch.testing.assert_close(sdpa.lm_head(hidden[-1]), out.logits, atol=0, rtol=0)
        with pytest.raises(ValueError, match="eager"):
            sdpa(ids, output_attentions=True)

        calls = []
        real_sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
        eager_out = eager(ids, output_attentions=True, output_hidden_states=True)
        assert not calls, "attn_implementation='eager' must not run SDPA"
        sdpa(ids)
        assert calls, "the default implementation is SDPA"
    torch.testing.assert_close(eager_out.logits, out.logits, atol=1e-5, rtol=1e-5)  # fp32 rounding of O(1) logits: ~1e-6
    (weights, *_) = eager_out.attentions
    assert len(eager_out.attentions) == 2 and weights.shape == (1, 4, 7, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 7))
    assert torch.equal(weights.triu(1), torch.zeros_like(weights))  # causal


# ---------------------------------------------------------------- training


def batch_of(rows=4, seq=10, seed=3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 300, (rows, seq), generator=generator)
    labels = ids.clone()
    labels[:, 4] = -100  # one ignored target per row: equal counts per micro-batch
    return ids, labels


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def layer_calls(model, ids, labels):
    """Which decoder layers ran in the forward pass and which ran again in the backward pass."""
    calls = []
    # Pre-hooks: non-reentrant recomputation stops as soon as the saved tensors are rebuilt, before forward hooks.
    hooks = [layer.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
             for i, layer in enumerate(model.model.layers)]
    try:
        loss = model(ids, labels=labels).loss
        forward = list(calls)
        calls.clear()
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return forward, calls


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_recomputes_layers_with_the_same_gradients(export, use_reentrant):
    ids, labels = batch_of()
    model = load(export).train()
    layers = list(range(model.config.num_hidden_layers))
    assert layer_calls(model, ids, labels) == (layers, [])
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.model.gradient_checkpointing
    forward, backward = layer_calls(model, ids, labels)
    # Each layer runs once more in the backward pass: its activations were recomputed, not kept.
    assert forward == layers and sorted(backward) == layers, (forward, backward)
    checkpointed = grads(model)
    assert set(checkpointed) == set(plain) and len(plain) == len(list(model.parameters()))
    for name, grad in plain.items():  # fp32: the recomputed forward may order its sums differently (~1e-7)
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_one_peft_lora_step(export):
    from peft import LoraConfig, get_peft_model

    ids, labels = batch_of(rows=2)
    model = load(export)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base_logits = model(ids).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[],
                                                  target_parameters=["cola_a", "cola_b"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers x 7 projections x (cola_a, cola_b), each with a lora_A and a lora_B.
    assert len(trainable) == 2 * 7 * 2 * 2
    peft_model.train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    loss = peft_model(input_ids=ids, labels=labels).loss
    loss.backward()
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)
    optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        assert not torch.allclose(peft_model(input_ids=ids).logits, base_logits, atol=1e-4)
        after_loss = peft_model(input_ids=ids, labels=labels).loss
    assert after_loss < loss
    base = peft_model.get_base_model()
    with torch.no_grad():
        # The frozen CoLA weights are untouched underneath the adapters.
        for name, param in base.named_parameters():
            plain = name.replace(".base_layer", "").replace(".original", "")
            if plain in before and "lora_" not in name:
                assert torch.equal(param, before[plain]), name


def uneven_batch_of(seed=3):
    """Right-padded rows with 1, 2, 4 and 9 targets: however the Trainer pairs them into micro-batches of 2, the
    micro-batches hold different numbers of targets, so a mean of micro-batch means differs from the batch mean."""
    ids, _ = batch_of(seed=seed)
    lengths = torch.tensor([2, 3, 5, 10])
    attention_mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(attention_mask == 0, 1)  # the export's pad id
    labels = ids.masked_fill(attention_mask == 0, -100)
    # Position 0 is never a target; ignoring it keeps the count exact also on Trainers that count it (before
    # transformers#46204).
    labels[:, 0] = -100
    return ids, labels, attention_mask


def trainer_counts_items_in_batch():
    import inspect

    from transformers import Trainer

    return "num_items_in_batch" in inspect.signature(Trainer.compute_loss).parameters


@pytest.mark.parametrize("targets", ["equal", "uneven"])
def test_trainer_gradient_accumulation_equals_one_doubled_batch(export, tmp_path, targets):
    import transformers
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    if targets == "equal":
        ids, labels = batch_of(rows=4)
        attention_mask = torch.ones_like(ids)
        runs = ((2, 2), (4, 1))
    else:
        if not trainer_counts_items_in_batch():
            pytest.skip(f"transformers {transformers.__version__} has no num_items_in_batch (4.46+): its Trainer "
                        "averages micro-batch means, equal to the batch mean only for equal target counts")
        ids, labels, attention_mask = uneven_batch_of()
        runs = ((2, 2),)

    class Rows(Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "attention_mask": attention_mask[i], "labels": labels[i]}

    class KeepGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = grads(model)

    def train(micro_batch, accumulation):
        keep = KeepGrads()
        args = TrainingArguments(output_dir=str(tmp_path / f"run{accumulation}"), per_device_train_batch_size=micro_batch,
                                 gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-3,
                                 max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True,
                                 dataloader_num_workers=0, logging_steps=1, disable_tqdm=True)
        result = Trainer(model=load(export).train(), args=args, train_dataset=Rows(), callbacks=[keep]).train()
        return result.training_loss, keep.grads

    # One doubled batch computed directly: the mean next-token loss over all 4 rows' targets and its gradients.
    model = load(export).train()
    loss = model(ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    want = grads(model)
    for micro_batch, accumulation in runs:
        got_loss, got = train(micro_batch, accumulation)
        assert got_loss == pytest.approx(loss.item(), rel=1e-5), (micro_batch, accumulation)
        assert set(got) == set(want)
        # fp32 gradients summed over micro-batches in another grouping: rounding of about 1e-7 of their scale,
        # relatively larger on near-zero elements; a wrong loss weighting is off by 1e-1 or more.
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4, msg=f"{name} ({micro_batch}x{accumulation})")


# ---------------------------------------------------------------- the lowest supported versions


def test_declared_floors_are_the_tested_versions():
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((hf_floor.REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + sum(project["optional-dependencies"].values(), [])]
    for name in ("transformers", "tokenizers"):
        specifiers = [s for r in declared if r.name == name for s in r.specifier]
        assert {s.version for s in specifiers if s.operator == ">="} == {hf_floor.FLOOR[name]}, specifiers
        assert all(any(s.operator == "<" for s in r.specifier) for r in declared if r.name == name), name


@pytest.mark.skipif(bool(os.environ.get(EXPORT_ENV)), reason="this is the run in the second environment")
def test_the_suite_passes_on_the_lowest_supported_transformers(export, tmp_path):
    floor = hf_floor.ensure_environment()
    env = dict(os.environ, PYTHONPATH=str(hf_floor.REPO),
               **{EXPORT_ENV: str(export), EXPECT_ENV: hf_floor.FLOOR["transformers"]})
    run = subprocess.run([str(hf_floor.python(floor)), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                         cwd=hf_floor.REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" in run.stdout  # everything above ran; only this test skipped
