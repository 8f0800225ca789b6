"""CoLA projections for megatron-core's four linear slots.

Every dense projection becomes a bottleneck auto-encoder ``y = B · σ(A · x)`` (σ = SiLU, no bias). One slot holds
``n`` projections that share their input (q|k|v: n=3, gate|up: n=2, o and down: n=1); their A's are stored as one
``(n, r, d_in)`` tensor so the A's run as one fused GEMM.

Tensor parallelism (docs/design.md §3), chosen by ``config.cola_tp_scheme``:

``bottleneck`` communicates the r-wide bottleneck instead of the hidden state.
  column-type (qkv, fc1): A is TP-replicated and runs on this rank's tokens; σ(A·x) crosses the TP group (all-gather
  along the sequence under SP, identity forward / all-reduce backward without), then this rank's rows of B.
  row-type (proj, fc2): A's input columns are sharded; the r-wide partial sums are reduced (reduce-scatter along the
  sequence under SP, all-reduce without), then σ and the TP-replicated B on this rank's tokens.
``pair`` is the layer-by-layer pairing: A column-parallel along r, σ on the shard, B row-parallel with a d-wide
  reduction. Every weight is sharded but every projection pays a hidden-sized collective; kept as the baseline.

Weights replicated across TP that only see this rank's tokens (SP) carry ``sequence_parallel`` so megatron's
``finalize_model_grads`` sums their gradients over TP, exactly as for sequence-parallel norm weights.

Slot contracts (megatron-core 0.16/0.19): qkv/fc1 return this rank's output shard (qkv per query group as
``[q heads of the group, k_g, v_g]``, i.e. ``[q_h k_h v_h]`` per head under multi-head attention; fc1 as
``[gate_shard ; up_shard]``); proj/fc2 take this rank's shard and return the full hidden state reduced over TP
(sequence-sharded under SP). Each returns ``(output, None)``: no bias.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    all_gather_last_dim_from_tensor_parallel_region,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_last_dim_to_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from megatron.core.utils import get_tensor_model_parallel_group_if_none

from cola_megatron.models.layers import ops

SCHEMES = ("bottleneck", "pair")


def cola_init_std(rank: int, d_in: int, d_out: int) -> float:
    """The paper's init for A and B: N(0, std²), std = (r · (d_in + d_out))^(-1/4), so that B·A has unit-order gain."""
    return (rank * (d_in + d_out)) ** -0.25


def _interleave(outputs: Sequence[torch.Tensor], groups: int) -> torch.Tensor:
    """Lay ``n`` branch outputs out as ``groups`` consecutive blocks of ``[branch_0 | … | branch_n-1]``.

    groups = local query groups gives megatron's q|k|v layout (per group: its query heads, then its k and v head;
    one head each under multi-head attention); groups = 1 gives ``[gate ; up]``.
    """
    if len(outputs) == 1:
        return outputs[0]
    lead = outputs[0].shape[:-1]
    return torch.cat([o.reshape(*lead, groups, -1) for o in outputs], dim=-1).reshape(*lead, -1)


def _equal_runs(sizes: Sequence[int]) -> list:
    """``(start, count)`` of each run of equal consecutive sizes: [d, kv, kv] → [(0, 1), (1, 2)]."""
    runs = []
    for i, size in enumerate(sizes):
        if runs and sizes[runs[-1][0]] == size:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return [tuple(run) for run in runs]


class _CoLASlot(MegatronModule):
    """Shared set-up of a CoLA slot: ``n`` projections d_in → d_out of each branch, with one fused A.

    The A's are one ``(n, r, d_in)`` tensor ``a_weight``. The B's are stacked by width: ``b_weight`` holds the
    leading branches of equal output width, ``(count, d_out, r)``; a slot whose later branches are narrower
    (q|k|v under grouped-query attention: q, then k and v with ``groups·head_dim`` rows) holds those in
    ``b_kv_weight``. Multi-head slots have ``b_weight`` only, so their checkpoints are unchanged.
    """

    num_branches: int = 1
    column_type: bool = True
    # Parameter names of the B stacks, by run of equal-width branches.
    B_NAMES = ("b_weight", "b_kv_weight")

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config,
        init_method=None,
        bias: bool = False,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        **kwargs,
    ):
        super().__init__(config=config)
        if bias:
            raise ValueError("CoLA projections have no bias: set model.add_bias_linear=false")
        scheme = config.cola_tp_scheme
        if scheme not in SCHEMES:
            raise ValueError(f"parallel.cola_tp_scheme must be one of {SCHEMES}, got {scheme!r}")
        self.scheme = scheme
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group, is_expert=False)
        self.tp_size = self.tp_group.size()
        self.sequence_parallel = config.sequence_parallel
        n, r = self.num_branches, config.cola_rank
        self.rank = r
        self.input_size = input_size
        self.branch_sizes = self._branch_sizes(output_size)
        tp = self.tp_size

        def sharded(size: int, what: str) -> int:
            if size % tp:
                raise ValueError(f"{type(self).__name__}: {what}={size} is not divisible by tensor parallel size {tp}")
            return size // tp

        # A: (shape, TP axis); a stack of ``count`` B's of output width ``width``: (shape, TP axis). None = replicated.
        if self.column_type and scheme == "bottleneck":
            a_shape, a_axis = (n, r, input_size), None
        elif scheme == "pair":
            a_shape, a_axis = (n, sharded(r, "rank"), input_size), 1
        else:  # row-type bottleneck
            a_shape, a_axis = (n, r, sharded(input_size, "input size")), 2

        def b_layout(count: int, width: int):
            if self.column_type and scheme == "bottleneck":
                return (count, sharded(width, "output size"), r), 1
            if scheme == "pair":
                return (count, width, sharded(r, "rank")), 2
            return (count, width, r), None
        # The paper's init per projection, with its own d_out (k and v are narrower under GQA).
        stds = [config.cola_init_std or cola_init_std(r, input_size, width) for width in self.branch_sizes]
        self.a_weight = self._make_weight(a_shape, a_axis, stds[0] if len(set(stds)) == 1 else tuple(stds))
        self._tp_axis_map = {"a_weight": a_axis} if a_axis is not None else {}
        self._b_names = []
        runs = _equal_runs(self.branch_sizes)
        for name, (start, count) in zip(self.B_NAMES[:len(runs)], runs, strict=True):
            shape, axis = b_layout(count, self.branch_sizes[start])
            setattr(self, name, self._make_weight(shape, axis, stds[start]))
            self._b_names.append(name)
            if axis is not None:
                self._tp_axis_map[name] = axis

    def _branch_sizes(self, output_size: int) -> list:
        """Output width of each branch (unsplit); equal by default."""
        n = self.num_branches
        if output_size % n:
            raise ValueError(f"{type(self).__name__}: output size {output_size} is not {n} equal branches")
        return [output_size // n] * n

    def b_weights(self) -> list:
        """Each branch's B, (d_out shard, r) or (d_out, r shard), in branch order."""
        return [b for name in self._b_names for b in getattr(self, name).unbind(0)]

    def _make_weight(self, shape, tp_axis, std) -> torch.nn.Parameter:
        # CPU initialisation allocates on the default device: the CPU, or the meta device when conversion builds a
        # model only for its sharded state dict's layout.
        device = torch.get_default_device() if self.config.use_cpu_initialization else torch.cuda.current_device()
        weight = torch.nn.Parameter(torch.empty(shape, dtype=self.config.params_dtype, device=device))
        if self.config.perform_initialization:
            for part, part_std in zip(weight if isinstance(std, tuple) else [weight],
                                      std if isinstance(std, tuple) else [std]):
                torch.nn.init.normal_(part, 0.0, part_std)
        set_tensor_model_parallel_attributes(weight, tp_axis is not None, -1 if tp_axis is None else tp_axis, 1)
        weight.init_std = std  # a tuple: one std per branch (dim 0), see models/init.py
        # Replicated weights that see only this rank's tokens need their gradient summed over TP (as SP norms do).
        weight.sequence_parallel = tp_axis is None and self.sequence_parallel
        return weight

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        # The data-parallel group sets the replica ids: without it every DP replica claims the same shard as its
        # main copy and megatron rejects the save ("Invalid access pattern") as soon as DP > 1.
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, self._tp_axis_map, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )

    def backward_dw(self):
        """Megatron's delayed weight-gradient hook; CoLA computes weight gradients in the normal backward."""

    def reference_layout(self) -> list:
        """This rank's weights as the reference implementation stores them, one ``(cola_a, cola_b)`` per branch:
        ``cola_a`` (d_in, r) and ``cola_b`` (r, d_out), so that ``y = silu(x @ cola_a) @ cola_b``."""
        return [(a.t(), b.t()) for a, b in zip(self.a_weight.unbind(0), self.b_weights())]

    def _fused_a(self) -> torch.Tensor:
        n, r, d = self.a_weight.shape
        return self.a_weight.view(n * r, d)

    def _branches(self, z: torch.Tensor, activated: Optional[torch.Tensor] = None) -> list:
        """Apply each branch's B to σ of its slice of the bottleneck pre-activation z, storing z and not σ(z).

        ``activated``: σ(z) when the caller already computed it (then only moved by communication)."""
        # split/unbind rather than indexing: their backward writes each slice's gradient once, where indexing
        # zero-fills a full-size gradient per branch.
        # σ runs once on the whole z (not per branch), so each GEMM reads the same strided slice as before.
        weights = self.b_weights()
        r = weights[0].shape[1]
        if activated is None:
            activated = F.silu(z)
        return [ops.linear_of_silu(a, b, c)
                for a, b, c in zip(activated.split(r, dim=-1), weights, z.split(r, dim=-1))]

    # The forward is split into encode (A, up to the pre-activation z) and decode (σ and B) so that CoLA-M
    # (cola_megatron.models.layers.cola_m) can store z and re-run only the decode side.
    code_reduction: Optional[str] = None
    """How the A GEMM's output is summed over TP: None, 'all_reduce' or 'reduce_scatter' (along the sequence)."""

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor the fused A GEMM reads (after any input communication)."""
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z = A·x: the bottleneck pre-activation, before σ."""
        return _reduce(F.linear(self.encoder_input(x), self._fused_a()), self.code_reduction, self.tp_group)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return self.decode(self.encode(x)), None


def _reduce(t: torch.Tensor, reduction: Optional[str], group) -> torch.Tensor:
    if reduction == "all_reduce":
        return reduce_from_tensor_model_parallel_region(t, group=group)
    if reduction == "reduce_scatter":
        return reduce_scatter_to_sequence_parallel_region(t, group=group)
    return t


class _CoLAColumn(_CoLASlot):
    """Column-type slot: full hidden input → this rank's output shard."""

    column_type = True

    def _groups(self) -> int:
        return 1

    def _to_tensor_parallel_region(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank needs all tokens: all-gather along the sequence (SP), else identity forward."""
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(t, group=self.tp_group)
        return copy_to_tensor_model_parallel_region(t, group=self.tp_group)

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.scheme == "bottleneck" else self._to_tensor_parallel_region(x)

    def decode_branches(self, z: torch.Tensor) -> list:
        """This rank's output shard of each branch (q, k, v or gate, up) as separate tensors, not interleaved
        (the attention and MLP modules of cola_megatron.models.layers take them as they are)."""
        if self.scheme == "bottleneck" and self.sequence_parallel:
            return list(_GatheredSiLUBranches.apply(z, self.tp_group, *self.b_weights()))
        if self.scheme == "bottleneck":
            # Without SP the region's forward is the identity: σ(z) is the same tensor on every rank.
            return self._branches(z, self._to_tensor_parallel_region(F.silu(z)))
        branches = self._branches(z)  # full width, partial sums over the rank shards
        if self.tp_size == 1:
            return branches
        return [reduce_scatter_last_dim_to_tensor_parallel_region(b, group=self.tp_group) for b in branches]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # megatron's slot contract (one interleaved tensor); this project's attention and MLP call
        # decode_branches instead and skip the copy.
        return _interleave(self.decode_branches(z), self._groups())


class _GatheredSiLUBranches(torch.autograd.Function):
    """``[B_i · σ(gather(z))_i]``: a column slot's B GEMMs under the ``bottleneck`` scheme with sequence
    parallelism, storing only the gathered z.

    σ is elementwise, so gathering z instead of σ(z) moves the same bytes; σ(z) is rebuilt from it in backward,
    and this rank's z is a slice of it. The backward runs in the order of the plain composition σ → gather → B
    (reduce-scatter of σ's gradient, then σ's backward), so its gradients are those of that composition.
    """

    @staticmethod
    def forward(ctx, z, group, *weights):
        gathered = gather_from_sequence_parallel_region(z, group=group)
        ctx.save_for_backward(gathered, *weights)
        ctx.group = group
        r = weights[0].shape[1]
        return tuple(F.linear(a, w) for a, w in zip(F.silu(gathered).split(r, dim=-1), weights))

    @staticmethod
    def backward(ctx, *grads):
        gathered, *weights = ctx.saved_tensors
        r = weights[0].shape[1]
        grads = [torch.zeros_like(gathered[..., :1]).expand(*gathered.shape[:-1], w.shape[0]) if g is None else g
                 for g, w in zip(grads, weights)]
        grad_weights = [None] * len(weights)
        for i, (g, a) in enumerate(zip(grads, F.silu(gathered).split(r, dim=-1))):
            if ctx.needs_input_grad[2 + i]:
                grad_weights[i] = g.reshape(-1, g.shape[-1]).t().matmul(a.reshape(-1, a.shape[-1]))
        grad_z = None
        if ctx.needs_input_grad[0]:
            grad_activated = torch.cat([g.matmul(w) for g, w in zip(grads, weights)], dim=-1)
            grad_local = reduce_scatter_to_sequence_parallel_region(grad_activated, group=ctx.group)
            chunk = grad_local.shape[0]
            z = gathered.narrow(0, ctx.group.rank() * chunk, chunk)
            grad_z = torch.ops.aten.silu_backward(grad_local, z)
        return (grad_z, None, *grad_weights)


class _CoLARow(_CoLASlot):
    """Row-type slot: this rank's input shard → full hidden output reduced over TP."""

    column_type = False

    @property
    def _reduction(self) -> str:
        return "reduce_scatter" if self.sequence_parallel else "all_reduce"

    @property
    def code_reduction(self) -> Optional[str]:
        return self._reduction if self.scheme == "bottleneck" else None

    @property
    def output_reduction(self) -> Optional[str]:
        """How B's output is summed over TP (the same kinds as ``code_reduction``)."""
        return self._reduction if self.scheme == "pair" else None

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "pair" and self.tp_size > 1:
            return all_gather_last_dim_from_tensor_parallel_region(x, group=self.tp_group)
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return _reduce(ops.silu_linear(z, self.b_weight[0]), self.output_reduction, self.tp_group)


class CoLAQKV(_CoLAColumn):
    """``linear_qkv``: q, k, v projections, output laid out as megatron's attention splits it: per query group,
    its query heads then its k and v head (``[q_h k_h v_h]`` per head under multi-head attention).

    Grouped-query attention (``num_query_groups`` < heads): q keeps ``heads·head_dim`` outputs, k and v have
    ``groups·head_dim`` each, every one still ``B·σ(A·x)`` with its own rank-r bottleneck; the three A's stay one
    fused GEMM. Under TP each rank holds ``groups/tp`` whole groups (and their query heads).
    """

    num_branches = 3

    def _branch_sizes(self, output_size: int) -> list:
        c = self.config
        q, kv = c.kv_channels * c.num_attention_heads, c.kv_channels * c.num_query_groups
        if output_size != q + 2 * kv:
            raise ValueError(f"CoLAQKV: output size {output_size} is not q ({q}) + k and v ({kv} each)")
        return [q, kv, kv]

    def _groups(self) -> int:
        return self.config.num_query_groups // self.tp_size


class CoLAFC1(_CoLAColumn):
    """``linear_fc1``: gate and up projections, output ``[gate_shard ; up_shard]`` as megatron's MLP chunks it."""

    num_branches = 2

    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        if not config.gated_linear_unit:
            raise ValueError("CoLAFC1 needs gated_linear_unit=True (LLaMA MLP)")
        super().__init__(input_size, output_size, config=config, **kwargs)


class CoLAProj(_CoLARow):
    """``linear_proj``: attention output projection."""


class CoLAFC2(_CoLARow):
    """``linear_fc2``: MLP down projection."""
