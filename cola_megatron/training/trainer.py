"""The training loop on megatron-core: schedules, DDP, the megatron optimizer and LR scheduler.

Everything parallel is megatron's: ``get_forward_backward_func`` picks no-pipelining, 1F1B or interleaved 1F1B;
``DistributedDataParallel`` buckets and (optionally) overlaps gradient reduction; ``get_megatron_optimizer`` gives
AdamW with fp32 master weights, gradient clipping and the distributed optimizer. Loss is averaged per token over the
whole global batch (``calculate_per_token_loss``), so every layout computes the same loss for the same samples.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from cola_megatron.compat.megatron import step_if_finite, use_batched_grad_norm
from cola_megatron.config import Config
from cola_megatron.errors import TrainingStopped
from cola_megatron.training.batches import MicroBatches
from cola_megatron.training.checkpoint import CheckpointManager, ResumePoint, schedule_differences
from cola_megatron.training import metrics
from cola_megatron.training.metrics import MetricsSink, format_train_line, peak_memory, peak_tflops, throughput
from cola_megatron.training.stop import early_signal
from cola_megatron.training.profiling import StepProfiler, window_finished
from cola_megatron.models.accounting import count_parameters, hardware_flops_per_token, training_flops_per_token
from cola_megatron.models.build import build_model, transformer_config
from cola_megatron.models.init import initialize_parameters


@dataclass
class TrainState:
    """What a checkpoint must restore besides the model, optimizer and scheduler: the position in the run."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iters: int = 0
    """Steps not applied (non-finite loss or gradient norm, fp16 loss-scale overflow), over the whole run."""
    nan_streak: int = 0
    """Non-finite steps in a row just now (train.max_nan_skips bounds it)."""
    run_id: str = ""
    """Names the run in its metrics across resumes; set at the fresh start."""

    def state_dict(self) -> Dict[str, int]:
        return asdict(self)

    def load_state_dict(self, values: Dict[str, int]) -> None:
        for f in fields(self):
            if f.name in values:
                setattr(self, f.name, values[f.name])


@dataclass
class _Interval:
    """What happened since the last metric line: training steps, and time that was not training."""

    start: float
    steps: int = 0
    data: float = 0.0
    excluded: float = 0.0
    losses: List[float] = field(default_factory=list)


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes the iteration, checkpoints and exits 0 (Slurm preemption)."""

    def __init__(self):
        self.received: Optional[int] = early_signal()  # a stop asked for during start-up counts too
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): signals stay default
                pass

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss sum and token count; megatron divides by the step's total token count."""
    losses = output_tensor.float()
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(losses.reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


class Trainer:
    def __init__(self, cfg: Config, device: torch.device, log: bool = True, resume: Optional[ResumePoint] = None):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.device = device
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.state = TrainState()
        self.tconfig = transformer_config(cfg, use_cpu_initialization=device.type == "cpu")
        self.tconfig.calculate_per_token_loss = True
        self.model = self._build_model_chunks()
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self._wire_megatron_hooks()
        self.flops_per_token = training_flops_per_token(cfg.model)
        self.hardware_flops_per_token = hardware_flops_per_token(cfg.model)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        self.sink = MetricsSink(cfg.logging.log_dir, enabled=log and self.rank == 0,
                                tensorboard=cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project,
                                run_config=cfg.to_dict())
        self.train_data = self.valid_data = None
        self.checkpoint = self._build_checkpoint_manager(resume)
        self.history: List[float] = []  # the loss of every step, for tests and callers
        self.data_seconds = 0.0  # time spent waiting for batches, all schedules together

    # ---------------------------------------------------------------------------------------------------------
    # Set-up

    def _build_model_chunks(self):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        cfg, vp = self.cfg, self.cfg.parallel.virtual_pipeline
        chunks = []
        for stage in range(vp or 1):
            vp_stage = stage if vp else None
            pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
            post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
            chunks.append(build_model(cfg, self.tconfig, pre_process=pre, post_process=post, vp_stage=vp_stage))
        initialize_parameters(chunks, cfg.train.seed, cfg.model.init_std)
        chunks = [c.to(self.device) for c in chunks]
        if cfg.train.torch_compile:
            # Per transformer layer (in place: parameter names and checkpoints are unchanged); the pipeline
            # schedules, DDP hooks and the loss stay eager.
            for chunk in chunks:
                for layer in chunk.decoder.layers:
                    layer.compile()
        if cfg.train.mixed_precision:
            chunks = [Float16Module(self.tconfig, c) for c in chunks]
        ddp_config = DistributedDataParallelConfig(
            # Pure bf16 keeps gradients in the parameters' dtype: torch's AdamW refuses fp32 gradients for bf16
            # weights (the reference accumulates in bf16 too).
            grad_reduce_in_fp32=not cfg.train.pure_bf16,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            average_in_collective=False,
        )
        return [
            DistributedDataParallel(self.tconfig, ddp_config, c, disable_bucketing=i > 0)
            for i, c in enumerate(chunks)
        ]

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o, t = self.cfg.optimizer, self.cfg.train
        config = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.lr * o.min_lr_ratio,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            # megatron's clipping asserts fp32 gradients; pure-bf16 steps clip in step_if_finite instead.
            clip_grad=0.0 if t.pure_bf16 else o.clip_grad,
            bf16=t.mixed_precision and t.precision == "bf16",
            fp16=t.mixed_precision and t.precision == "fp16",
            params_dtype=torch.bfloat16 if t.pure_bf16 else torch.float32,
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
            overlap_param_gather_with_optimizer_step=False,
        )
        use_batched_grad_norm()  # step_if_finite computes the norm every step: no host sync per tensor
        return get_megatron_optimizer(config, self.model)

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = self.cfg.optimizer
        decay = o.decay_iters if o.decay_iters is not None else self.cfg.train.train_iters
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=o.lr,
            min_lr=o.lr * o.min_lr_ratio,
            lr_warmup_steps=o.warmup_iters,
            lr_decay_steps=decay,
            lr_decay_style=o.decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=decay,
            wd_incr_style="constant",
        )

    def _wire_megatron_hooks(self):
        """What megatron's schedules call back into: gradient finalisation, loss scaling, DDP sync control."""
        from megatron.core.distributed import finalize_model_grads

        c = self.tconfig
        c.finalize_model_grads_func = finalize_model_grads
        c.grad_scale_func = self.optimizer.scale_loss
        no_sync = [m.no_sync for m in self.model]
        c.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if self.cfg.parallel.overlap_grad_reduce:
            sync = [m.start_grad_sync for m in self.model]
            c.grad_sync_func = sync[0] if len(sync) == 1 else sync
        if self.cfg.parallel.overlap_param_gather:
            gather = [m.start_param_sync for m in self.model]
            c.param_sync_func = gather[0] if len(gather) == 1 else gather

    def attach_data(self, train_dataset, valid_dataset=None):
        self.train_data = train_dataset
        self.valid_data = valid_dataset

    def _build_checkpoint_manager(self, resume: Optional[ResumePoint]) -> Optional[CheckpointManager]:
        """A manager of this run's parts when it saves or resumes; restore with ``self.checkpoint.load()``."""
        if not (self.cfg.checkpoint.save_dir or resume):
            return None
        return CheckpointManager(self.cfg, model_parts=self.model, optimizer=self.optimizer,
                                 scheduler=self.scheduler, train_state=self.state, resume=resume)

    # ---------------------------------------------------------------------------------------------------------
    # Steps

    def _micro_batch_iterators(self, dataset, step: int):
        t = self.cfg.train
        chunks = len(self.model)
        # One iterator per model chunk: with virtual pipelining megatron reads each chunk's micro-batches separately.
        iters = []
        for _ in range(chunks):
            mb = MicroBatches(dataset, t.global_batch_size, t.micro_batch_size, self.dp_rank, self.dp_size,
                              start_step=step, device=self.device)
            iters.append(self._timed(mb.step_iterator()))
        return iters if chunks > 1 else iters[0], mb.micro_steps

    def _timed(self, iterator):
        """The iterator, with the time its batches take added to ``data_seconds``."""
        while True:
            begin = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                self.data_seconds += time.perf_counter() - begin
            yield batch

    def _run_schedule(self, dataset, step: int, forward_only: bool) -> torch.Tensor:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        t, m = self.cfg.train, self.cfg.model
        data, micro_steps = self._micro_batch_iterators(dataset, step)
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=data,
            model=self.model,
            num_microbatches=micro_steps,
            seq_length=m.seq_length,
            micro_batch_size=t.micro_batch_size,
            decoder_seq_length=m.seq_length,
            forward_only=forward_only,
        )
        return self._reduce_loss(losses)

    def _reduce_loss(self, losses) -> torch.Tensor:
        """[loss_sum, tokens] of the whole global batch, on every rank (one all-reduce over the world)."""
        from megatron.core import parallel_state as ps

        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and self.tp_rank == 0:
            for item in losses:
                total += item["lm loss"].to(total)
        dist.all_reduce(total)
        return total

    def train_step(self) -> Dict[str, float]:
        """One optimizer step. A step whose loss or gradient norm is NaN/inf (in any precision) is not applied,
        and neither is one the fp16 loss scaler rejects; the data position advances either way."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        step = self.state.iteration
        total = self._run_schedule(self.train_data, step, forward_only=False)
        loss = (total[0] / total[1].clamp(min=1)).item()
        nonfinite = not math.isfinite(loss)
        applied, grad_norm = False, None
        if not nonfinite:
            applied, grad_norm = step_if_finite(self.optimizer, self.cfg.optimizer.clip_grad,
                                                bf16_grads=self.cfg.train.pure_bf16)
            nonfinite = grad_norm is not None and not math.isfinite(grad_norm)
        if applied:
            self.scheduler.step(increment=1)
        else:
            self.state.skipped_iters += 1
        if nonfinite:
            self.state.nan_streak += 1
        elif applied:
            self.state.nan_streak = 0
        self.state.iteration += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size
        self.history.append(loss)
        if self.checkpoint is not None:
            self.checkpoint.note_step(step, applied)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        return {"loss": loss, "grad_norm": grad_norm, "skipped": not applied, "nonfinite": nonfinite}

    def _stop_on_nan_streak(self, at_end: bool = False) -> None:
        """Stop once more than train.max_nan_skips steps in a row were non-finite (or the run ends inside such a
        streak): the weights before the streak are the last that trained; nothing from inside it is saved."""
        t, streak = self.cfg.train, self.state.nan_streak
        if not streak or (streak <= t.max_nan_skips and not at_end):
            return
        first = self.state.iteration - streak + 1
        where = (self.checkpoint.fall_back() if self.checkpoint is not None
                 else "; nothing was saved (no checkpoint.save_dir). Fix: rerun with a lower optimizer.lr or a "
                      "positive optimizer.clip_grad")
        ended = "the run ended inside the streak" if at_end else f"train.max_nan_skips={t.max_nan_skips}"
        raise TrainingStopped(
            f"{streak} steps in a row had a NaN/inf loss or gradient norm (iterations {first}-"
            f"{self.state.iteration}, {ended}) and were skipped; stopped without saving{where}")

    @torch.no_grad()
    def evaluate(self) -> Optional[Dict[str, float]]:
        if self.valid_data is None or self.cfg.train.eval_iters == 0:
            return None
        for chunk in self.model:
            chunk.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for k in range(self.cfg.train.eval_iters):  # the same validation samples at every evaluation
            total += self._run_schedule(self.valid_data, k, forward_only=True)
        for chunk in self.model:
            chunk.train()
        loss = (total[0] / total[1].clamp(min=1)).item()
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    # ---------------------------------------------------------------------------------------------------------
    # The loop

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (stop decisions must be collective)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _log_header(self):
        cfg = self.cfg
        n = count_parameters(cfg.model)
        self.sink.message(
            f"cola-train: {cfg.model.arch} model, {n.total / 1e6:.1f}M parameters, "
            f"{self.flops_per_token / 1e9:.3f} GFLOP/token (training), world_size={self.world_size} "
            f"TP={cfg.parallel.tensor_parallel} PP={cfg.parallel.pipeline_parallel} DP={self.dp_size}"
            + (f" VP={cfg.parallel.virtual_pipeline}" if cfg.parallel.virtual_pipeline else ""))

    def _start_run(self) -> None:
        """The run record of this start or resume (metrics.jsonl and TensorBoard) and what resume does."""
        from cola_megatron.training.checkpoint.state import current_layout

        cfg, it, total = self.cfg, self.state.iteration, self.cfg.train.train_iters
        if not self.state.run_id:  # a fresh start (or a checkpoint from before run ids): name the run once
            ids = [metrics.new_run_id() if self.rank == 0 else None]
            dist.broadcast_object_list(ids, src=0)
            self.state.run_id = ids[0]
        hosts: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(hosts, socket.gethostname())
        resumed_from = self.checkpoint.resume_path if self.checkpoint is not None else None
        config_yaml = cfg.to_yaml()
        record = {
            "iteration": it,
            "timestamp": metrics.utc_timestamp(),
            "run_id": self.state.run_id,
            "resumed_iteration": it,
            "resumed_from": resumed_from,
            "train_iters": total,
            "config_hash": metrics.config_hash(config_yaml),
            "layout": {**current_layout(), "world_size": self.world_size},
            "versions": metrics.software_versions(),
            "hosts": len(set(hosts)),
            "device": metrics.device_name(self.device),
        }
        versions = " ".join(f"{k} {v}" for k, v in record["versions"].items())
        self.sink.start_run(record, config_yaml,
                            f"cola-train: run {record['run_id']} | config {record['config_hash']} | {versions} | "
                            f"{record['hosts']} host{'s' if record['hosts'] > 1 else ''}, {record['device']}")
        if self.sink.appended_to_earlier and not resumed_from:
            self.sink.message(f"cola-train: {cfg.logging.log_dir}/metrics.jsonl holds an earlier run; this run's "
                              "records follow its own run record (cola-compare reads the last run)")
        if resumed_from:
            self.sink.message(f"cola-train: resumed from {resumed_from}: {it} of {total} iterations done"
                              + (f", {total - it} to go" if it < total else ""))

    def _nothing_left(self) -> None:
        t = self.cfg.train
        iters = max(2 * t.train_iters, self.state.iteration + t.train_iters)
        more = f"train.train_iters={iters}"
        longer = dataclasses.replace(self.cfg, train=dataclasses.replace(t, train_iters=iters))
        if schedule_differences(self.cfg, longer):
            # The resume would be refused for the schedule a longer run changes (a decay length that follows
            # train_iters): keep the finished one; checkpoint.scheduler_from=config would stretch it instead.
            more += " checkpoint.scheduler_from=checkpoint"
        self.sink.message(
            f"cola-train: nothing left to train: the run is at iteration {self.state.iteration} and "
            f"train.train_iters={t.train_iters}. To train on, raise train.train_iters (e.g. {more}); to start a "
            "new run, choose a new checkpoint.save_dir")

    def _validate_and_log(self) -> Optional[Dict[str, float]]:
        """Validate, and log the result with how long it took."""
        self._sync_device()
        begin = time.monotonic()
        result = self.evaluate()
        self._sync_device()
        seconds = time.monotonic() - begin
        if result is None:
            return None
        it = self.state.iteration
        tokens = it * self.tokens_per_step
        record = {"iteration": it, "timestamp": metrics.utc_timestamp(), "tokens": tokens,
                  "flops": tokens * self.flops_per_token, **result, "seconds": seconds}
        self.sink.log("valid", record, f"{metrics.console_prefix(record['timestamp'])} validation at iter {it}: "
                                       f"loss {result['loss']:.4f} | perplexity {result['ppl']:.2f} | "
                                       f"{seconds:.2f} s")
        return result

    def _not_training(self, action, *args, **kwargs) -> float:
        """Run an evaluation or checkpoint action; returns the seconds it took (left out of the throughput)."""
        self._sync_device()
        begin = time.monotonic()
        action(*args, **kwargs)
        self._sync_device()
        return time.monotonic() - begin

    def _checkpoint(self, action, *args, **kwargs) -> float:
        """Run a checkpoint action (maybe_save / finish), log a save with its duration; returns the seconds."""
        before = self.checkpoint.last_saved_iteration
        self._sync_device()
        begin = time.monotonic()
        action(*args, **kwargs)
        seconds = time.monotonic() - begin
        it = self.state.iteration
        if self.checkpoint.last_saved_iteration == it and before != it:
            from cola_megatron.training.checkpoint import checkpoint_name

            asynchronous = self.cfg.checkpoint.async_save
            record = {"iteration": it, "timestamp": metrics.utc_timestamp(), "seconds": seconds,
                      "path": os.path.join(self.cfg.checkpoint.save_dir, checkpoint_name(it)),
                      "async": asynchronous}
            self.sink.log("checkpoint", record,
                          f"{metrics.console_prefix(record['timestamp'])} checkpoint at iter {it}: {seconds:.2f} s"
                          + (" (async: the write goes on in the background)" if asynchronous else ""))
        return seconds

    def _train_record(self, it: int, now: float, started: float, first: int, interval: "_Interval",
                      grad_norm: float, peak: Optional[float]) -> Dict:
        """One interval's metrics. Rates are over its training time: evaluation and checkpoint time are out."""
        t = self.cfg.train
        wall = now - interval.start
        train_s = max(wall - interval.excluded, 1e-9)
        steps = max(interval.steps, 1)
        tokens = it * self.tokens_per_step
        finite = [x for x in interval.losses if math.isfinite(x)]
        fp16 = t.mixed_precision and t.precision == "fp16"
        return {
            "iteration": it,
            "timestamp": metrics.utc_timestamp(),
            "tokens": tokens,
            "flops": tokens * self.flops_per_token,
            "loss": sum(finite) / len(finite) if finite else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "elapsed_s": now - started,
            "interval_s": wall,
            "excluded_s": interval.excluded,
            "train_s": train_s,
            "ms_per_iter": 1000.0 * train_s / steps,
            "data_ms_per_iter": 1000.0 * interval.data / steps,
            # The segment's wall time per iteration so far (evaluations and saves recur, so they count here).
            "eta_s": (t.train_iters - it) * (now - started) / max(it - first, 1),
            # tokens_per_s, tokens_per_s_per_gpu, tflops_per_gpu, mfu and hfu (hardware FLOPs: recomputation counted)
            **throughput(interval.steps * self.tokens_per_step, train_s, self.world_size, self.flops_per_token,
                         peak, self.hardware_flops_per_token),
            **peak_memory(self.device).record(),
            "skipped": self.state.skipped_iters,
            "loss_scale": float(self.optimizer.get_loss_scale()) if fp16 else None,
        }

    def train(self) -> str:
        """Run until train_iters, a stop signal or the wall-clock limit. Returns why it stopped."""
        cfg = self.cfg
        t = cfg.train
        if self.train_data is None:
            raise RuntimeError("attach_data() before train()")
        self._log_header()
        self._start_run()
        first = self.state.iteration
        if first >= t.train_iters:
            self._nothing_left()
            self.sink.close()
            return "nothing to do"
        stop = _StopSignal()
        profiler = StepProfiler(cfg, self.rank, self.device)
        profile_reported = False
        peak = peak_tflops(cfg.logging.peak_tflops, self.device)
        started = time.monotonic()
        interval = _Interval(started)
        reason = "finished"
        try:
            while self.state.iteration < t.train_iters:
                profiler.before_step(self.state.iteration + 1)
                data_before = self.data_seconds
                result = self.train_step()
                it = self.state.iteration
                profiler.after_step(it)
                interval.data += self.data_seconds - data_before
                interval.losses.append(result["loss"])
                interval.steps += 1
                if it % cfg.logging.log_interval == 0 or it == t.train_iters:
                    self._sync_device()
                    record = self._train_record(it, time.monotonic(), started, first, interval,
                                                result["grad_norm"], peak)
                    where = None if profile_reported else window_finished(cfg, it, first)
                    if where:
                        record["profile_dir"] = where
                        profile_reported = True
                    self.sink.log("train", record, format_train_line(record, t.train_iters))
                    interval = _Interval(time.monotonic())
                self._stop_on_nan_streak()
                in_streak = self.state.nan_streak > 0
                if t.eval_interval and it % t.eval_interval == 0 and it < t.train_iters:
                    interval.excluded += self._not_training(self._validate_and_log)
                if self.checkpoint is not None:
                    interval.excluded += self._checkpoint(self.checkpoint.maybe_save, allowed=not in_streak)
                timed_out = t.exit_duration_minutes is not None and (time.monotonic() - started) / 60 >= t.exit_duration_minutes
                if self._agree(stop.received is not None or timed_out):
                    reason = "signal" if stop.received is not None else "time limit"
                    break
            in_streak = self.state.nan_streak > 0
            if reason == "finished":
                self._stop_on_nan_streak(at_end=True)
            final = self._validate_and_log() if reason == "finished" else None
            if self.checkpoint is not None:
                self._checkpoint(self.checkpoint.finish, allowed=not in_streak)  # a signal inside a streak: no save
            if final is not None and not math.isfinite(final["loss"]):
                raise TrainingStopped(
                    f"the final validation loss is {final['loss']} although every applied step was finite. Fix: "
                    "rerun with a lower optimizer.lr or a positive optimizer.clip_grad")
            if reason != "finished":
                self.sink.message(f"cola-train: stopped at iteration {self.state.iteration} ({reason})")
        finally:
            profiler.close()
            stop.restore()
            self.sink.close()
        return reason

    def _sync_device(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
