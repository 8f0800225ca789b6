"""Run configuration: a dataclass tree loaded from YAML with dotted ``key=value`` overrides.

Precedence: command line > YAML (and the files it ``include``s) > defaults. Every problem is reported as one
:class:`ConfigError` naming the key and the fix, before anything heavy is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from cola_megatron.data.config import DataConfig
from cola_megatron.errors import ConfigError
from cola_megatron.resources import shipped_config


@dataclass
class ModelConfig:
    arch: str = "cola"
    """'cola' (every projection a low-rank auto-encoder) or 'dense' (the LLaMA baseline, same kernels)."""
    hidden_size: int = 512
    ffn_hidden_size: int = 1376
    num_layers: int = 8
    num_attention_heads: int = 8
    num_query_groups: Optional[int] = None
    """Grouped-query attention: k and v heads (null: one per query head, multi-head attention as in the paper)."""
    rank: int = 128
    """CoLA bottleneck width r."""
    only_lr_act: bool = False
    """True: MLP is down(gate(x) * up(x)), the bottleneck SiLUs being the only non-linearities."""
    lr_act: str = "silu"
    vocab_size: int = 32000
    seq_length: int = 256
    max_position_embeddings: Optional[int] = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    """Std of embeddings, output layer and dense projections."""
    cola_init_std: Optional[float] = None
    """Override of CoLA's (r·(d_in+d_out))^(-1/4) init; tests use a large value so layout bugs show in the loss."""
    ffn_multiple_of: int = 1
    """Round ffn_hidden_size up to a multiple of this (GEMM widths that are multiples of 128 run much faster)."""
    recompute: str = "none"
    """Activation recomputation: 'none', 'cola_m' (CoLA-M) or 'full' (megatron's per-layer recompute)."""
    attention: str = "sdpa"
    """Core attention: 'sdpa' (torch scaled_dot_product_attention) or 'megatron' (its local DotProductAttention)."""
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    @property
    def padded_ffn_hidden_size(self) -> int:
        m = self.ffn_multiple_of
        return int(math.ceil(self.ffn_hidden_size / m) * m)


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: Optional[int] = None
    """Model chunks per pipeline rank (interleaved 1F1B); null for plain 1F1B."""
    sequence_parallel: bool = False
    cola_tp_scheme: str = "bottleneck"
    """'bottleneck' (communicate the r-wide bottleneck) or 'pair' (naive per-layer pairing; docs/design.md §3)."""
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    def data_parallel_size(self, world_size: int) -> int:
        """Data parallelism is whatever the world size leaves after TP x PP."""
        return world_size // (self.tensor_parallel * self.pipeline_parallel)


@dataclass
class ProfileConfig:
    """torch.profiler over a window of iterations (Megatron-LM's --profile-step-start/-end, torchtitan's
    profiling.enable_profiling)."""

    enabled: bool = False
    start_step: int = 2
    """First traced iteration (numbered as on the metric line; the first one pays one-off costs)."""
    end_step: int = 3
    """Last traced iteration (inclusive)."""
    ranks: List[int] = field(default_factory=lambda: [0])
    """Global ranks that write a trace."""
    dir: Optional[str] = None
    """Where traces go; null: <logging.log_dir>/profile (./profile without a log_dir)."""
    memory_snapshot: bool = True
    """On CUDA, also dump torch.cuda's memory snapshot of the window (view it at pytorch.org/memory_viz)."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    train_iters: int = 100
    seed: int = 1234
    precision: str = "bf16"
    """'bf16' (fp32 master weights), 'fp16' or 'fp32'."""
    pure_bf16: bool = False
    """The reference implementation's mode: bf16 weights, gradients and optimizer state, no fp32 master copy."""
    eval_interval: int = 0
    """Validate every N iterations (0: only at the end when a validation set exists)."""
    eval_iters: int = 10
    exit_duration_minutes: Optional[float] = None
    """Save and exit once the run has lasted this long (wall-clock-limited jobs)."""
    max_nan_skips: int = 5
    """Skip up to this many steps in a row whose loss or gradient norm is NaN/inf, then stop (no checkpoint is
    written inside such a streak)."""
    torch_compile: bool = False
    """torch.compile each transformer layer (fuses the elementwise work around the GEMMs; compiles once per shape)."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cuda' or 'cpu'."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    @property
    def mixed_precision(self) -> bool:
        """bf16/fp16 compute with fp32 master weights in the optimizer (megatron's Float16Module path)."""
        return self.precision in ("bf16", "fp16") and not self.pure_bf16


@dataclass
class OptimizerConfig:
    lr: float = 6e-3
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_iters: int = 0
    decay_iters: Optional[int] = None
    """Iterations of warmup + decay; null means train.train_iters."""
    decay_style: str = "cosine"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 0.5


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None
    load_dir: Optional[str] = None
    """Resume from here; null resumes from save_dir when it holds a checkpoint."""
    save_interval: int = 0
    keep_last: Optional[int] = None
    """Keep only the newest N checkpoints (never the one the run resumed from)."""
    async_save: bool = False
    load_optimizer: bool = True
    scheduler_from: Optional[str] = None
    """On resume, whose optimizer and LR-schedule settings apply when the config's differ from the checkpoint's:
    null refuses and lists the differences, 'config' applies the config's (Megatron's
    --override-opt_param-scheduler), 'checkpoint' keeps the checkpoint's (--use-checkpoint-opt_param-scheduler)."""
    allow_different_run: bool = False
    """Resume a checkpoint although train.seed or the data section differ from the run that saved it."""


@dataclass
class LoggingConfig:
    log_interval: int = 10
    log_dir: Optional[str] = None
    """TensorBoard events and metrics.jsonl go here; null disables both."""
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    """Log to Weights & Biases too (needs the wandb package)."""
    peak_tflops: Optional[float] = None
    """Per-GPU peak for MFU; null looks the GPU up by name."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML, the text a checkpoint's cola_config.yaml holds."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------------------
# Loading


def _fail(key: str, problem: str, fix: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a YAML/CLI value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], key)
    if origin in (list, List, Sequence):
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list, got {value!r}", f"write {key}=[...] or a YAML list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        if item_tp is str:  # blends mix weights and paths: [0.3, a, 0.7, b]
            value = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in value]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping, got {value!r}", "give a YAML mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(key, f"expected true/false, got {value!r}", f"set {key}=true or {key}=false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _fail(key, f"expected an integer, got {value!r}", f"set {key} to a whole number")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads '1e-3' as a string
            except ValueError:
                pass
        _fail(key, f"expected a number, got {value!r}", f"set {key} to a number")
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(key, f"expected a string, got {value!r}", f"quote the value of {key}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    return value


def _build(cls, values: Any, path: str):
    if not isinstance(values, dict):
        _fail(path or "config", f"expected a mapping, got {values!r}", "give a YAML mapping of keys")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
            _fail(dotted, "unknown key", hint)
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: Dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} appears twice (lines {seen[key]} and {line})")
                seen[key] = line
            except TypeError:  # an unhashable key: the base loader reports it
                continue
        return super().construct_mapping(node, deep)


def _load_yaml_text(text: str, source: str) -> Any:
    stream = io.StringIO(text)
    stream.name = source  # YAML's error marks name the stream
    try:
        return yaml.load(stream, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        _fail(source, str(e), "give each key once per section and delete the other")
    except yaml.YAMLError as e:
        _fail(source, f"is not valid YAML ({' '.join(str(e).split())})", "fix the YAML syntax")


def _read_yaml(path: str, seen: Sequence[str] = (), named_by: str = "--config") -> Dict[str, Any]:
    """Read a YAML config; a top-level ``include: other.yaml`` (relative to this file) is merged underneath."""
    if not os.path.isfile(path):
        if named_by == "--config":
            _fail("--config", f"file {path!r} does not exist", "pass the path of a YAML file, e.g. configs/demo.yaml")
        _fail(named_by, f"the included file {path!r} does not exist",
              "fix the include: line (paths are relative to the including file)")
    real = os.path.realpath(path)
    if real in seen:
        _fail("include", f"{path} includes itself", "remove the include cycle")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        _fail(path, f"is not UTF-8 text (byte {e.start}, line {line}, is {raw[e.start:e.start + 1]!r})",
              "save the config as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    values = _load_yaml_text(text, path) or {}
    if not isinstance(values, dict):
        _fail(path, "top level is not a mapping", "write the config as `section: {key: value}`")
    include = values.pop("include", None)
    if include is not None:
        if not isinstance(include, str) or not include.strip():
            _fail(f"{path}: include", f"expected one file name, got {include!r}",
                  "include a single file (it may itself include another)")
        base_path = os.path.join(os.path.dirname(path), include)
        values = _deep_merge(_read_yaml(base_path, (*seen, real), f"{path}: include"), values)
    return values


def parse_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """``['train.lr=1e-3', 'parallel.tensor_parallel=2']`` → nested dict, values parsed as YAML scalars."""
    nested: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            _fail(item, "is not a key=value override", "write overrides as section.key=value, e.g. train.train_iters=10")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(parts):
            _fail(key, "overrides name a section and a key", "write e.g. model.rank=64")
        value = _load_yaml_text(raw, key) if raw.strip() else None
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                _fail(key, "sets a key below a value", "check the override's dotted path")
        node[parts[-1]] = value
    return nested


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), world_size: Optional[int] = None) -> Config:
    """Defaults < YAML file < overrides, then validation. ``world_size`` adds the checks that depend on it."""
    if path and not os.path.isfile(path):
        path = shipped_config(path) or path  # a shipped config works from any directory, e.g. cola/llama_1b.yaml
    values = _read_yaml(path) if path else {}
    values = _deep_merge(values, parse_overrides(overrides))
    cfg = _build(Config, values, "")
    validate(cfg, world_size)
    return cfg


def config_from_dict(values: Dict[str, Any], world_size: Optional[int] = None) -> Config:
    cfg = _build(Config, values, "")
    validate(cfg, world_size)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Validation


def _choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        _fail(key, f"{value!r} is not one of {list(choices)}", f"set {key} to one of {', '.join(map(str, choices))}")


def _positive(key: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        _fail(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}", f"set {key} to a positive value")


def _divides(key: str, value: int, by_key: str, by: int, fix: str) -> None:
    if value % by:
        _fail(key, f"{value} is not divisible by {by_key}={by}", fix)


def _validate_profile(pr: ProfileConfig, train_iters: int, world_size: Optional[int]) -> None:
    if not pr.enabled:
        return
    _positive("train.profile.start_step", pr.start_step)
    if pr.end_step < pr.start_step:
        _fail("train.profile.end_step", f"{pr.end_step} is before train.profile.start_step={pr.start_step}",
              "set end_step to the last iteration to trace (inclusive), at or after start_step")
    if pr.start_step > train_iters:
        _fail("train.profile.start_step", f"{pr.start_step} is beyond train.train_iters={train_iters}",
              "trace iterations the run reaches, e.g. train.profile.start_step=2 train.profile.end_step=3")
    if not pr.ranks:
        _fail("train.profile.ranks", "is empty", "list the global ranks to trace, e.g. train.profile.ranks=[0]")
    for r in pr.ranks:
        if r < 0 or (world_size is not None and r >= world_size):
            _fail("train.profile.ranks", f"rank {r} does not exist" + (f" (world size {world_size})" if world_size
                  else ""), "list ranks between 0 and the world size - 1")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    m, p, t, o, c = cfg.model, cfg.parallel, cfg.train, cfg.optimizer, cfg.checkpoint
    _choice("model.arch", m.arch, ("cola", "dense"))
    for key in ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "vocab_size", "seq_length"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.ffn_multiple_of", m.ffn_multiple_of)
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.init_std", m.init_std)
    _positive("model.cola_init_std", m.cola_init_std)
    _choice("model.recompute", m.recompute, ("none", "cola_m", "full"))
    _choice("model.attention", m.attention, ("sdpa", "megatron"))
    _choice("model.lr_act", m.lr_act, ("silu",))
    _divides("model.hidden_size", m.hidden_size, "model.num_attention_heads", m.num_attention_heads,
             "choose a hidden size that is a multiple of the number of heads")
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        _fail("model.max_position_embeddings", f"{m.max_position_embeddings} < model.seq_length={m.seq_length}",
              "raise max_position_embeddings or leave it null")
    if m.arch == "cola":
        _positive("model.rank", m.rank)
        if m.rank > min(m.hidden_size, m.padded_ffn_hidden_size):
            _fail("model.rank", f"{m.rank} exceeds the smallest projection width "
                  f"{min(m.hidden_size, m.padded_ffn_hidden_size)}", "use a rank below the hidden size (paper: d/4)")
        if m.recompute == "cola_m" and (m.attention_dropout or m.hidden_dropout):
            _fail("model.recompute", "cola_m recomputes without replaying dropout masks",
                  "set model.attention_dropout=0 and model.hidden_dropout=0 (the paper uses none), or recompute=full")
    else:
        if m.recompute == "cola_m":
            _fail("model.recompute", "cola_m needs CoLA projections", "use recompute=full or none with arch=dense")
    if m.num_query_groups is not None:
        _positive("model.num_query_groups", m.num_query_groups)
        _divides("model.num_attention_heads", m.num_attention_heads, "model.num_query_groups",
                 m.num_query_groups, "choose a number of query groups that divides the heads")

    tp, pp = p.tensor_parallel, p.pipeline_parallel
    _positive("parallel.tensor_parallel", tp)
    _positive("parallel.pipeline_parallel", pp)
    _choice("parallel.cola_tp_scheme", p.cola_tp_scheme, ("bottleneck", "pair"))
    fix_tp = "choose a parallel.tensor_parallel that divides it"
    _divides("model.num_attention_heads", m.num_attention_heads, "parallel.tensor_parallel", tp, fix_tp)
    if m.num_query_groups is not None:
        _divides("model.num_query_groups", m.num_query_groups, "parallel.tensor_parallel", tp,
                 "choose a parallel.tensor_parallel that divides it (each TP rank holds whole k/v groups)")
    _divides("model.ffn_hidden_size (after ffn_multiple_of padding)", m.padded_ffn_hidden_size,
             "parallel.tensor_parallel", tp, "set model.ffn_multiple_of to a multiple of tensor_parallel, or change TP")
    _divides("model.vocab_size", m.vocab_size, "parallel.tensor_parallel", tp,
             "pad model.vocab_size up to a multiple of tensor_parallel (e.g. 128 * TP)")
    if m.arch == "cola" and p.cola_tp_scheme == "pair":
        _divides("model.rank", m.rank, "parallel.tensor_parallel", tp,
                 "use the default cola_tp_scheme=bottleneck, which does not shard r, or a rank divisible by TP")
    if p.sequence_parallel:
        if tp == 1:
            _fail("parallel.sequence_parallel", "needs tensor_parallel > 1", "set parallel.sequence_parallel=false")
        _divides("model.seq_length", m.seq_length, "parallel.tensor_parallel", tp,
                 "with sequence_parallel the sequence must split evenly over TP ranks")
    vp = p.virtual_pipeline
    if vp is not None:
        _positive("parallel.virtual_pipeline", vp)
        if pp == 1:
            _fail("parallel.virtual_pipeline", "needs pipeline_parallel > 1", "set parallel.virtual_pipeline=null")
    chunks = pp * (vp or 1)
    _divides("model.num_layers", m.num_layers, "pipeline_parallel x virtual_pipeline", chunks,
             "choose pipeline_parallel (and virtual_pipeline) whose product divides the number of layers")
    if p.overlap_param_gather and not p.use_distributed_optimizer:
        _fail("parallel.overlap_param_gather", "needs the distributed optimizer",
              "set parallel.use_distributed_optimizer=true or overlap_param_gather=false")

    _positive("train.micro_batch_size", t.micro_batch_size)
    _positive("train.global_batch_size", t.global_batch_size)
    _positive("train.train_iters", t.train_iters)
    _positive("train.eval_interval", t.eval_interval, allow_zero=True)
    _positive("train.eval_iters", t.eval_iters, allow_zero=True)
    _positive("train.exit_duration_minutes", t.exit_duration_minutes)
    _positive("train.max_nan_skips", t.max_nan_skips, allow_zero=True)
    _choice("train.precision", t.precision, ("bf16", "fp16", "fp32"))
    _choice("train.device", t.device, ("auto", "cuda", "cpu"))
    if t.pure_bf16 and t.precision != "bf16":
        _fail("train.pure_bf16", f"needs precision=bf16, got {t.precision}", "set train.precision=bf16")
    _divides("train.global_batch_size", t.global_batch_size, "train.micro_batch_size", t.micro_batch_size,
             "make the global batch a multiple of the micro-batch")
    if pp > 1 and vp is not None and (t.global_batch_size // t.micro_batch_size) % pp:
        _fail("train.global_batch_size", "interleaved pipelining needs the number of micro-batches per step to be "
              f"a multiple of pipeline_parallel={pp}", "raise global_batch_size or lower micro_batch_size")
    if world_size is not None:
        if world_size % (tp * pp):
            _fail("parallel", f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel="
                  f"{tp * pp}", "launch a multiple of TP x PP processes or change the layout")
        dp = cfg.parallel.data_parallel_size(world_size)
        _divides("train.global_batch_size", t.global_batch_size, "micro_batch_size x data_parallel",
                 t.micro_batch_size * dp, f"with data_parallel={dp}, use a global batch that is a multiple of "
                 f"{t.micro_batch_size * dp}")
        micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
        if pp > 1 and vp is not None and micro_batches % pp:
            _fail("train.global_batch_size", f"interleaved pipelining needs micro-batches per step ({micro_batches}) "
                  f"to be a multiple of pipeline_parallel={pp}", "raise global_batch_size or lower micro_batch_size")

    _positive("optimizer.lr", o.lr)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _fail("optimizer.min_lr_ratio", f"{o.min_lr_ratio} is outside [0, 1]", "use a fraction such as 0.1")
    _positive("optimizer.warmup_iters", o.warmup_iters, allow_zero=True)
    decay = o.decay_iters if o.decay_iters is not None else t.train_iters
    if o.warmup_iters >= decay:
        _fail("optimizer.warmup_iters", f"{o.warmup_iters} is not below the decay length {decay}",
              "shorten warmup or lengthen optimizer.decay_iters / train.train_iters")
    _choice("optimizer.decay_style", o.decay_style, ("cosine", "linear", "constant"))
    _positive("optimizer.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optimizer.clip_grad", o.clip_grad, allow_zero=True)
    _positive("optimizer.adam_eps", o.adam_eps)
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            _fail(f"optimizer.{key}", f"{getattr(o, key)} is outside [0, 1)", "use e.g. 0.9 / 0.999")

    _positive("checkpoint.save_interval", c.save_interval, allow_zero=True)
    if c.save_interval and not c.save_dir:
        _fail("checkpoint.save_interval", "is set but checkpoint.save_dir is not", "set checkpoint.save_dir=PATH")
    if c.keep_last is not None:
        _positive("checkpoint.keep_last", c.keep_last)
    if c.async_save and not c.save_dir:
        _fail("checkpoint.async_save", "is set but checkpoint.save_dir is not", "set checkpoint.save_dir=PATH")
    if c.scheduler_from is not None:
        _choice("checkpoint.scheduler_from", c.scheduler_from, ("config", "checkpoint"))

    _positive("logging.log_interval", cfg.logging.log_interval)
    _positive("logging.peak_tflops", cfg.logging.peak_tflops)
    _validate_profile(t.profile, t.train_iters, world_size)

    validate_data = getattr(cfg.data, "validate", None)
    if validate_data is not None:
        try:
            validate_data()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
