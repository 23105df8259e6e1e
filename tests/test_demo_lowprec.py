"""The low-precision section of ``descend demo`` (descend.cli.lowprec): ``--only lowprec
--quick`` (one seed, 20 epochs, about 7 s), its table, figure and JSON.

What is asserted of the numbers is what holds with margin (measured at seed 0: bfloat16
rounded to nearest ends with 2.6× float32's train loss, every other configuration within
1.1×); the 3-seed claims are tests/test_precision_quality.py's."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from descend import cli
from descend.cli import demo, lowprec

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

NAMES = [c.name for c in lowprec.CONFIGS]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("lowprec")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["demo", "--only", "lowprec", "--quick", "--out", str(out), "--no-progress"])
    assert code == 0
    return out, stdout.getvalue()


def _runs(out: Path) -> dict[str, dict]:
    doc = json.loads((out / "lowprec.json").read_text(encoding="utf-8"))
    assert doc["settings"]["epochs"] == lowprec.EPOCHS and doc["settings"]["seeds"] == [0]
    return {r["name"]: r for r in doc["runs"]}


def test_files_are_written_and_only_the_section_ran(quick: tuple[Path, str]) -> None:
    out, _ = quick
    png = (out / "lowprec.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not (out / "demo.png").exists() and not (out / "results.json").exists()
    assert set(lowprec.OUTPUTS) <= set(demo.OUTPUTS)


def test_table_has_every_configuration_with_finite_numbers(quick: tuple[Path, str]) -> None:
    out, stdout = quick
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("run "))
    body = lines[head + 2 : head + 2 + len(NAMES)]
    assert [line.split()[0] for line in body] == NAMES
    for line in body:
        assert "nan" not in line and "inf" not in line
    runs = _runs(out)
    assert list(runs) == NAMES
    for rec in runs.values():
        assert math.isfinite(rec["train_loss"]) and 0 < rec["train_loss"] < 0.5
        assert 0.9 < rec["test_acc"] <= 1 and math.isfinite(rec["loss_ratio"]) and math.isfinite(rec["acc_diff"])
        assert len(rec["curves"]["train_loss"]) == lowprec.EPOCHS + 1
    assert runs["float32"]["loss_ratio"] == 1.0 and runs["float32"]["acc_diff"] == 0.0


def test_nearest_bfloat16_loses_what_the_others_keep(quick: tuple[Path, str]) -> None:
    runs = _runs(quick[0])
    nearest = runs["bf16-nearest"]["train_loss"]
    assert nearest > 1.5 * runs["float32"]["train_loss"]
    for name in ("bf16-state", "8bit-state", "bf16-compensated", "bf16-stochastic"):
        assert runs[name]["train_loss"] < nearest, name
        assert abs(runs[name]["acc_diff"]) <= 0.02, name


def test_state_bytes_in_the_table(quick: tuple[Path, str]) -> None:
    runs = _runs(quick[0])
    assert 8.0 < runs["float32"]["state_bytes_per_param"] < 8.01  # (+ the step counts)
    assert runs["bf16-state"]["state_bytes_per_param"] <= 4.1
    assert runs["8bit-state"]["state_bytes_per_param"] <= 2.1
    assert 6.0 < runs["bf16-compensated"]["state_bytes_per_param"] < 6.01


def test_another_only_skips_the_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(lowprec, "section", lambda *a, **k: pytest.fail("the low-precision section ran"))
    assert cli.main(["demo", "--epochs", "1", "--only", "sgd-wd", "--out", str(tmp_path), "--no-progress"]) == 0
    assert not (tmp_path / "lowprec.png").exists()


def test_both_run_when_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    calls = []
    monkeypatch.setattr(lowprec, "section", lambda out, seed, quick, **k: calls.append((out, seed, quick)))
    assert cli.main(["demo", "--epochs", "1", "--only", "sgd-wd,lowprec", "--seed", "5", "--out", str(tmp_path),
                     "--no-progress"]) == 0
    assert calls == [(str(tmp_path), 5, False)] and (tmp_path / "demo.png").exists()


def test_a_seed_gives_the_same_stochastic_run_whatever_the_global_generator_did() -> None:
    """The stochastic row is reproducible: the run's seed also seeds the rounding's generator
    (seeded from torch.initial_seed(), which is random per process unless set)."""
    import torch

    from descend.cli import digits

    data = digits.load_digits(torch.float32)
    config = next(c for c in lowprec.CONFIGS if c.name == "bf16-stochastic")
    first = lowprec.run_config(config, data, [0], epochs=2)
    torch.manual_seed(12345)  # (what another section, or the user, did before)
    second = lowprec.run_config(config, data, [0], epochs=2)
    assert first.per_seed == second.per_seed
    assert first.curves["train_loss"] == second.curves["train_loss"]
