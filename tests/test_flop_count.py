"""An independent check of the FLOP accounting: torch's FlopCounterMode over one training step (forward + backward of
the GPT model, loss included) of CoLA, dense, CoLA-M and full recompute on CPU.

How it is counted: GEMMs as FlopCounterMode counts ``aten.mm`` (2 FLOPs per multiply-add). The attention core runs
torch's CPU flash kernel, for which FlopCounterMode has no formula; this test maps it to torch's own SDPA formulas
(``sdpa_flop_count`` forward: QKᵀ and PV, causal masking not discounted; ``sdpa_backward_flop_count``: four
gradient GEMMs plus the flash backward's recomputation of the scores). Model FLOPs count the attention core as
3 × its forward (the convention of ``training_flops_per_token``: 12·L·s·d per token), so the scores' recomputation
inside flash's backward is kernel work, not model FLOPs; both are printed.

Checked: the counted model FLOPs of ``none`` equal ``training_flops_per_token`` × tokens within 2 % (the formula's
6·N also counts the norm weights, which cost no GEMM: that is the whole difference, asserted exactly), and the
extra FLOPs of CoLA-M and full recompute equal ``recompute_flops_per_token`` × tokens exactly: CoLA-M re-runs the
B GEMMs of q|k|v and gate|up (43 % of the layers' forward GEMMs at these shapes, 44 % at the 1B shapes) and the
attention core, full recompute every forward GEMM (100 %) and the attention core. A short training run with each
recompute mode reports HFU / MFU equal to (model + counted extra FLOPs) / model FLOPs, so the metric line's
hardware figure is the one counted here.
"""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed

SHAPE = dict(hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, rank=16, vocab_size=128, seq_length=32,
             num_layers=2)
BATCH = 2
CASES = [("cola", "none"), ("cola", "cola_m"), ("cola", "full"), ("dense", "none"), ("dense", "full"),
         ("cola-gqa", "none"), ("cola-gqa", "cola_m")]


def _config(arch, recompute):
    """``arch`` 'cola', 'dense' or 'cola-gqa' (CoLA with grouped-query attention: 4 heads in 2 k/v groups)."""
    from cola_megatron.config import config_from_dict

    groups = 2 if arch == "cola-gqa" else None
    arch = "cola" if arch == "cola-gqa" else arch
    return config_from_dict({
        "model": dict(SHAPE, arch=arch, recompute=recompute, only_lr_act=arch == "cola", num_query_groups=groups),
        "train": {"precision": "fp32"},
        "data": {"mock": True},
    })


def _count_steps():
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from cola_megatron.models.build import build_model
    from cola_megatron.models.init import initialize_parameters
    from cola_megatron.training.distributed import initialize_distributed

    aten = torch.ops.aten
    forward_op = aten._scaled_dot_product_flash_attention_for_cpu
    backward_op = aten._scaled_dot_product_flash_attention_for_cpu_backward
    formulas = {
        forward_op: lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
        backward_op: lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v),
    }
    initialize_distributed(seed=3)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["seq_length"]), generator=generator)
    positions = torch.arange(SHAPE["seq_length"]).expand(BATCH, -1)
    counts = {}
    for arch, recompute in CASES:
        cfg = _config(arch, recompute)
        model = build_model(cfg)
        initialize_parameters([model], 3, cfg.model.init_std)
        with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
            model(tokens, positions, None, labels=tokens).mean().backward()
        flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        counts[(arch, recompute)] = flops
    return counts


HFU_CASES = [("cola", "cola_m"), ("cola", "full")]


def _train_records(log_dir):
    """The train records of one logged step per recompute mode, with a peak given so MFU and HFU are computed."""
    import json
    import os

    from cola_megatron.config import config_from_dict
    from cola_megatron.training.run import run

    records = {}
    for arch, recompute in HFU_CASES:
        directory = os.path.join(log_dir, f"{arch}-{recompute}")
        cfg = config_from_dict({
            "model": dict(SHAPE, arch=arch, recompute=recompute, only_lr_act=arch == "cola"),
            "train": dict(micro_batch_size=BATCH, global_batch_size=BATCH, train_iters=1, precision="fp32",
                          eval_iters=0),
            "data": {"mock": True},
            "checkpoint": {"save_dir": None},
            "logging": dict(log_interval=1, log_dir=directory, tensorboard=False, peak_tflops=1.0),
        })
        run(cfg)
        with open(os.path.join(directory, "metrics.jsonl")) as f:
            records[(arch, recompute)] = [r for r in map(json.loads, f) if r["kind"] == "train"]
    return records


def _count_and_train(log_dir):
    return {"counts": _count_steps(), "records": _train_records(log_dir)}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return run_distributed(_count_and_train, 1, str(tmp_path_factory.mktemp("flop_runs")))[0]


@pytest.fixture(scope="module")
def counts(measured):
    return measured["counts"]


def _parts(flops: dict):
    gemm = sum(n for op, n in flops.items() if op in ("aten.mm", "aten.bmm", "aten.addmm"))
    forward = flops.get("aten._scaled_dot_product_flash_attention_for_cpu", 0)
    backward = flops.get("aten._scaled_dot_product_flash_attention_for_cpu_backward", 0)
    assert set(flops) <= {"aten.mm", "aten.bmm", "aten.addmm", "aten._scaled_dot_product_flash_attention_for_cpu",
                          "aten._scaled_dot_product_flash_attention_for_cpu_backward"}, flops
    return gemm, forward, backward


@pytest.mark.parametrize("arch", ["cola", "dense", "cola-gqa"])
def test_counted_model_flops_equal_the_formula(counts, arch):
    from cola_megatron.models.accounting import count_parameters, training_flops_per_token

    m = _config(arch, "none").model
    tokens = BATCH * SHAPE["seq_length"]
    gemm, attention_forward, attention_backward = _parts(counts[(arch, "none")])
    assert attention_forward > 0 and attention_backward > 0
    counted = gemm + 3 * attention_forward
    documented = training_flops_per_token(m) * tokens
    print(f"\n{arch}: counted model FLOPs {counted:.4g} (GEMMs {gemm:.4g}, attention 3 x {attention_forward:.4g}; "
          f"torch's flash backward formula {attention_backward:.4g} = {attention_backward / attention_forward:.2f} x "
          f"forward) vs documented {documented:.4g}: {counted / documented:.4f}")
    assert counted == pytest.approx(documented, rel=0.02)
    n = count_parameters(m)
    norms = n.final_norm + m.num_layers * 2 * m.hidden_size
    assert documented - counted == 6 * norms * tokens  # the norm weights: in 6·N, no GEMM


@pytest.mark.parametrize("arch,recompute", [("cola", "cola_m"), ("cola", "full"), ("dense", "full"),
                                            ("cola-gqa", "cola_m")])
def test_recompute_extra_equals_the_documented_cost(counts, arch, recompute):
    from cola_megatron.models.accounting import (
        hardware_flops_per_token,
        kv_width,
        layer_parameters,
        recompute_flops_per_token,
        training_flops_per_token,
    )

    m = _config(arch, recompute).model
    tokens = BATCH * SHAPE["seq_length"]
    gemm, forward, backward = _parts(counts[(arch, recompute)])
    gemm0, forward0, backward0 = _parts(counts[(arch, "none")])
    assert backward == backward0  # recomputation re-runs forwards only
    extra = (gemm - gemm0) + (forward - forward0)
    documented = recompute_flops_per_token(m) * tokens
    layer_forward_gemms = gemm0 / 3 - 2 * m.vocab_size * m.hidden_size * tokens  # without the output layer
    share = (gemm - gemm0) / layer_forward_gemms
    print(f"\n{arch} {recompute}: extra FLOPs {extra:.4g} (GEMMs +{share:.1%} of the layers' forward GEMMs, "
          f"attention core +{forward - forward0:.4g}), documented {documented:.4g}; "
          f"HFU/MFU = {hardware_flops_per_token(m) / training_flops_per_token(m):.3f}")
    assert extra == documented
    d, f, r, s = m.hidden_size, m.padded_ffn_hidden_size, m.rank, m.seq_length
    assert forward - forward0 == m.num_layers * 4 * s * d * tokens  # the attention core, once more
    # CoLA-M: the B GEMMs of q|k|v (k and v kv wide: d under MHA, d/2 in the GQA case) and gate|up out of all the
    # layer's GEMM weights; full: all of them.
    weights = layer_parameters(m).total - layer_parameters(m).norms
    kv = kv_width(m)
    assert kv == (d // 2 if arch == "cola-gqa" else d)
    assert share == pytest.approx(r * (d + 2 * kv + 2 * f) / weights if recompute == "cola_m" else 1.0, rel=1e-12)


@pytest.mark.parametrize("arch,recompute", HFU_CASES)
def test_metric_line_hfu_counts_the_recomputation(measured, arch, recompute):
    """HFU / MFU of the trainer's train records is (model FLOPs + the counted recompute extra) / model FLOPs."""
    from cola_megatron.models.accounting import training_flops_per_token

    m = _config(arch, recompute).model
    tokens = BATCH * SHAPE["seq_length"]
    gemm, forward, _ = _parts(measured["counts"][(arch, recompute)])
    gemm0, forward0, _ = _parts(measured["counts"][(arch, "none")])
    model = training_flops_per_token(m) * tokens
    expected = (model + (gemm - gemm0) + (forward - forward0)) / model
    (record,) = measured["records"][(arch, recompute)]
    print(f"\n{arch} {recompute}: MFU {record['mfu']:.4g} %, HFU {record['hfu']:.4g} %: HFU/MFU "
          f"{record['hfu'] / record['mfu']:.4f}, counted {expected:.4f}")
    assert expected > 1.1  # recomputation that would show if model FLOPs stood in for hardware FLOPs
    assert record["hfu"] / record["mfu"] == pytest.approx(expected, rel=1e-9)
