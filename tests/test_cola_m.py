"""CoLA-M (model.recompute=cola_m): the same gradients as no recomputation at every layout (one step in float64,
so that rounding cannot decide), the same checkpoint keys, and at most 2·d + 7·r stored elements per token and layer.

The multi-process cases run inside one launch of two gloo processes (start-up dominates on a small CPU), the
torch.compile case in a second one; each test checks its part of the results.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed
from tests.numerics import assert_same_trajectory, float64_models, same_function_mismatch

SHAPE = dict(hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, rank=16, vocab_size=128, seq_length=32,
             cola_init_std=0.3)  # a large init std, so that layout bugs show in the gradients
MICRO_BATCH = 2
SEED = 7

# (tensor_parallel, sequence_parallel, cola_tp_scheme, only_lr_act, num_query_groups)
LAYOUTS = [
    (1, False, "bottleneck", False, None),
    (1, False, "bottleneck", True, None),
    (2, False, "bottleneck", False, None),
    (2, True, "bottleneck", False, None),
    (2, False, "pair", False, None),
    (2, True, "pair", False, None),
    # grouped-query attention (4 heads in 2 groups): the k/v branches are narrower, z still 3r wide
    (1, False, "bottleneck", False, 2),
    (2, True, "bottleneck", False, 2),
    (2, True, "pair", False, 2),
]


def _config(recompute: str, tp: int = 1, sp: bool = False, scheme: str = "bottleneck", only_lr_act: bool = False,
            pp: int = 1, num_layers: int = 2, **model):
    from cola_megatron.config import config_from_dict

    return config_from_dict({
        "model": dict(SHAPE, num_layers=num_layers, recompute=recompute, only_lr_act=only_lr_act, **model),
        "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp, "sequence_parallel": sp,
                     "cola_tp_scheme": scheme},
        "train": {"precision": "fp32"},
        "data": {"mock": True},
    })


def _tokens(count: int = 1):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, SHAPE["vocab_size"], (MICRO_BATCH, SHAPE["seq_length"]), generator=generator)
            for _ in range(count)]


def _positions():
    return torch.arange(SHAPE["seq_length"]).expand(MICRO_BATCH, -1)


def _build(cfg, **kwargs):
    from cola_megatron.models.build import build_model
    from cola_megatron.models.init import initialize_parameters

    model = build_model(cfg, **kwargs)
    initialize_parameters([model], SEED, cfg.model.init_std)
    return model


def _gradients(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _mismatches(reference: dict, other: dict) -> list:
    """Names whose gradients differ beyond float64 rounding (the cases below run in float64)."""
    mismatches = ((name, same_function_mismatch(other[name], grad)) for name, grad in reference.items())
    return [f"{name}: {mismatch}" for name, mismatch in mismatches if mismatch]


def _layout_case(tp, sp, scheme, only_lr_act, groups):
    """One forward/backward with and without CoLA-M at one TP layout: gradients, loss and eval output."""
    from cola_megatron.training.distributed import initialize_distributed

    initialize_distributed(tensor_parallel=tp, seed=SEED)
    (tokens,) = _tokens()
    grads, losses, eval_logits = {}, {}, {}
    for recompute in ("none", "cola_m"):
        model = _build(_config(recompute, tp, sp, scheme, only_lr_act, num_query_groups=groups))
        loss = model(tokens, _positions(), None, labels=tokens).mean()
        loss.backward()
        grads[recompute], losses[recompute] = _gradients(model), loss.item()
        with torch.no_grad():  # evaluation runs megatron's own forward
            eval_logits[recompute] = model(tokens, _positions(), None)
    return {
        "mismatches": _mismatches(grads["none"], grads["cola_m"]),
        "losses": losses,
        "eval_equal": torch.equal(eval_logits["none"], eval_logits["cola_m"]),
        "state_dict_keys_equal": _state_dict_keys(tp, sp, scheme, groups),
    }


def _state_dict_keys(tp, sp, scheme, groups=None) -> bool:
    """Checkpoints are interchangeable between recompute modes: same state_dict and sharded_state_dict keys."""
    keys = []
    for recompute in ("none", "cola_m"):
        model = _build(_config(recompute, tp, sp, scheme, num_query_groups=groups))
        keys.append((sorted(model.state_dict()), sorted(model.sharded_state_dict())))
    return keys[0] == keys[1]


def _pipeline_case():
    """PP=2, 4 layers, megatron's 1F1B schedule over 4 micro-batches, with and without CoLA-M."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from cola_megatron.training.distributed import initialize_distributed

    initialize_distributed(pipeline_parallel=2, seed=SEED)
    micro_batches = _tokens(4)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        output = model(tokens, _positions(), None, labels=tokens)

        def loss_func(output_tensor):
            loss = output_tensor.mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    grads, losses = {}, {}
    for recompute in ("none", "cola_m"):
        cfg = _config(recompute, pp=2, num_layers=4)
        model = _build(cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                       post_process=parallel_state.is_pipeline_last_stage())
        model.config.deallocate_pipeline_outputs = True  # megatron frees stage outputs; CoLA-M must not need them
        result = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=SHAPE["seq_length"],
            micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        grads[recompute] = _gradients(model)
        losses[recompute] = [item["loss"].item() for item in result]
    return {"mismatches": _mismatches(grads["none"], grads["cola_m"]), "losses": losses,
            "parameters": len(grads["none"])}


def _stored_elements(recompute: str, num_layers: int = 2, groups=None):
    """Elements saved for backward by a TransformerBlock of CoLA layers (unique storages, parameters excluded)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock

    from cola_megatron.models.build import transformer_config
    from cola_megatron.models.spec import block_spec

    cfg = _config(recompute, num_layers=num_layers, num_query_groups=groups)
    tconfig = transformer_config(cfg)
    block = TransformerBlock(tconfig, block_spec(tconfig), post_layer_norm=False)
    parameters = {p.untyped_storage().data_ptr() for p in block.parameters()}
    rotary = RotaryEmbedding(kv_channels=tconfig.kv_channels, rotary_percent=1.0)(SHAPE["seq_length"])
    x = torch.randn(SHAPE["seq_length"], MICRO_BATCH, SHAPE["hidden_size"], requires_grad=True)
    stored = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            stored[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, attention_mask=None, rotary_pos_emb=rotary)
    out.sum().backward()  # the stored tensors suffice for backward
    return sum(stored.values()), rotary.numel()


def _memory_case():
    from cola_megatron.training.distributed import initialize_distributed

    initialize_distributed(seed=SEED)
    counts = {recompute: _stored_elements(recompute) for recompute in ("none", "cola_m", "full")}
    counts |= {f"{recompute}_gqa": _stored_elements(recompute, groups=2) for recompute in ("none", "cola_m")}
    return {recompute: elements for recompute, (elements, _) in counts.items()} | {"rotary": counts["none"][1]}


def _dropout_refused():
    from cola_megatron.training.distributed import initialize_distributed

    initialize_distributed(seed=SEED)
    try:
        _build(_config("cola_m", hidden_dropout=0.1))
    except ValueError as error:
        return str(error)
    return None


TRAINING_LAYOUTS = {
    "DP2-distributed-optimizer-overlap": dict(use_distributed_optimizer=True, overlap_grad_reduce=True),
    "PP2-VP2": dict(pipeline_parallel=2, virtual_pipeline=2),
}


def _training_case():
    """A few steps of cola-train (megatron DDP, optimizer, schedules) give the same losses with and without CoLA-M."""
    import torch.distributed as dist

    from cola_megatron.config import config_from_dict
    from cola_megatron.training.run import run

    histories = {}
    for name, parallel in TRAINING_LAYOUTS.items():
        for recompute in ("none", "cola_m"):
            cfg = config_from_dict({
                "model": dict(SHAPE, num_layers=4, recompute=recompute),
                "parallel": parallel,
                "train": dict(micro_batch_size=2, global_batch_size=8, train_iters=3, precision="fp32", eval_iters=0,
                              seed=SEED),
                "optimizer": dict(lr=3e-3, warmup_iters=1),
                "data": dict(mock=True),
                "logging": dict(log_interval=100),
            })
            histories[(name, recompute)] = run(cfg, log=False).history
            dist.barrier()
    return histories


def _compile_case():
    """A few steps of cola-train with CoLA-M, eager and with train.torch_compile=true (DP2), and what dynamo did."""
    import torch.distributed as dist
    from torch._dynamo.utils import counters, get_compilation_metrics

    from cola_megatron.config import config_from_dict
    from cola_megatron.training.run import run

    histories = {}
    for compiled in (False, True):
        cfg = config_from_dict({
            "model": dict(SHAPE, num_layers=2, recompute="cola_m"),
            "train": dict(micro_batch_size=2, global_batch_size=4, train_iters=3, precision="fp32", eval_iters=0,
                          seed=SEED, torch_compile=compiled),
            "optimizer": dict(lr=3e-3, warmup_iters=1),
            "data": dict(mock=True),
            "logging": dict(log_interval=100),
        })
        histories[compiled] = run(cfg, log=False).history
        dist.barrier()
    return {
        "histories": histories,
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": list(counters["graph_break"]),
        "resumed_frames": list(counters["resumes"]),
        "frames": [(m.co_name, m.co_filename, m.co_firstlineno, m.graph_op_count, m.fail_type)
                   for m in get_compilation_metrics()],
    }


def _guarded(case, *args):
    """Run one case; a failure becomes that case's result, so the other cases still report."""
    import traceback

    try:
        return case(*args)
    except Exception:
        return {"error": traceback.format_exc()}


def _in_float64(**cases):
    with float64_models():
        return {name: case() for name, case in cases.items()}


def _all_cases():
    return {
        # CoLA-M's backward recomputes and orders its sums differently: compared in float64 (tests/numerics.py).
        **_in_float64(layouts=lambda: {layout: _guarded(_layout_case, *layout) for layout in LAYOUTS},
                      pipeline=lambda: _guarded(_pipeline_case)),
        "memory": _guarded(_memory_case),
        "training": _guarded(_training_case),
        "dropout": _dropout_refused(),
    }


def _case(result: dict, rank: int) -> dict:
    assert "error" not in result, f"rank {rank}:\n{result['error']}"
    return result


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_cases, 2)


@pytest.fixture(scope="module")
def compiled():
    """Its own launch: inductor's compile is the slowest case, and the numerics pass does not need it."""
    return run_distributed(_guarded, 2, _compile_case)


def layout_id(layout) -> str:
    tp, sp, scheme, only, groups = layout
    return f"tp{tp}-sp{int(sp)}-{scheme}-only_lr_act{int(only)}" + (f"-groups{groups}" if groups else "")


@pytest.mark.numerics
@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_gradients_equal_to_no_recompute(results, layout):
    for rank, result in enumerate(results):
        case = _case(result["layouts"][layout], rank)
        assert not case["mismatches"], f"rank {rank}: {case['mismatches']}"
        assert case["losses"]["none"] == case["losses"]["cola_m"]
        assert case["eval_equal"], f"rank {rank}: evaluation output differs"


@pytest.mark.numerics
def test_gradients_equal_with_pipeline_parallel_1f1b(results):
    for rank, result in enumerate(results):
        case = _case(result["pipeline"], rank)
        assert case["parameters"] > 0
        assert not case["mismatches"], f"rank {rank}: {case['mismatches']}"
        assert case["losses"]["none"] == case["losses"]["cola_m"]
    assert results[1]["pipeline"]["losses"]["none"], "the last stage reports the micro-batch losses"


@pytest.mark.parametrize("layout", [l for l in LAYOUTS if not l[3]], ids=layout_id)
def test_checkpoint_keys_identical_across_recompute_modes(results, layout):
    assert all(_case(result["layouts"][layout], rank)["state_dict_keys_equal"] for rank, result in enumerate(results))


def test_stored_activations_at_most_2d_plus_7r_per_token(results):
    memory = _case(results[0]["memory"], 0)
    layers, tokens = 2, SHAPE["seq_length"] * MICRO_BATCH
    d, r = SHAPE["hidden_size"], SHAPE["rank"]
    per_token_layer = {mode: memory[mode] / (layers * tokens) for mode in ("none", "cola_m", "full")}
    print(f"\nstored elements per token and layer (d={d}, r={r}, CPU kernels): "
          + ", ".join(f"{mode} {value:.0f}" for mode, value in per_token_layer.items())
          + f"; cola_m / none = {memory['cola_m'] / memory['none']:.3f}, cola_m / full = "
          f"{memory['cola_m'] / memory['full']:.2f}")
    # The documented constant: the rotary table (seq × head_dim), saved once and shared by all layers.
    assert memory["cola_m"] <= layers * tokens * (2 * d + 7 * r) + memory["rotary"]
    assert memory["cola_m"] < memory["none"]
    # Grouped-query attention (2 groups of 2 heads): CoLA-M keeps the same 2d + 7r (the z's are r wide whatever
    # the k/v width); without recomputation k and v after the projection are half as wide: 2 · (d - d/2) fewer.
    assert memory["cola_m_gqa"] == memory["cola_m"]
    assert memory["none"] - memory["none_gqa"] == layers * tokens * 2 * (d - d // 2)


@pytest.mark.numerics
@pytest.mark.parametrize("layout", TRAINING_LAYOUTS)
def test_training_losses_equal_to_no_recompute(results, layout):
    histories = _case(results[0]["training"], 0)
    assert len(histories[(layout, "none")]) == 3
    # Bit-identical, not merely close: CoLA-M's backward replays the very forward kernels on the stored z's and
    # back-propagates through them with autograd, in the order the unrecomputed graph would (equal on AVX-512, AVX2
    # and baseline kernels); a gradient perturbed by 1e-3 of its scale moves these losses by only ~1e-6.
    assert histories[(layout, "cola_m")] == histories[(layout, "none")]


def test_torch_compile_trains_as_eager_and_compiles_the_layer(compiled):
    """train.torch_compile=true with CoLA-M: eager's losses, and dynamo really compiled the layer's math.

    Dynamo cannot trace the backward's torch.autograd.grad, so it does not capture _CoLAMLayer as one
    autograd.Function: the layer's forward breaks its graph at ``_CoLAMLayer.apply`` (the one break, asserted), and
    the Function's forward, run by eager autograd with grad disabled, is compiled as a frame of its own, whole (no
    resume point inside it). The backward, which rebuilds the branches from the stored z's, runs eagerly.
    """
    from cola_megatron.models.layers.cola_m import _CoLAMLayer

    code = _CoLAMLayer.forward.__code__
    lines = {line for _, _, line in code.co_lines() if line is not None} | {code.co_firstlineno}
    for rank, case in enumerate(compiled):
        case = _case(case, rank)
        eager, compiled = case["histories"][False], case["histories"][True]
        assert len(eager) == 3
        assert_same_trajectory(compiled, eager)
        assert case["unique_graphs"] > 0, "dynamo captured no graph: the layers ran eagerly"
        layer_math = [f for f in case["frames"] if (f[0], f[1], f[2]) == (code.co_name, code.co_filename,
                                                                          code.co_firstlineno)]
        assert layer_math and all(ops > 0 and fail is None for *_, ops, fail in layer_math), case["frames"]
        resumed_inside = [name for name in case["resumed_frames"]
                          if name.startswith("torch_dynamo_resume_in_forward_at_")
                          and int(name.rsplit("_", 1)[1]) in lines]
        assert not resumed_inside, f"graph breaks inside the CoLA-M forward: {resumed_inside}"
        assert case["graph_breaks"] and all("torch.autograd.grad" in reason for reason in case["graph_breaks"]), \
            case["graph_breaks"]


def test_dropout_is_refused_with_the_fix(results):
    message = results[0]["dropout"]
    assert message is not None and "hidden_dropout=0" in message


def test_cola_m_needs_cola_projections():
    from cola_megatron.models.spec import layer_spec

    with pytest.raises(ValueError, match="needs model.arch=cola"):
        layer_spec("dense", recompute="cola_m")
