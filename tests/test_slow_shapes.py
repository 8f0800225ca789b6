"""Slow GEMM widths are named before a run pays for them: in cola-train --dry-run, at a run's start-up (before
anything is built) and in cola-plan, with the predicted cost and the fix."""

from __future__ import annotations

import pytest

from cola_megatron import train
from cola_megatron.config import load_config
from cola_megatron.cost.shapes import slow_shapes

MOCK = ["data.mock=true", "data.tokenizer=null", "checkpoint.save_dir=null", "checkpoint.save_interval=0",
        "logging.log_dir=null"]
WARNING = "warning: model.ffn_hidden_size=5461 is not a multiple of 128"
FIX = "Fix: model.ffn_multiple_of=128"


def test_the_paper_1b_ffn_is_slow_and_padding_fixes_it():
    (shape,) = slow_shapes(load_config("configs/cola/llama_1b.yaml", MOCK))
    assert (shape.width, shape.padded, shape.misaligned) == (5461, 5504, True)
    assert shape.cost > 2.0  # the H100 data: a 5461-wide GEMM at about a fifth of an aligned one's speed
    assert slow_shapes(load_config("configs/cola/llama_1b.yaml", [*MOCK, "model.ffn_multiple_of=128"])) == []


def test_tile_waste_tensor_parallel_widths_and_tiny_models():
    # 7B at TP4: ffn/TP = 2752 fills 22 tiles of 128 (2816), a few percent, and the fix pads ffn for TP4.
    (shape,) = slow_shapes(load_config("configs/cola/llama_7b.yaml",
                                       [*MOCK, "parallel.tensor_parallel=4", "parallel.sequence_parallel=true"]))
    assert shape.width == 2752 and not shape.misaligned and 0.01 <= shape.cost < 0.1
    assert "model.ffn_multiple_of=512" in shape.fix
    # A test-sized model's GEMMs are kernel launches: an unaligned rank of 16 costs nothing, and is not reported.
    tiny = load_config(None, ["model.hidden_size=64", "model.ffn_hidden_size=128", "model.rank=16",
                              "model.num_attention_heads=4", "model.vocab_size=512", "model.seq_length=32",
                              "train.micro_batch_size=2", "train.global_batch_size=4", *MOCK])
    assert slow_shapes(tiny) == []


@pytest.mark.parametrize("pad", [False, True], ids=["paper-shape", "ffn_multiple_of=128"])
def test_dry_run_warns_for_the_paper_1b_config(pad, capsys):
    extra = ["model.ffn_multiple_of=128"] if pad else []
    assert train.main(["--config", "cola/llama_1b.yaml", "--dry-run", *MOCK, *extra]) == 0
    err = capsys.readouterr().err
    assert (WARNING in err and FIX in err) == (not pad), err
    assert ("ffn_hidden_size" in err) == (not pad)


class _StopAfterStartUp(Exception):
    pass


@pytest.mark.parametrize("pad", [False, True], ids=["paper-shape", "ffn_multiple_of=128"])
def test_a_run_warns_at_start_up(pad, capsys, monkeypatch):
    """The run's up-front checks print the warning before the checkpoint, process groups or model are touched
    (stopped there: a 1B model is no CPU test)."""
    from cola_megatron.training import checkpoint
    from cola_megatron.training.run import run

    def stop(cfg):
        raise _StopAfterStartUp

    monkeypatch.setattr(checkpoint, "plan_resume", stop)
    cfg = load_config("configs/cola/llama_1b.yaml", [*MOCK, *(["model.ffn_multiple_of=128"] if pad else [])],
                      world_size=1)
    with pytest.raises(_StopAfterStartUp):
        run(cfg)
    err = capsys.readouterr().err
    assert (f"cola-train: {WARNING}" in err and FIX in err) == (not pad), err
