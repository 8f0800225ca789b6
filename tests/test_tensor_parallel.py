"""Tensor parallelism of the CoLA model: TP=2/4 against TP=1, layout-independent init, communication volumes,
checkpoint resharding.

Start-up of gloo process groups dominates on a small CPU, so there are two launches (a TP=2 group and a TP=4 group)
and each runs every case of its size; the TP=1 reference is computed inside the same launch (megatron's parallel
state re-initialised at TP=1, the ranks then being data-parallel replicas). The tests below read their part of the
launch's results.

Gradients of TP-replicated weights that only see this rank's tokens under sequence parallelism (norm weights,
bottleneck A of qkv/fc1, B of proj/fc2) are partial per rank: the model is wrapped in megatron's
DistributedDataParallel and ``finalize_model_grads`` sums them over TP, as in training, so the test also checks that
those weights carry the ``sequence_parallel`` attribute megatron looks for.

Tolerance: fp32, elementwise rtol 1e-5 plus an absolute slack of 1e-5 × the tensor's largest magnitude (entries near
zero otherwise fail on summation order alone). The CoLA init std is 0.3 so that a wrong q/k/v or gate/up layout
moves the logits far beyond that; the negative controls show it.
"""

from __future__ import annotations

import os

import pytest
import torch

from cola_megatron.analysis.comm_report import (
    ARCHS,
    BlockShape,
    analytic_bytes,
    arch_config,
    block_collectives,
    main as comm_report_main,
    measure_block,
)
from tests.distributed import run_distributed

RTOL = 1e-5
SCHEMES = ("bottleneck", "pair")
TINY = dict(hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4, rank=16, vocab_size=128,
            seq_length=32, cola_init_std=0.3)
# Grouped-query attention: 8 query heads in 4 groups, so a TP rank holds whole groups of several heads (TP2) or
# one group (TP4).
GQA = dict(num_attention_heads=8, num_query_groups=4)
MODELS = {"mha": {}, "gqa": GQA}
CASES = ([(sp, scheme, only, "mha") for sp in (False, True) for scheme in SCHEMES for only in (False, True)]
         + [(sp, scheme, False, "gqa") for sp in (False, True) for scheme in SCHEMES])
BATCH = 2
SEED = 1234


def case_name(sp: bool, scheme: str, only_lr_act: bool, model: str = "mha") -> str:
    return f"{model}-{scheme}-sp{int(sp)}-only_lr_act{int(only_lr_act)}"


# --------------------------------------------------------------------------------------------------------------
# Helpers run inside the launched processes


def _config(tp: int, sp: bool = False, scheme: str = "bottleneck", only_lr_act: bool = False, **model):
    from cola_megatron.config import config_from_dict

    return config_from_dict({
        "model": {**TINY, "only_lr_act": only_lr_act, **model},
        "parallel": {"tensor_parallel": tp, "sequence_parallel": sp, "cola_tp_scheme": scheme},
        "train": {"precision": "fp32", "micro_batch_size": BATCH, "global_batch_size": BATCH},
        "data": {"mock": True},
    })


def _build(cfg, seed: int = SEED):
    from cola_megatron.models.build import build_model
    from cola_megatron.models.init import initialize_parameters

    model = build_model(cfg)
    initialize_parameters([model], seed, cfg.model.init_std)
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY["vocab_size"], (BATCH, TINY["seq_length"]), generator=g)
    positions = torch.arange(TINY["seq_length"]).expand(BATCH, -1)
    return tokens, positions


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def _full(t: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The unsplit tensor of a parameter (or its gradient) from every TP rank's shard (inverse of the init's
    sharding, partition stride included)."""
    import torch.distributed as dist

    group = _tp_group()
    tp = group.size()
    t = t.detach()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return t.clone()
    shards = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(shards, t.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[k][j] for j in range(stride) for k in range(tp)], dim=dim)


def _full_weights(model) -> dict:
    return {name: _full(p, p) for name, p in model.named_parameters()}


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    tokens, positions = _batch()
    return gather_from_tensor_model_parallel_region(model(tokens, positions, None))


def _mismatch(what: str, got: torch.Tensor, ref: torch.Tensor):
    """None when ``got`` matches ``ref`` within the module's tolerance, else a one-line description."""
    if got.shape != ref.shape:
        return f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    err = (got - ref).abs()
    if bool((err <= RTOL * ref.abs() + RTOL * scale).all()):
        return None
    return f"{what}: max abs error {err.max().item():.3g} (scale {scale:.3g})"


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def _reference(only_lr_act: bool, **model) -> dict:
    """TP=1: full weights, logits, the loss and every gradient (plain autograd)."""
    model = _build(_config(1, only_lr_act=only_lr_act, **model))
    tokens, positions = _batch()
    logits = _logits(model)
    loss = model(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    return {
        "weights": _full_weights(model),
        "logits": logits,
        "loss": loss.item(),
        "grads": {name: p.grad.detach().clone() for name, p in model.named_parameters()},
    }


def _tp_run(cfg) -> dict:
    """Weights, logits and gradients at TP>1, gradients finalised by megatron (DDP + finalize_model_grads)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    model = _build(cfg)
    weights = _full_weights(model)
    logits = _logits(model)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    tokens, positions = _batch()
    loss = ddp(tokens, positions, None, labels=tokens).mean()
    loss.backward()
    finalize_model_grads([ddp])
    grads = {name: _full(p.main_grad, p) for name, p in model.named_parameters()}
    return {"weights": weights, "logits": logits, "loss": loss.item(), "grads": grads}


def _parity_problems(got: dict, ref: dict) -> list:
    problems = []
    if set(got["weights"]) != set(ref["weights"]):
        return [f"parameter names differ: {sorted(set(got['weights']) ^ set(ref['weights']))}"]
    for name, w in got["weights"].items():
        if not torch.equal(w, ref["weights"][name]):
            problems.append(f"init of {name} differs from TP=1")
    problems.append(_mismatch("logits", got["logits"], ref["logits"]))
    problems.append(_mismatch("loss", torch.tensor(got["loss"]), torch.tensor(ref["loss"])))
    for name, g in got["grads"].items():
        problems.append(_mismatch(f"grad {name}", g, ref["grads"][name]))
    return [p for p in problems if p]


def _negative_controls(references: dict) -> dict:
    """Deliberately wrong layouts at this TP size must move the logits far beyond the tolerance: q and k swapped,
    gate and up swapped, the fc1 shards handed to the wrong ranks (rank k computing rank k+1's ffn rows, which
    then meet the wrong slice of the down projection), and, under GQA, each query head meeting another group's
    k/v head (the unsplit k and v rows rolled by one head)."""
    tp = _tp_group().size()
    tp_rank = _tp_group().rank()

    def swap_branches(slot, i, j):
        b = slot.b_weight.data
        b[[i, j]] = b[[j, i]]

    def rotate_shards(slot):
        b = slot.b_weight.data
        shards = [torch.empty_like(b) for _ in range(tp)]
        torch.distributed.all_gather(shards, b.contiguous(), group=_tp_group())
        b.copy_(shards[(tp_rank + 1) % tp])

    def roll_kv_heads(slot):
        head_dim = TINY["hidden_size"] // GQA["num_attention_heads"]
        b = slot.b_kv_weight.data
        shards = [torch.empty_like(b) for _ in range(tp)]
        torch.distributed.all_gather(shards, b.contiguous(), group=_tp_group())
        b.copy_(torch.cat(shards, dim=1).roll(head_dim, dims=1).chunk(tp, dim=1)[tp_rank])

    controls = {
        "q/k swapped": ("mha", lambda layer: swap_branches(layer.self_attention.linear_qkv, 0, 1)),
        "gate/up swapped": ("mha", lambda layer: swap_branches(layer.mlp.linear_fc1, 0, 1)),
        "fc1 shards on the wrong ranks": ("mha", lambda layer: rotate_shards(layer.mlp.linear_fc1)),
        "k/v groups on the wrong query heads": ("gqa", lambda layer: roll_kv_heads(layer.self_attention.linear_qkv)),
    }
    errors = {}
    for name, (variant, corrupt) in controls.items():
        model = _build(_config(tp, scheme="bottleneck", **MODELS[variant]))
        with torch.no_grad():
            corrupt(model.decoder.layers[0])
        errors[name] = _relative_error(_logits(model), references[(False, variant)]["logits"])
    return errors


def _comm_cases(tp: int, with_1b: bool) -> dict:
    """measured vs analytic bytes per (phase, kind) of one block, for the three architectures."""
    from cola_megatron.analysis.comm_report import block_shape
    from cola_megatron.config import config_from_dict

    out = {}
    shapes = [("small", dict(hidden_size=64, ffn_hidden_size=96, rank=16, num_attention_heads=4), 16, 2, (False, True))]
    if with_1b:
        shapes.append(("1b", dict(hidden_size=2048, ffn_hidden_size=5461, ffn_multiple_of=tp, rank=512,
                                  num_attention_heads=32), 2 * tp, 1, (True,)))
    for label, model, seq, micro_batch, sps in shapes:
        for sp in sps:
            base = config_from_dict({"model": {**model, "num_layers": 1, "seq_length": seq},
                                     "parallel": {"tensor_parallel": tp, "sequence_parallel": sp},
                                     "train": {"precision": "fp32", "micro_batch_size": micro_batch,
                                               "global_batch_size": micro_batch},
                                     "data": {"mock": True}})
            for arch in ARCHS:
                cfg = arch_config(base, arch, seq, micro_batch)
                analytic = analytic_bytes(block_collectives(arch, block_shape(cfg), tp, sp), seq * micro_batch)
                out[(label, sp, arch)] = (measure_block(cfg), analytic)
    return out


def _checkpoint_save(directory: str) -> dict:
    """At TP=2: one model per scheme saved with megatron dist-checkpointing (torch_dist); returns its logits."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    saved = {}
    for scheme in SCHEMES:
        model = _build(_config(2, scheme=scheme))
        path = os.path.join(directory, scheme)
        if dist.get_rank() == 0:
            os.makedirs(path)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), path)
        saved[scheme] = _logits(model)
    dist.barrier()
    return saved


def _checkpoint_load_problems(directory: str, saved: dict, tp: int) -> list:
    """Every (saved scheme → loading scheme) pair at this TP: logits equal the saving model's. The loading model is
    built from another seed, so a load that silently keeps its own weights fails."""
    from megatron.core import dist_checkpointing

    problems = []
    for saved_scheme in SCHEMES:
        for scheme in SCHEMES:
            model = _build(_config(tp, scheme=scheme), seed=SEED + 1)
            path = os.path.join(directory, saved_scheme)
            state = dist_checkpointing.load(model.sharded_state_dict(), path)
            model.load_state_dict(state)
            problem = _mismatch(f"TP=2 {saved_scheme} → TP={tp} {scheme}: logits", _logits(model), saved[saved_scheme])
            if problem:
                problems.append(problem)
    return problems


def launched_group(tp: int, checkpoint_dir: str = "") -> dict:
    """Everything one launch of ``tp`` processes checks; each rank returns its findings."""
    import torch.distributed as dist

    from cola_megatron.training.distributed import initialize_distributed

    results = {"parity": {}, "init_scheme_independent": [], "checkpoint": []}
    saved = {}
    if checkpoint_dir:
        initialize_distributed(tensor_parallel=2, seed=SEED)
        saved = _checkpoint_save(checkpoint_dir)

    initialize_distributed(tensor_parallel=1, seed=SEED)
    references = {(only, variant): _reference(only, **MODELS[variant])
                  for only, variant in sorted({(only, variant) for _, _, only, variant in CASES})}
    results["init_scheme_independent"] = []
    for variant, model in MODELS.items():
        pair_weights = _full_weights(_build(_config(1, scheme="pair", **model)))
        results["init_scheme_independent"] += [
            f"{variant} {name}" for name, w in pair_weights.items()
            if not torch.equal(w, references[(False, variant)]["weights"][name])
        ]
    if checkpoint_dir:
        results["checkpoint"] += _checkpoint_load_problems(checkpoint_dir, saved, 1)

    initialize_distributed(tensor_parallel=tp, seed=SEED)
    for sp, scheme, only, variant in CASES:
        got = _tp_run(_config(tp, sp, scheme, only, **MODELS[variant]))
        results["parity"][case_name(sp, scheme, only, variant)] = _parity_problems(got, references[(only, variant)])
    results["negative_controls"] = _negative_controls(references)
    results["comm"] = _comm_cases(tp, with_1b=tp == 4)
    if checkpoint_dir:
        results["checkpoint"] += _checkpoint_load_problems(checkpoint_dir, saved, tp)
    results["rank"] = dist.get_rank()
    return results


# --------------------------------------------------------------------------------------------------------------
# The launches (one per TP size, shared by the tests below)


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(launched_group, 2, 2)


@pytest.fixture(scope="module")
def tp4(tmp_path_factory):
    return run_distributed(launched_group, 4, 4, str(tmp_path_factory.mktemp("tp_checkpoints")))


@pytest.fixture(params=[2, 4], ids=["tp2", "tp4"])
def launch(request):
    return request.getfixturevalue(f"tp{request.param}")


def test_logits_and_gradients_match_tp1(launch):
    failures = {
        f"rank {r['rank']} {case}": problems
        for r in launch for case, problems in r["parity"].items() if problems
    }
    assert len(launch[0]["parity"]) == len(CASES)
    assert not failures, failures


def test_initialisation_is_independent_of_tp_size_and_scheme(launch):
    # Full weights equal TP=1 exactly: checked for every case inside the parity results ("init of ... differs").
    init_failures = [p for r in launch for problems in r["parity"].values() for p in problems if p.startswith("init")]
    assert not init_failures
    assert not launch[0]["init_scheme_independent"]


def test_wrong_layouts_would_be_detected(launch):
    for name, error in launch[0]["negative_controls"].items():
        assert error > 1e3 * RTOL, f"{name} moves the logits by only {error:.2g}: the test init is too small"


def test_measured_communication_equals_analytic(launch):
    comm = launch[0]["comm"]
    assert len(comm) >= 2 * len(ARCHS)
    for (label, sp, arch), (measured, analytic) in comm.items():
        assert measured == analytic, f"{label} sp={sp} {arch}: measured {measured} != analytic {analytic}"
        assert analytic, "a TP>1 block always communicates"


def test_bottleneck_halves_dense_communication_at_1b_widths(tp4):
    comm = tp4[0]["comm"]
    total = {arch: sum(comm[("1b", True, arch)][0].values()) for arch in ARCHS}
    assert total["bottleneck"] <= 0.5 * total["dense"], total
    assert total["pair"] > total["dense"], total  # the naive pairing pays a d-wide collective per projection


def test_tp2_checkpoint_loads_at_tp1_and_tp4(tp4):
    failures = [p for r in tp4 for p in r["checkpoint"]]
    assert not failures, failures


# --------------------------------------------------------------------------------------------------------------
# The analytic model and the report (no processes)


def test_analytic_model_matches_the_design():
    d, r, f = 2048, 512, 5464
    shape = BlockShape(hidden=d, ffn=f, rank=r, heads=32)

    def per_token(arch, sp, phase=None):
        return sum(c.width for c in block_collectives(arch, shape, 4, sp) if phase in (None, c.phase))

    assert per_token("bottleneck", True, "forward") == 7 * r  # AG 3r + RS r + AG 2r + RS r
    assert per_token("dense", True, "forward") == 4 * d
    assert per_token("dense", True, "backward") == 6 * d  # megatron re-gathers column inputs for wgrad
    assert per_token("bottleneck", True) / per_token("dense", True) < 0.5
    assert per_token("bottleneck", False) == 7 * r
    assert all(block_collectives(arch, shape, 1, False) == [] for arch in ARCHS)


def test_comm_report_analytic_only_ends_with_ratio(capsys):
    assert comm_report_main(["--d", "2048", "--r", "512", "--ffn", "5461", "--tp", "4", "--sp", "--seq", "256",
                             "--no-measure"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any("padded to 5464" in line for line in out)
    assert out[-1] == "ratio bottleneck/dense: 0.35"


def test_comm_report_needs_shapes(capsys):
    assert comm_report_main(["--tp", "2"]) == 2
    assert "--config" in capsys.readouterr().err
