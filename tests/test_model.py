"""The CoLA model at TP=1: projections, initialisation, training signal, attention kernel, accounting."""

import math

import pytest
import torch

from tests.distributed import run_distributed
from tests.numerics import float64_models, same_function_mismatch

TINY = dict(hidden_size=64, ffn_hidden_size=160, num_layers=2, num_attention_heads=4, rank=16, vocab_size=128,
            seq_length=32)


def _cfg(**model):
    from cola_megatron.config import config_from_dict

    return config_from_dict({"model": {**TINY, **model}, "train": {"precision": "fp32"}, "data": {"mock": True}})


def _model(cfg, seed=1):
    from cola_megatron.models.build import build_model
    from cola_megatron.models.init import initialize_parameters
    from cola_megatron.training.distributed import initialize_distributed

    initialize_distributed(seed=seed)
    model = build_model(cfg)
    initialize_parameters([model], seed, cfg.model.init_std)
    return model


def _projection_checks():
    """Each slot's output equals silu(x @ cola_a) @ cola_b built from its own reference-layout weights (float64)."""
    cfg = _cfg(cola_init_std=0.2)
    with float64_models():
        model = _model(cfg)
    layer = model.decoder.layers[0]
    slots = {
        "qkv": layer.self_attention.linear_qkv, "proj": layer.self_attention.linear_proj,
        "fc1": layer.mlp.linear_fc1, "fc2": layer.mlp.linear_fc2,
    }
    out = {}
    for name, slot in slots.items():
        x = torch.randn(5, 3, slot.input_size, dtype=torch.float64)  # [s, b, d_in]
        y, bias = slot(x)
        refs = [torch.nn.functional.silu(x @ a) @ b for a, b in slot.reference_layout()]
        shapes = [(tuple(a.shape), tuple(b.shape)) for a, b in slot.reference_layout()]
        if name == "qkv":  # megatron's per-head [q_h k_h v_h] layout
            heads = cfg.model.num_attention_heads
            expect = torch.stack([r.reshape(5, 3, heads, -1) for r in refs], dim=3).reshape(5, 3, -1)
        else:  # fc1: [gate ; up]
            expect = torch.cat(refs, dim=-1)
        out[name] = (same_function_mismatch(y, expect), bias, shapes,
                     [n for n, _ in slot.named_parameters()])
    # Grouped-query attention (4 heads in 2 groups): megatron's layout is, per group, its 2 query heads, then its
    # k head and its v head.
    with float64_models():
        gqa = _model(_cfg(cola_init_std=0.2, num_query_groups=2)).decoder.layers[0].self_attention.linear_qkv
    x = torch.randn(5, 3, gqa.input_size, dtype=torch.float64)
    y, bias = gqa(x)
    q, k, v = (torch.nn.functional.silu(x @ a) @ b for a, b in gqa.reference_layout())
    expect = torch.cat([q.reshape(5, 3, 2, -1), k.reshape(5, 3, 2, -1), v.reshape(5, 3, 2, -1)], dim=-1)
    out["qkv-gqa"] = (same_function_mismatch(y, expect.reshape(5, 3, -1)), bias,
                      [(tuple(a.shape), tuple(b.shape)) for a, b in gqa.reference_layout()],
                      [n for n, _ in gqa.named_parameters()])
    return out


@pytest.fixture(scope="module")
def projection_results():
    return run_distributed(_projection_checks, 1)[0]


@pytest.mark.numerics
@pytest.mark.parametrize("slot", ["qkv", "proj", "fc1", "fc2", "qkv-gqa"])
def test_projection_equals_hand_computation(projection_results, slot):
    mismatch, bias, _, _ = projection_results[slot]
    assert mismatch is None, mismatch
    assert bias is None


def test_reference_layout_shapes(projection_results):
    d, r, f = TINY["hidden_size"], TINY["rank"], TINY["ffn_hidden_size"]
    assert projection_results["qkv"][2] == [((d, r), (r, d))] * 3
    assert projection_results["proj"][2] == [((d, r), (r, d))]
    assert projection_results["fc1"][2] == [((d, r), (r, f))] * 2
    assert projection_results["fc2"][2] == [((f, r), (r, d))]
    kv = d // 2  # 2 of 4 heads
    assert projection_results["qkv-gqa"][2] == [((d, r), (r, d)), ((d, r), (r, kv)), ((d, r), (r, kv))]


def test_no_biases(projection_results):
    for slot, (_, _, _, names) in projection_results.items():
        # Under GQA, k's and v's B are stacked apart from q's (narrower); multi-head slots have one B tensor.
        assert names == (["a_weight", "b_weight", "b_kv_weight"] if slot == "qkv-gqa" else ["a_weight", "b_weight"])


def _init_std():
    from cola_megatron.models.layers.cola import cola_init_std

    cfg = _cfg(hidden_size=1024, ffn_hidden_size=2752, num_attention_heads=8, rank=256, num_layers=1)
    model = _model(cfg)
    mlp = model.decoder.layers[0].mlp
    expect = cola_init_std(256, 1024, 2752)
    checks = [(mlp.linear_fc1.a_weight.std().item(), expect), (mlp.linear_fc1.b_weight.std().item(), expect),
              (model.embedding.word_embeddings.weight.std().item(), 0.02),
              (model.decoder.layers[0].input_layernorm.weight.mean().item(), 1.0)]
    # Grouped-query attention (8 heads in 2 groups): each projection's init uses its own d_out, d for q, 256 for k, v.
    qkv = _model(_cfg(hidden_size=1024, ffn_hidden_size=2752, num_attention_heads=8, rank=256, num_layers=1,
                      num_query_groups=2)).decoder.layers[0].self_attention.linear_qkv
    q_std, kv_std = cola_init_std(256, 1024, 1024), cola_init_std(256, 1024, 256)
    checks += [(qkv.a_weight[0].std().item(), q_std), (qkv.b_weight.std().item(), q_std)]
    checks += [(qkv.a_weight[i].std().item(), kv_std) for i in (1, 2)] + [(qkv.b_kv_weight.std().item(), kv_std)]
    return checks


def test_init_std_follows_the_paper():
    for got, expect in run_distributed(_init_std, 1)[0]:
        assert got == pytest.approx(expect, rel=0.02)


def _overfit(only_lr_act: bool):
    cfg = _cfg(only_lr_act=only_lr_act)
    model = _model(cfg, seed=3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY["vocab_size"], (4, TINY["seq_length"] + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    pos = torch.arange(TINY["seq_length"]).expand(4, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads_ok = [], None
    for step in range(50):
        opt.zero_grad()
        loss = model(inputs, pos, None, labels=labels).mean()
        loss.backward()
        if step == 0:
            grads_ok = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, grads_ok


@pytest.mark.parametrize("only_lr_act", [True, False])
def test_cola_gpt_trains(only_lr_act):
    losses, grads_ok = run_distributed(_overfit, 1, only_lr_act)[0]
    assert all(math.isfinite(x) for x in losses)
    assert all(grads_ok.values()), [n for n, ok in grads_ok.items() if not ok]
    assert losses[-1] <= 0.5 * losses[0], losses


def _mlp_activation():
    out = {}
    for only in (True, False):
        cfg = _cfg(only_lr_act=only, cola_init_std=0.3)
        with float64_models():
            mlp = _model(cfg).decoder.layers[0].mlp
        x = torch.randn(3, 2, TINY["hidden_size"], dtype=torch.float64)
        (ga, gb), (ua, ub) = mlp.linear_fc1.reference_layout()
        ((da, db),) = mlp.linear_fc2.reference_layout()
        silu = torch.nn.functional.silu
        gate, up = silu(x @ ga) @ gb, silu(x @ ua) @ ub
        hidden = gate * up if only else silu(gate) * up
        expect = silu(hidden @ da) @ db
        y, _ = mlp(x)
        out[only] = same_function_mismatch(y, expect)
    return out


@pytest.mark.numerics
def test_only_lr_act_mlp_matches_paper():
    errors = run_distributed(_mlp_activation, 1)[0]
    assert errors == {True: None, False: None}, errors


def _attention_kernels():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from cola_megatron.models.layers.attention import SDPAttention
    from cola_megatron.models import build

    cfg = _cfg()
    _model(cfg)  # initialises the process groups
    with float64_models():
        tconfig = build.transformer_config(cfg)
    torch.manual_seed(0)
    s, b, h, d = 16, 2, TINY["num_attention_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    q, k, v = (torch.randn(s, b, h, d, dtype=torch.float64) for _ in range(3))
    sdpa = SDPAttention(tconfig, layer_number=1, attn_mask_type=AttnMaskType.causal)
    ref = DotProductAttention(tconfig, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return same_function_mismatch(sdpa(q, k, v, None), ref(q, k, v, None))


@pytest.mark.numerics
def test_sdpa_matches_megatron_dot_product_attention():
    mismatch = run_distributed(_attention_kernels, 1)[0]
    assert mismatch is None, mismatch


def _bf16_attention(seq_length):
    """SDPAttention's forward and backward in bf16 at a sequence length where torch's CPU flash kernel runs."""
    from megatron.core.transformer.enums import AttnMaskType

    from cola_megatron.models.build import transformer_config
    from cola_megatron.models.layers.attention import SDPAttention

    cfg = _cfg()
    _model(cfg)  # initialises the process groups
    torch.manual_seed(0)
    h, d = TINY["num_attention_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    q, k, v = (torch.randn(seq_length, 2, h, d) for _ in range(3))
    attention = SDPAttention(transformer_config(cfg), layer_number=1, attn_mask_type=AttnMaskType.causal)
    want = attention(q, k, v, None)
    q16, k16, v16 = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = attention(q16, k16, v16, None)
    out.float().sum().backward()
    return torch.backends.cpu.get_cpu_capability(), (out.float() - want).abs().max().item() / want.abs().max().item()


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_bf16_attention_runs_at_a_lowered_cpu_capability(monkeypatch, capability):
    """torch's bf16 CPU flash kernel fails below AVX-512 dispatch on AMX machines (compat/sdpa.py)."""
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    seen, error = run_distributed(_bf16_attention, 1, 64)[0]
    assert seen == capability.upper()
    assert error < 2 ** -7  # bf16 inputs and output: a few of its 8-bit mantissa's ulps of the fp32 result


def _real_counts():
    out = {}
    for name, model in {"cola": dict(arch="cola"), "dense": dict(arch="dense"),
                        "dense-gqa": dict(arch="dense", num_query_groups=2),
                        "cola-gqa": dict(arch="cola", num_query_groups=2),
                        "cola-padded": dict(arch="cola", ffn_multiple_of=64)}.items():
        cfg = _cfg(**model)
        out[name] = (sum(p.numel() for p in _model(cfg).parameters()), cfg.model)
    return out


def test_parameter_count_formula_matches_a_real_build():
    from cola_megatron.models.accounting import count_parameters

    for name, (real, model_cfg) in run_distributed(_real_counts, 1)[0].items():
        assert count_parameters(model_cfg).total == real, name


def test_training_flops_formula():
    from cola_megatron.models.accounting import count_parameters, training_flops_per_token

    cfg = _cfg(arch="dense")
    n = count_parameters(cfg.model)
    L, s, d = TINY["num_layers"], TINY["seq_length"], TINY["hidden_size"]
    assert training_flops_per_token(cfg.model) == 6 * (n.total - n.embedding) + 12 * L * s * d
    cola = _cfg()
    # CoLA's projections cost 6 FLOPs per weight too, so its FLOPs are below dense's by 6x the weights saved.
    saved = count_parameters(cfg.model).total - count_parameters(cola.model).total
    assert training_flops_per_token(cfg.model) - training_flops_per_token(cola.model) == 6 * saved
