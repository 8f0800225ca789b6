"""The Hugging Face model code shipped with every export: names, maths, init, generation and remote-code loading."""

import ast
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cola_megatron.hf import configuration_cola, modeling_cola
from cola_megatron.hf.configuration_cola import ColaConfig
from cola_megatron.hf.modeling_cola import (
    ColaForCausalLM,
    ColaProjection,
    expected_parameter_shapes,
    load_cola_state_dict,
)

SHIPPED_FILES = (Path(configuration_cola.__file__), Path(modeling_cola.__file__))


def tiny_config(**overrides):
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        rank=16,
        max_position_embeddings=64,
    )
    fields.update(overrides)
    return ColaConfig(**fields)


# Two fp32 computations of the same logits (incremental vs whole, padded vs unpadded, eager vs SDPA, the shipped
# code vs a hand-written forward) order their sums differently: tiny_model's logits are of order 1, and the rounding
# of its few dozen-term sums stays near 1e-6 on any CPU's kernels, so 1e-5 absolute plus relative bounds it with a
# tenfold margin; a masking, cache or layout bug moves logits by 1e-2 or more.
FP32_LOGITS = dict(atol=1e-5, rtol=1e-5)


def tiny_model(seed=0, **overrides):
    """A tiny model with larger-than-default random weights, so that layout or masking bugs move the logits."""
    torch.manual_seed(seed)
    model = ColaForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("cola_a") or name.endswith("cola_b"):
                param.normal_(0.0, 0.2)
            elif name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:  # embeddings and lm_head: logits of order 1, where fp32 rounding stays near 1e-6
                param.normal_(0.0, 0.1)
    return model


# ---------------------------------------------------------------- names, shapes, config


def test_parameter_names_and_shapes_are_the_reference_ones():
    cfg = tiny_config()
    model = ColaForCausalLM(cfg)
    d, ffn, r, vocab = 64, 96, 16, 128
    want = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(2):
        p = f"model.layers.{i}."
        want[p + "input_layernorm.weight"] = (d,)
        want[p + "post_attention_layernorm.weight"] = (d,)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            want[f"{p}self_attn.{proj}.cola_a"] = (d, r)
            want[f"{p}self_attn.{proj}.cola_b"] = (r, d)
        for proj, (d_in, d_out) in {"gate_proj": (d, ffn), "up_proj": (d, ffn), "down_proj": (ffn, d)}.items():
            want[f"{p}mlp.{proj}.cola_a"] = (d_in, r)
            want[f"{p}mlp.{proj}.cola_b"] = (r, d_out)

    got = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert got == want
    assert expected_parameter_shapes(cfg) == want


def test_config_round_trips_and_carries_auto_map(tmp_path):
    cfg = tiny_config(only_lr_act=True, rms_norm_eps=1e-5)
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "cola"
    assert saved["auto_map"]["AutoConfig"] == "configuration_cola.ColaConfig"
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_cola.ColaForCausalLM"
    for key, value in dict(rank=16, lr_act_type="silu", only_lr_act=True, rope_theta=10000.0,
                           rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
                           num_key_value_heads=4).items():
        assert saved[key] == value, key
    loaded = ColaConfig.from_pretrained(tmp_path)
    assert (loaded.rank, loaded.only_lr_act, loaded.head_dim) == (16, True, 16)


@pytest.mark.parametrize(
    "bad, fix",
    [
        (dict(tie_word_embeddings=True), "tie_word_embeddings=False"),
        (dict(lr_act_type="relu"), "lr_act_type"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_size=66), "divisible"),
        (dict(rank=0), "rank"),
    ],
)
def test_bad_config_fails_with_a_clear_message(bad, fix):
    with pytest.raises(ValueError, match=fix):
        tiny_config(**bad)


def test_shipped_files_import_only_torch_and_transformers():
    for path in SHIPPED_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:  # relative: the sibling shipped file
                    assert node.module == "configuration_cola", (path.name, node.module)
                    continue
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= {"torch", "transformers"}, (path.name, roots)


# ---------------------------------------------------------------- maths


def test_projection_is_silu_bottleneck():
    torch.manual_seed(0)
    proj = ColaProjection(24, 40, 8)
    torch.nn.init.normal_(proj.cola_a)
    torch.nn.init.normal_(proj.cola_b)
    x = torch.randn(3, 5, 24)
    a, b = proj.cola_a.detach(), proj.cola_b.detach()
    by_hand = (x @ a) * torch.sigmoid(x @ a) @ b
    torch.testing.assert_close(proj(x), by_hand)


@pytest.mark.parametrize("only_lr_act", [False, True])
def test_mlp_matches_hand_computation(only_lr_act):
    model = tiny_model(only_lr_act=only_lr_act)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 7, 64)

    def bottleneck(p, v):
        return F.silu(v @ p.cola_a) @ p.cola_b

    gate = bottleneck(mlp.gate_proj, x)
    if not only_lr_act:
        gate = F.silu(gate)
    by_hand = bottleneck(mlp.down_proj, gate * bottleneck(mlp.up_proj, x))
    torch.testing.assert_close(mlp(x), by_hand)


def test_only_lr_act_changes_the_mlp():
    with_act, without_act = tiny_model(only_lr_act=False), tiny_model(only_lr_act=True)
    without_act.load_state_dict(with_act.state_dict())  # same weights, only the MLP wiring differs
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        assert not torch.allclose(with_act.model.layers[0].mlp(x), without_act.model.layers[0].mlp(x), atol=1e-3)
        torch.testing.assert_close(
            with_act.model.layers[0].self_attn.q_proj(x), without_act.model.layers[0].self_attn.q_proj(x)
        )


def reference_logits(state, cfg, input_ids):
    """The whole CoLA decoder written out in plain torch, independently of the model code."""
    d, heads, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.rms_norm_eps
    kv_heads = cfg.num_key_value_heads
    hd, half = d // heads, d // heads // 2
    batch, seq = input_ids.shape

    def proj(name, x):
        z = x @ state[name + ".cola_a"]
        return (z * torch.sigmoid(z)) @ state[name + ".cola_b"]

    def rms(x, weight):
        return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    # RoPE on (x[i], x[i + hd/2]) pairs by angle pos * theta^(-2i/hd), computed in float64.
    freq = cfg.rope_theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * freq
    cos, sin = angle.cos().float(), angle.sin().float()

    def rope(x):
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def split_heads(x):
        return x.view(batch, seq, x.shape[-1] // hd, hd).transpose(1, 2)

    def shared(x):  # grouped-query attention: k/v head g serves query heads g·heads/kv_heads ... (g+1)·heads/kv_heads - 1
        return x.repeat_interleave(heads // kv_heads, dim=1)

    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    h = state["model.embed_tokens.weight"][input_ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms(h, state[p + "input_layernorm.weight"])
        q = rope(split_heads(proj(p + "self_attn.q_proj", x)))
        k = shared(rope(split_heads(proj(p + "self_attn.k_proj", x))))
        v = shared(split_heads(proj(p + "self_attn.v_proj", x)))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        h = h + proj(p + "self_attn.o_proj", (probs @ v).transpose(1, 2).reshape(batch, seq, d))
        x = rms(h, state[p + "post_attention_layernorm.weight"])
        gate = proj(p + "mlp.gate_proj", x)
        if not cfg.only_lr_act:
            gate = gate * torch.sigmoid(gate)
        h = h + proj(p + "mlp.down_proj", gate * proj(p + "mlp.up_proj", x))
    return rms(h, state["model.norm.weight"]) @ state["lm_head.weight"].T


@pytest.mark.parametrize("only_lr_act,kv_heads", [(False, 4), (True, 4), (False, 2), (False, 1)])
def test_whole_model_matches_reference_forward(only_lr_act, kv_heads):
    model = tiny_model(only_lr_act=only_lr_act, num_key_value_heads=kv_heads)
    assert model.model.layers[0].self_attn.k_proj.cola_b.shape == (16, 16 * kv_heads)
    input_ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        logits = model(input_ids).logits
        want = reference_logits(model.state_dict(), model.config, input_ids)
    torch.testing.assert_close(logits, want, **FP32_LOGITS)


def test_loss_is_next_token_cross_entropy():
    model = tiny_model()
    input_ids = torch.randint(0, 128, (2, 9))
    labels = input_ids.clone()
    labels[0, 4] = -100
    with torch.no_grad():
        out = model(input_ids, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)


def test_bf16_forward_runs():
    model = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.randint(0, 128, (1, 8))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ---------------------------------------------------------------- init


def test_fresh_init_follows_cola_formula():
    torch.manual_seed(0)
    cfg = ColaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=1,
                     num_attention_heads=8, rank=128)
    model = ColaForCausalLM(cfg)
    for module_name, module in model.named_modules():
        if isinstance(module, ColaProjection):
            want = (module.rank * (module.in_features + module.out_features)) ** -0.25
            for tensor in (module.cola_a, module.cola_b):
                assert abs(tensor.std().item() / want - 1) < 0.03, module_name
                assert abs(tensor.mean().item()) < 0.1 * want, module_name
    assert (128 * (512 + 1376)) ** -0.25 == pytest.approx(model.model.layers[0].mlp.gate_proj.init_std)
    for tensor in (model.model.embed_tokens.weight, model.lm_head.weight):
        assert abs(tensor.std().item() / 0.02 - 1) < 0.03
    for name, tensor in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name


# ---------------------------------------------------------------- generation


def test_greedy_generate_same_with_and_without_cache():
    model = tiny_model()
    prompt = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, uncached)


def test_incremental_decoding_matches_full_forward():
    model = tiny_model()
    input_ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        full = model(input_ids).logits
        # Prefill 4 tokens, a 3-token chunk against the cache (causal mask offset by the past), then single steps.
        cache, steps = None, []
        for start, end in [(0, 4), (4, 7), (7, 8), (8, 9), (9, 10)]:
            out = model(input_ids[:, start:end], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert cache.get_seq_length() == 10
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **FP32_LOGITS)


def test_left_padding_gives_the_unpadded_result():
    model = tiny_model()
    # Token 0 is the padding id; generate would infer a mask from it, so prompts avoid it.
    short, long = torch.randint(1, 128, (1, 5)), torch.randint(1, 128, (1, 8))
    pad = 3
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1), long])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(logits[0, pad:], model(short).logits[0], **FP32_LOGITS)
        torch.testing.assert_close(logits[1], model(long).logits[0], **FP32_LOGITS)

        generated = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        alone = model.generate(
            short, attention_mask=torch.ones_like(short), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert torch.equal(generated[0, pad:], alone[0])


# ---------------------------------------------------------------- loading


def test_state_dict_with_reference_names_loads():
    source, target = tiny_model(seed=1), ColaForCausalLM(tiny_config()).eval()
    state = {name: tensor.clone() for name, tensor in source.state_dict().items()}
    load_cola_state_dict(target, state)
    input_ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(target(input_ids).logits, source(input_ids).logits)

    transposed = dict(state)
    transposed["model.layers.0.mlp.down_proj.cola_a"] = state["model.layers.0.mlp.down_proj.cola_a"].T
    with pytest.raises(ValueError, match=r"down_proj\.cola_a: got \(16, 96\), expected \(96, 16\)"):
        load_cola_state_dict(target, transposed)
    incomplete = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="missing: \\['lm_head.weight'\\]"):
        load_cola_state_dict(target, incomplete)


LOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__name__ == "ColaForCausalLM", type(model)
assert not type(model).__module__.startswith("cola_megatron"), type(model).__module__
input_ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids).logits
    generated = model.generate(input_ids, max_new_tokens=5, do_sample=False)
torch.save({"logits": logits, "generated": generated}, sys.argv[3])
"""


def test_export_directory_loads_offline_with_remote_code(tmp_path):
    model = tiny_model()
    export = tmp_path / "export"
    model.save_pretrained(export)
    for path in SHIPPED_FILES:
        shutil.copy(path, export / path.name)
    config = json.loads((export / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_cola.ColaForCausalLM"
    assert (export / "model.safetensors").exists()

    input_ids = torch.randint(0, 128, (2, 9))
    torch.save(input_ids, tmp_path / "ids.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    # A fresh interpreter, as a user loading the export would have.
    subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(export), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        check=True, env=env, cwd=tmp_path, timeout=300,
    )
    loaded = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded["logits"], model(input_ids).logits, atol=0, rtol=0)
        assert torch.equal(loaded["generated"], model.generate(input_ids, max_new_tokens=5, do_sample=False))


def test_eager_attention_matches_sdpa_with_padding_and_cache():
    sdpa = tiny_model()
    eager = tiny_model(attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(eager(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits,
                                   **FP32_LOGITS)
        cached = eager(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        step = eager(ids[:, 6:], attention_mask=mask, past_key_values=cached.past_key_values, use_cache=True)
        torch.testing.assert_close(step.logits, sdpa(ids, attention_mask=mask).logits[:, 6:], **FP32_LOGITS)


def test_loss_with_num_items_in_batch_is_the_sum_over_that_count():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        mean = model(ids, labels=ids).loss
        halved = model(ids, labels=ids, num_items_in_batch=2 * 2 * 8).loss
    torch.testing.assert_close(halved, mean / 2)
