"""What a layer stores for backward, and that storing less changed no number.

Stored: unique storages autograd saves (``saved_tensors_hooks``, parameters excluded) for one forward of a block of
layers, per token and layer, against the documented figures. The layers store, at TP1, 8d + 7r + 3f elements
per token and layer (CoLA; dense 8d + 3f): the layer input, both norm outputs, h, q and k after RoPE, v, the
attention output, gate, up and the GLU product, and each bottleneck's z. Documented constants on top: the fp32
rstd of both norms and SDPA's log-sum-exp per head (per token), the RoPE cos/sin tables (per layer), and on CPU
torch's composite rms_norm also saves each norm's normalised input (d per norm; the fused GPU kernel does not).
Before this change (the reference below) CoLA stored 10d + 14r + 4f (+f with SiLU in the GLU) and dense 10d + 5f.

Equal: loss and every gradient of one step equal those of the reference composition for CoLA
(only_lr_act true and false) and dense at TP1, TP2 (both CoLA schemes, SP on and off) and PP2 (1F1B). The reference
is the composition this change replaced, kept here only: megatron's SelfAttention and MLP (q|k|v and gate|up
interleaved into one tensor, megatron's unfused GLU) and B applied to a stored σ(z). Both run in float64 and are
compared within 1e-10 of each tensor's scale (tests/numerics.py), so the CPU's vector width cannot decide; the
memory count runs in fp32, the dtype it documents.

All cases run in one launch of two gloo processes (start-up dominates on a small CPU).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from tests.numerics import assert_same_function, float64_models, same_function_mismatch

pytestmark = pytest.mark.numerics

D, F_WIDTH, R, HEADS, S, B, LAYERS = 64, 160, 16, 4, 32, 2, 2
SHAPE = dict(hidden_size=D, ffn_hidden_size=F_WIDTH, num_attention_heads=HEADS, rank=R, vocab_size=128,
             seq_length=S, num_layers=LAYERS, cola_init_std=0.3)  # a large init std, so differences show
SEED = 11

# (arch, tensor_parallel, sequence_parallel, cola_tp_scheme, only_lr_act). Every combination: a case costs a
# fraction of a second inside the one launch. Dense ignores only_lr_act and cola_tp_scheme (models/build.py).
LAYOUTS = [("cola", 1, False, "bottleneck", lr) for lr in (False, True)] + [("dense", 1, False, "bottleneck", False)]
LAYOUTS += [("cola", 2, sp, scheme, lr) for scheme in ("bottleneck", "pair") for sp in (False, True)
            for lr in (False, True)]
LAYOUTS += [("dense", 2, sp, "bottleneck", False) for sp in (False, True)]
PIPELINE = [("cola", False), ("cola", True), ("dense", False)]
MEMORY = [("cola", "none", False), ("cola", "none", True), ("dense", "none", False), ("cola", "cola_m", True)]


@contextlib.contextmanager
def before_this_change():
    """Build and run layers as the project did before storing less (reference only)."""
    from megatron.core.tensor_parallel.mappings import reduce_scatter_last_dim_to_tensor_parallel_region
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.mlp import MLP

    from cola_megatron.models import spec
    from cola_megatron.models.layers import cola

    def decode_branches(self, z):
        activated = F.silu(z)
        r = self.b_weight.shape[2]

        def branches(a):
            return [F.linear(x, b) for x, b in zip(a.split(r, dim=-1), self.b_weight.unbind(0))]

        if self.scheme == "bottleneck":
            return branches(self._to_tensor_parallel_region(activated))
        out = branches(activated)
        if self.tp_size == 1:
            return out
        return [reduce_scatter_last_dim_to_tensor_parallel_region(b, group=self.tp_group) for b in out]

    def row_decode(self, z):
        return cola._reduce(F.linear(F.silu(z), self.b_weight[0]), self.output_reduction, self.tp_group)

    saved = spec.SELF_ATTENTION, spec.MLP_MODULE, cola._CoLAColumn.decode_branches, cola._CoLARow.decode
    spec.SELF_ATTENTION, spec.MLP_MODULE = SelfAttention, MLP
    cola._CoLAColumn.decode_branches, cola._CoLARow.decode = decode_branches, row_decode
    try:
        yield
    finally:
        spec.SELF_ATTENTION, spec.MLP_MODULE, cola._CoLAColumn.decode_branches, cola._CoLARow.decode = saved


def _config(arch="cola", tp=1, sp=False, scheme="bottleneck", only_lr_act=False, pp=1, recompute="none",
            num_layers=LAYERS):
    from cola_megatron.config import config_from_dict

    return config_from_dict({
        "model": dict(SHAPE, arch=arch, num_layers=num_layers, recompute=recompute, only_lr_act=only_lr_act),
        "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp, "sequence_parallel": sp,
                     "cola_tp_scheme": scheme},
        "train": {"precision": "fp32"},
        "data": {"mock": True},
    })


def _tokens(count=1):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, SHAPE["vocab_size"], (B, S), generator=generator) for _ in range(count)]


def _positions():
    return torch.arange(S).expand(B, -1)


def _build(cfg, **kwargs):
    from cola_megatron.models.build import build_model
    from cola_megatron.models.init import initialize_parameters

    model = build_model(cfg, **kwargs)
    initialize_parameters([model], SEED, cfg.model.init_std)
    return model


def _mismatches(reference: dict, other: dict) -> list:
    mismatches = ((name, same_function_mismatch(other[name], grad)) for name, grad in reference.items())
    return [f"{name}: {mismatch}" for name, mismatch in mismatches if mismatch]


def _one_step(cfg):
    (tokens,) = _tokens()
    model = _build(cfg)
    loss = model(tokens, _positions(), None, labels=tokens).mean()
    loss.backward()
    return loss.item(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _layout_case(arch, tp, sp, scheme, only_lr_act):
    from cola_megatron.training.distributed import initialize_distributed

    initialize_distributed(tensor_parallel=tp, seed=SEED)
    cfg = _config(arch, tp, sp, scheme, only_lr_act)
    with before_this_change():
        ref_loss, ref_grads = _one_step(cfg)
    loss, grads = _one_step(cfg)
    return {"losses": (ref_loss, loss), "mismatches": _mismatches(ref_grads, grads), "parameters": len(grads)}


def _pipeline_case(arch, only_lr_act):
    """PP=2, 4 layers, megatron's 1F1B schedule over 4 micro-batches."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from cola_megatron.training.distributed import initialize_distributed

    initialize_distributed(pipeline_parallel=2, seed=SEED)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        output = model(tokens, _positions(), None, labels=tokens)

        def loss_func(output_tensor):
            loss = output_tensor.mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    def run():
        cfg = _config(arch, only_lr_act=only_lr_act, pp=2, num_layers=4)
        model = _build(cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                       post_process=parallel_state.is_pipeline_last_stage())
        result = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(_tokens(4)), model=[model], num_microbatches=4,
            seq_length=S, micro_batch_size=B, forward_only=False)
        return ([item["loss"].item() for item in result],
                {name: p.grad.detach().clone() for name, p in model.named_parameters()})

    with before_this_change():
        ref_losses, ref_grads = run()
    losses, grads = run()
    return {"losses": (ref_losses, losses), "mismatches": _mismatches(ref_grads, grads), "parameters": len(grads)}


def stored_elements(cfg) -> int:
    """Elements of the unique storages a TransformerBlock of ``cfg``'s layers saves for backward (TP1)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock

    from cola_megatron.models.build import transformer_config
    from cola_megatron.models.spec import block_spec

    tconfig = transformer_config(cfg)
    block = TransformerBlock(tconfig, block_spec(tconfig, cfg.model.arch), post_layer_norm=False)
    parameters = {p.untyped_storage().data_ptr() for p in block.parameters()}
    rotary = RotaryEmbedding(kv_channels=tconfig.kv_channels, rotary_percent=1.0)(S)
    x = torch.randn(S, B, D, requires_grad=True)
    stored = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            stored[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x, attention_mask=None, rotary_pos_emb=rotary)
    out.sum().backward()  # the stored tensors suffice for backward
    return sum(stored.values())


def _memory_case():
    from cola_megatron.training.distributed import initialize_distributed

    initialize_distributed(seed=SEED)
    counts = {}
    for arch, recompute, only_lr_act in MEMORY:
        cfg = _config(arch, only_lr_act=only_lr_act, recompute=recompute)
        with before_this_change():
            before = stored_elements(cfg)
        counts[(arch, recompute, only_lr_act)] = (before, stored_elements(cfg))
    return counts


def _guarded(case, *args):
    import traceback

    try:
        return case(*args)
    except Exception:
        return {"error": traceback.format_exc()}


def _all_cases():
    with float64_models():
        equal = {"layouts": {layout: _guarded(_layout_case, *layout) for layout in LAYOUTS},
                 "pipeline": {case: _guarded(_pipeline_case, *case) for case in PIPELINE}}
    return {**equal, "memory": _guarded(_memory_case)}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_cases, 2)


def _case(result: dict, rank: int) -> dict:
    assert "error" not in result, f"rank {rank}:\n{result['error']}"
    return result


@pytest.mark.parametrize("layout", LAYOUTS,
                         ids=lambda l: f"{l[0]}-tp{l[1]}-sp{int(l[2])}-{l[3]}-only_lr_act{int(l[4])}")
def test_loss_and_gradients_equal_to_before(results, layout):
    for rank, result in enumerate(results):
        case = _case(result["layouts"][layout], rank)
        assert case["parameters"] > 0
        assert not case["mismatches"], f"rank {rank}: {case['mismatches']}"
        assert_same_function(torch.tensor(case["losses"][1]), torch.tensor(case["losses"][0]), name="loss")


@pytest.mark.parametrize("case", PIPELINE, ids=lambda c: f"{c[0]}-only_lr_act{int(c[1])}")
def test_pipeline_parallel_loss_and_gradients_equal_to_before(results, case):
    for rank, result in enumerate(results):
        got = _case(result["pipeline"][case], rank)
        assert got["parameters"] > 0
        assert not got["mismatches"], f"rank {rank}: {got['mismatches']}"
        assert_same_function(torch.tensor(got["losses"][1]), torch.tensor(got["losses"][0]), name="losses")
    assert results[1]["pipeline"][case]["losses"][1], "the last stage reports the micro-batch losses"


def per_token_figures(arch: str, silu_glu: bool):
    """(before, after) documented elements per token and layer at TP1, and the documented extras."""
    if arch == "dense":
        before, after = 10 * D + 5 * F_WIDTH, 8 * D + 3 * F_WIDTH
    else:
        before, after = 10 * D + 14 * R + (5 if silu_glu else 4) * F_WIDTH, 8 * D + 7 * R + 3 * F_WIDTH
    cpu_norms, statistics = 2 * D, 2 + HEADS  # normalised inputs (CPU only); rstd of both norms, SDPA log-sum-exp
    return before, after, cpu_norms + statistics


@pytest.mark.parametrize("arch,only_lr_act", [("cola", False), ("cola", True), ("dense", False)])
def test_stored_per_token_and_layer(results, arch, only_lr_act):
    before, after = _case(results[0]["memory"], 0)[(arch, "none", only_lr_act)]
    tokens = S * B
    rope_tables = 4 * S * (D // HEADS)  # cos and sin for q and k, each layer
    doc_before, doc_after, extras = per_token_figures(arch, not only_lr_act)
    print(f"\n{arch} none (only_lr_act={only_lr_act}) stored per token and layer: {after / (LAYERS * tokens):.1f} "
          f"elements, before {before / (LAYERS * tokens):.1f}: {after / before:.3f}x; documented (GPU kernels) "
          f"{doc_after} vs {doc_before}: {doc_after / doc_before:.3f}x; measured = documented + {2 * D} (CPU "
          f"rms_norm's normalised inputs) + {2 + HEADS} (fp32 statistics) + {rope_tables / tokens:.0f} (RoPE "
          f"tables, per token at b={B})")
    assert before == LAYERS * (tokens * (doc_before + extras) + rope_tables), "today's figure"
    assert after == LAYERS * (tokens * (doc_after + extras) + rope_tables)


def test_cola_m_stores_2d_plus_7r(results):
    before, after = _case(results[0]["memory"], 0)[("cola", "cola_m", True)]
    rotary = S * (D // HEADS)  # the rotary frequencies, kept once for all layers
    print(f"\ncola_m stored per token and layer: {after / (LAYERS * S * B):.1f} elements, before "
          f"{before / (LAYERS * S * B):.1f}: {after / before:.3f}x")
    assert after == before == LAYERS * S * B * (2 * D + 7 * R) + rotary


@pytest.mark.parametrize("arch,only_lr_act", [("cola", False), ("cola", True), ("dense", False)])
def test_plan_activation_model_equals_the_count(results, arch, only_lr_act):
    """cola-plan's per-layer activation model is the counted storage, exactly (CPU kernels, fp32)."""
    from cola_megatron.analysis import plan

    _, after = _case(results[0]["memory"], 0)[(arch, "none", only_lr_act)]
    per_layer = plan.layer_activations(_config(arch, only_lr_act=only_lr_act), 1, False, device="cpu")
    assert per_layer.kept("none", S * B) * LAYERS == after * 4  # fp32 bytes
