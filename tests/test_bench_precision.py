"""The low-precision rows of ``descend bench`` (descend.cli.bench_precision), on tiny sizes:
the bytes of state per parameter are counted exactly (every tensor in ``optimizer.state``,
step counts and the stochastic rounding's generator state included), and every row gets a
finite time ratio against its reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import descend
from descend.cli import bench_precision as bp

SHAPES = [(1024,), (16, 16)]  # 1280 parameters; the first 4 blocks of 256, the second 1
NUMEL = 1280


@pytest.fixture(scope="module")
def rows() -> dict[str, bp.PrecisionRow]:
    out = bp.precision_rows(param_shapes=SHAPES, steps=3, warmup=1, min_seconds=0.0)
    return {r.label: r for r in out}


def test_every_row_is_there_with_a_finite_ratio(rows: dict[str, bp.PrecisionRow]) -> None:
    assert list(rows) == [label for label, *_ in bp.configurations()]
    assert {"8bit state", "bf16 state", "bf16 params compensated", "bf16 params stochastic"} <= set(rows)
    for r in rows.values():
        assert r.numel == NUMEL and r.rounds >= 3 and r.ms > 0 and math.isfinite(r.ms)
        if r.reference is None:
            assert r.ratio is None and r.label.startswith("torch fused")
        else:
            assert r.reference in rows and rows[r.reference].reference is None
            assert r.ratio is not None and math.isfinite(r.ratio) and r.ratio > 0
            assert r.ratio_met is (None if r.ratio_target is None else r.ratio <= r.ratio_target)
    assert rows["bf16 params compensated"].reference == bp.REF_BF16
    assert rows["8bit state"].reference == rows["bf16 state"].reference == bp.REF_FP32
    assert rows["8bit state"].ratio_target == 2.0 and rows["bf16 state"].ratio_target == 1.3
    assert rows["bf16 params compensated"].ratio_target == 1.5


def test_float32_adam_keeps_8_bytes_per_parameter(rows: dict[str, bp.PrecisionRow]) -> None:
    for label in (bp.REF_FP32, "descend AdamW, float32"):
        r = rows[label]
        assert r.element_bytes_per_param == 8.0
        assert r.bytes_per_param == (8 * NUMEL + 4 * len(SHAPES)) / NUMEL  # + one float32 step count per tensor


def test_low_precision_state_is_within_its_bounds(rows: dict[str, bp.PrecisionRow]) -> None:
    bf16, q8 = rows["bf16 state"], rows["8bit state"]
    assert bf16.element_bytes_per_param == 4.0 and bf16.bytes_per_param <= 4.1 and bf16.bytes_met
    # 1 byte per element and moment, and one float32 scale per 256 elements (5 blocks) per moment
    assert q8.element_bytes_per_param == (2 * NUMEL + 2 * 4 * 5) / NUMEL
    assert q8.bytes_per_param <= 2.1 and q8.bytes_met
    assert rows["bf16 params compensated"].element_bytes_per_param == 6.0  # m, v and the compensation in bf16
    stochastic = rows["bf16 params stochastic"]
    assert stochastic.element_bytes_per_param == 4.0
    assert stochastic.bytes_per_param > 4.0 + 4 * len(SHAPES) / NUMEL  # the generator's state, amortized


def test_state_bytes_counts_generators_and_scalars() -> None:
    p = [torch.nn.Parameter(torch.zeros(300, dtype=torch.bfloat16))]
    opt = descend.AdamW(p, rounding="stochastic", warn=False)
    p[0].grad = torch.ones_like(p[0])
    opt.step()
    counted = bp.state_bytes(opt)
    g = opt._precision.generators.on(p[0].device).get_state()
    assert counted == {"elements": 2 * 300 * 2, "scalars": 4, "generators": g.numel(), "params": 300}


def test_table_says_whether_each_target_is_met(rows: dict[str, bp.PrecisionRow]) -> None:
    text = bp.precision_table(list(rows.values()))
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    line = next(x for x in lines if x.startswith("| 8bit state |"))
    assert "≤ 2.1: met" in line and ("≤ 2×: met" in line or "≤ 2×: missed" in line)
    assert "(reference)" in next(x for x in lines if x.startswith(f"| {bp.REF_FP32} |"))


def test_main_prints_the_table_and_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bp, "shapes", lambda quick=False: SHAPES)
    path = tmp_path / "p.json"
    assert bp.main(["--quick", "--steps", "2", "--warmup", "1", "--min-seconds", "0", "--threads", "1",
                    "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| bf16 params stochastic |" in out
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert [r["label"] for r in doc["rows"]] == [label for label, *_ in bp.configurations()]
    assert doc["rows"][0]["bytes_per_param"] == (8 * NUMEL + 4 * len(SHAPES)) / NUMEL
    assert bp.main(["--steps", "0"]) == 2


def test_the_in_place_kahan_write_back_equals_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit's write-back into θ and its compensation (no 16-bit intermediates) gives the bits
    of ``_split``, compiled and eager, on a ragged size."""
    from descend import precision

    n = (precision.COMPILE_NUMEL or 1 << 16) + 77
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)
    for compile_numel in (1 << 16, 0):
        monkeypatch.setattr(precision, "COMPILE_NUMEL", compile_numel)
        for dtype in (torch.bfloat16, torch.float16):
            new, rest = precision._split(w, dtype)
            param = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
            compensation = torch.zeros(n, dtype=dtype)
            with torch.no_grad():
                precision._kernel(precision._split_into, n)(w, param, compensation)
            assert torch.equal(param.detach().view(torch.int16), new.view(torch.int16))
            assert torch.equal(compensation.view(torch.int16), rest.view(torch.int16))


@pytest.mark.parametrize("flat", [False, True])
def test_a_compensated_step_compiled_equals_eager(monkeypatch: pytest.MonkeyPatch, flat: bool) -> None:
    """End to end, on parameters large enough for the compiled kernels (flat: views into one buffer).
    The conversions of the general path only: the one-pass step is compared with it in
    tests/test_precision_fused.py."""
    from descend import precision, precision_fused

    monkeypatch.setattr(precision_fused, "ENABLED", False)

    def run(compile_numel: int) -> list[torch.Tensor]:
        monkeypatch.setattr(precision, "COMPILE_NUMEL", compile_numel)
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in ((300, 257), (70001,), (7,))]
        opt = descend.AdamW(params, lr=1e-3, weight_decay=1e-2, rounding="compensated", flat=flat)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).bfloat16()
            opt.step()
        return [t.view(torch.int16) for p in params for t in (p.detach(), opt.state[p]["compensation"])]

    for a, b in zip(run(1 << 16), run(0)):
        assert torch.equal(a, b)


def test_descend_bench_sets_precision_prints_the_rows_and_writes_them_to_json(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The rows are part of ``descend bench`` (a default set), table and JSON."""
    from descend import cli
    from descend.cli import bench

    assert "precision" in bench.SETS
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--sets", "precision", "--quick", "--steps", "1", "--warmup", "1",
                     "--min-seconds", "0", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "Low precision: AdamW on" in text and "| 8bit state |" in text
    doc = json.loads(out.read_text())
    labels = [r["label"] for r in doc["precision_rows"]]
    assert labels == [label for label, *_ in bp.configurations()]
    assert all(r["bytes_per_param"] > 0 for r in doc["precision_rows"])
