"""The Muon rows of ``descend bench`` (``--sets muon``): descend.Muon against torch.optim.Muon.

Tiny shapes and few rounds: the rows are produced and their ratios are finite positive numbers
(the timings themselves are what the benchmark reports, not what a test can check)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from descend import cli
from descend.cli import bench, bench_muon

TINY = {"gpt2-matrices": ("tiny GPT-2-like", [(16, 48), (16, 16), (16, 64), (64, 16)]),
        "many-small-matrices": ("tiny many-small", [(8, 8)] * 12)}


def _tiny_shapes(name: str, quick: bool = False) -> tuple[str, bench.Shapes]:
    return TINY[name]


def _check_row(row: bench_muon.MuonRow, label: str, matrices: int, target: float) -> None:
    assert (row.set, row.matrices, row.target) == (label, matrices, target)
    for x in (row.torch_ms, row.descend_ms, row.ratio):
        assert math.isfinite(x) and x > 0
    assert math.isfinite(row.spread) and row.spread >= 0
    assert row.rounds >= 2
    assert row.meets_target == (row.ratio >= target)


def test_the_sets_are_gpt2_hidden_matrices_and_many_small_ones() -> None:
    label, shapes = bench_muon.muon_shapes("gpt2-matrices")
    assert len(shapes) == 48 and set(shapes) == {(768, 2304), (768, 768), (768, 3072), (3072, 768)}
    assert len(bench_muon.muon_shapes("gpt2-matrices", quick=True)[1]) == 8
    assert bench_muon.muon_shapes("many-small-matrices")[1] == [(64, 64)] * 256
    with pytest.raises(ValueError, match="Invalid set"):
        bench_muon.muon_shapes("nope")


def test_bench_muon_produces_one_row_per_set_with_finite_positive_ratios() -> None:
    logged: list[str] = []
    rows = bench_muon.bench_muon(steps=2, warmup=1, min_seconds=0.0, shapes=TINY, log=logged.append)
    assert len(rows) == 2
    _check_row(rows[0], "tiny GPT-2-like", 4, 1.0)
    _check_row(rows[1], "tiny many-small", 12, 5.0)
    assert any("rounds" in m for m in logged)
    table = bench_muon.muon_table(rows)
    assert table.count("\n") == 3 and "tiny many-small" in table and "≥ 5×" in table


def test_descend_bench_sets_muon_prints_the_rows_and_writes_them_to_json(
        tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_muon, "muon_shapes", _tiny_shapes)
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--sets", "muon", "--quick", "--steps", "2", "--warmup", "1", "--min-seconds", "0",
                     "--threads", "1", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "descend.Muon against torch.optim.Muon" in printed
    assert "| tiny GPT-2-like | 4 |" in printed and "| tiny many-small | 12 |" in printed
    assert "Triad bandwidth" not in printed  # no main comparison ran
    doc = json.loads(out.read_text())
    assert doc["rows"] == [] and [r["set"] for r in doc["muon_rows"]] == ["tiny GPT-2-like", "tiny many-small"]
    for r in doc["muon_rows"]:
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0


def test_muon_is_opt_in_and_named_sets_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    assert "muon" not in parser.parse_args(["bench"]).sets.split(",")
    assert parser.parse_args(["bench", "--sets", "overhead,muon"]).sets == "overhead,muon"
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--sets", "muons"])
    assert info.value.code == 2 and "muon" in capsys.readouterr().err
