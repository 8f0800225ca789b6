"""The step-time model against measured H100 kernels (cola_megatron/cost/kernel_data/h100.jsonl).

The GEMM model is fitted to the file's ``gemm`` rows alone; its ``block`` rows (one LLaMA block's forward and
backward, dense and CoLA, 1B and 7B shapes) and ``tpsim`` rows (the 7B and 1B blocks split as tensor parallelism
splits them, one rank's compute) are the check. Everything here is arithmetic on the file: no timing runs.
"""

from __future__ import annotations

import json
import math

import pytest

from cola_megatron.config import ModelConfig
from cola_megatron.cost import kernels
from cola_megatron.cost.compute import layer_seconds
from cola_megatron.cost.gemms import layer_gemms

ROWS = [json.loads(line) for line in open(kernels.shipped_kernel_data())]
MODEL = kernels.shipped_model()
SHAPES = {"1B": dict(hidden_size=2048, ffn_hidden_size=5461, num_attention_heads=32, rank=512),
          "7B": dict(hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, rank=1024)}


def _rows(probe):
    return [r for r in ROWS if r["probe"] == probe]


def _id(r):
    return "-".join(str(r.get(k)) for k in ("size", "kind", "seq", "mb", "tp", "m", "k", "n") if k in r)


@pytest.mark.parametrize("row", _rows("gemm"), ids=_id)
def test_every_gemm_row_within_10_percent(row):
    predicted = MODEL.gemm_us(row["m"], row["k"], row["n"])
    assert abs(predicted / row["us"] - 1) <= 0.10, (predicted, row)


def _arch(kind):
    return "dense" if kind == "dense" else "cola"


@pytest.mark.parametrize("row", _rows("block"), ids=_id)
def test_every_block_row_within_15_percent(row):
    """The block as the probe ran it: SwiGLU with SiLU (only_lr_act false), bf16, TP1, no recomputation."""
    m = ModelConfig(arch=_arch(row["kind"]), seq_length=row["seq"], **SHAPES[row["size"]])
    predicted_ms = layer_seconds(MODEL, m, row["mb"]).total * 1e3
    assert abs(predicted_ms / row["ms"] - 1) <= 0.15, (predicted_ms, row)


# The tpsim rows give tokens (16384) and sizes, not the sequence or the 1B ffn; both follow from the rows themselves:
# their comm_MB is (11d + 5f) · 2 bytes per token for `pair` at d=2048 only with f = 5504 (the 1B ffn padded to 128,
# and what TP2 of megatron needs, an even ffn), and the 7B dense tpsim block takes 2.8 ms more than the same block
# at sequence 256 (the block rows), the attention core's growth to sequence 2048.
TPSIM_SEQ = 2048
TPSIM_FFN = {"1B": 5504, "7B": 11008}


def _tpsim_ms(row) -> float:
    m = ModelConfig(arch=_arch(row["kind"]), seq_length=TPSIM_SEQ,
                    **{**SHAPES[row["size"]], "ffn_hidden_size": TPSIM_FFN[row["size"]]})
    batch, tp = row["tokens"] // TPSIM_SEQ, row["tp"]
    if row["kind"] != "pair":  # megatron's per-rank shapes with sequence parallelism
        return layer_seconds(MODEL, m, batch, tp, sequence_parallel=True).total * 1e3
    # The literal pairing all-reduces each projection's full-width output (its comm_MB counts 5d + 2f forward), so
    # every rank runs the attention core, norms and GLU at full width; only the GEMMs are split.
    split = layer_seconds(MODEL, m, batch, tp, scheme="pair")
    whole = layer_seconds(MODEL, m, batch, 1, scheme="pair")
    return (sum(split.gemms.values()) + whole.attention + whole.elementwise) * 1e3


def test_tpsim_shapes_are_what_the_rows_say():
    for row in _rows("tpsim"):
        if row["kind"] == "pair" and row["tp"] == 2:
            d, f = SHAPES[row["size"]]["hidden_size"], TPSIM_FFN[row["size"]]
            assert math.isclose(row["comm_MB"] * 1e6 / row["tokens"], (11 * d + 5 * f) * 2, rel_tol=1e-3)


@pytest.mark.parametrize("row", _rows("tpsim"), ids=_id)
def test_every_tpsim_row_within_15_percent(row):
    predicted_ms = _tpsim_ms(row)
    assert abs(predicted_ms / row["compute_ms"] - 1) <= 0.15, (predicted_ms, row)


def test_the_fit_reads_the_gemm_rows_alone(tmp_path):
    """A file with the gemm rows only gives the same model; dropping a gemm row changes it."""
    only_gemms = tmp_path / "gemms.jsonl"
    only_gemms.write_text("".join(json.dumps(r) + "\n" for r in ROWS if r["probe"] in ("env", "gemm")))
    assert kernels.load_kernel_model(str(only_gemms)).gemm == MODEL.gemm
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(json.dumps(r) + "\n" for r in ROWS if r["probe"] in ("env", "gemm"))
                     .replace(json.dumps(_rows("gemm")[-1]) + "\n", ""))
    assert kernels.load_kernel_model(str(fewer)).gemm != MODEL.gemm


def test_misaligned_widths_are_the_slow_class():
    """The H100 data: a 5461-wide GEMM runs at about a fifth of the aligned 5504-wide one's throughput."""
    slow, fast = MODEL.gemm_tflops(16384, 2048, 5461), MODEL.gemm_tflops(16384, 2048, 5504)
    assert slow < 150 < 600 < fast


def test_another_gpu_is_uncalibrated_and_scaled():
    b200 = kernels.load_kernel_model(None, peak_tflops=2250.0)
    assert not b200.calibrated and MODEL.calibrated
    assert "UNCALIBRATED" in b200.describe() and "UNCALIBRATED" not in MODEL.describe()
    assert math.isclose(MODEL.gemm_us(16384, 4096, 4096) - MODEL.gemm.launch_us,
                        (b200.gemm_us(16384, 4096, 4096) - b200.gemm.launch_us) * 2250.0 / 989.0, rel_tol=1e-9)


def test_gemm_list_takes_kv_width_from_the_config():
    """Grouped-query attention narrows the k and v GEMMs only."""
    mha = ModelConfig(arch="dense", hidden_size=1024, num_attention_heads=16, ffn_hidden_size=2816)
    gqa = ModelConfig(arch="dense", hidden_size=1024, num_attention_heads=16, num_query_groups=4,
                      ffn_hidden_size=2816)
    (qkv_mha, *rest_mha), (qkv_gqa, *rest_gqa) = layer_gemms(mha, 256), layer_gemms(gqa, 256)
    assert (qkv_mha.n, qkv_gqa.n) == (1024 + 2 * 1024, 1024 + 2 * 256) and rest_mha == rest_gqa


def test_data_without_misaligned_rows_keep_the_h100_ratio(tmp_path):
    aligned = tmp_path / "aligned.jsonl"
    aligned.write_text("".join(json.dumps(r) + "\n" for r in _rows("gemm") if kernels.is_aligned(r["m"], r["k"], r["n"])))
    model = kernels.load_kernel_model(str(aligned))
    assert not model.misaligned_measured and "not measured" in model.describe()
    assert model.gemm.aligned_tflops == pytest.approx(MODEL.gemm.aligned_tflops, rel=0.05)
    assert model.gemm.misaligned_tflops / model.gemm.aligned_tflops == pytest.approx(
        MODEL.gemm.misaligned_tflops / MODEL.gemm.aligned_tflops)
