"""``descend demo --quick`` into a temporary directory, and what its outputs must show.

Tolerance for "the same weights": every run is in float64 from the same initial weights
with the same minibatches. SGD on loss + c·Σw² and SGD with weight_decay = 2c compute the
same update, g + 2c·θ, in a different order of floating-point operations (autograd versus
the optimizer), and so do plain SGD's coupled and decoupled decay, so they may differ by
rounding (~1e-16 relative per step); over the quick run's 176 steps of a smoothly trained
network that stays far below 1e-10 (the default run's 1320 steps end within 4e-15), while
the pairs that differ mathematically differ by more than 1e-3.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

import descend
from descend import cli
from descend.cli import demo, digits

SAME = 1e-10
DIFFERENT = 1e-3


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert code == 0
    return out, stdout.getvalue()


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "weights.pt", weights_only=True)


def test_files_are_written(quick: tuple[Path, str]) -> None:
    out, _ = quick
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    for name in ("results.json", "results.csv", "weights.pt"):
        assert (out / name).stat().st_size > 0


def test_table_has_every_configuration(quick: tuple[Path, str]) -> None:
    out, stdout = quick
    expected = [c.name for c in demo.configurations()]
    assert {"sgdm", "sgd-l2-loss", "sgd-wd", "sgd-decoupled", "sgdm-coupled", "sgdm-decoupled", "adam-l2", "adamw",
            "adamw-independent", "l1", "lbfgs"} <= set(expected)
    assert ("cg" in expected) == hasattr(descend, "CG")
    doc = _results(out)
    assert [r["name"] for r in doc["runs"]] == expected
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == expected
    table_names = [line.split()[0] for line in stdout.splitlines()[2 : 2 + len(expected)]]
    assert table_names == expected
    for rec in doc["runs"]:
        assert 0 < rec["train_loss"] < 2.5 and 0.5 < rec["test_acc"] <= 1 and rec["norm"] > 0
        assert rec["steps"] > 0 and rec["time_s"] >= 0
        if rec["name"] in ("lbfgs", "cg"):
            assert rec["passes"] >= demo.FULL_BATCH_PASSES or rec["objective_gap"] < 1e-6
        else:  # minibatch: 8 epochs of ceil(1347 / 64) = 22 steps
            assert rec["steps"] == 8 * 22 and rec["passes"] == 8
            assert len(rec["curves"]["test_acc"]) == 9
    assert doc["epochs"] == 8 and doc["seed"] == 0


def _max_diff(w: dict[str, torch.Tensor], a: str, b: str) -> float:
    return float((w[a] - w[b]).abs().max())


def test_l2_in_the_loss_is_sgd_weight_decay(quick: tuple[Path, str]) -> None:
    out, _ = quick
    w = _weights(out)
    assert w["sgd-wd"].dtype == torch.float64
    assert _max_diff(w, "sgd-l2-loss", "sgd-wd") <= SAME
    assert _max_diff(w, "sgd-l2-loss", "sgdm") > DIFFERENT  # and the L2 term did something


def test_without_momentum_decoupled_is_coupled(quick: tuple[Path, str]) -> None:
    # θ − lr·(g + λθ) = θ·(1 − lr·λ) − lr·g: the same rule, in another order of operations
    w = _weights(quick[0])
    assert _max_diff(w, "sgd-wd", "sgd-decoupled") <= SAME


def test_decoupled_is_not_coupled_with_momentum_and_adamw_is_not_adam_l2(quick: tuple[Path, str]) -> None:
    out, _ = quick
    w = _weights(out)
    assert _max_diff(w, "sgdm-coupled", "sgdm-decoupled") > DIFFERENT
    assert _max_diff(w, "adam-l2", "adamw") > DIFFERENT
    # the AdamW paper's decay with λ_paper = lr₀·λ is torch's AdamW with λ
    assert _max_diff(w, "adamw", "adamw-independent") <= SAME
    # and the comparisons in results.json agree with the weights
    comparisons = {(c["a"], c["b"]): c for c in _results(out)["comparisons"]}
    assert comparisons[("sgd-l2-loss", "sgd-wd")]["max_abs_diff"] == _max_diff(w, "sgd-l2-loss", "sgd-wd")
    assert comparisons[("adam-l2", "adamw")]["expected_equal"] is False


def test_l1_makes_exact_zeros(quick: tuple[Path, str]) -> None:
    out, _ = quick
    runs = {r["name"]: r for r in _results(out)["runs"]}
    assert runs["l1"]["zero_share"] > 0.05
    assert int((_weights(out)["l1"] == 0).sum()) > 0
    for name, rec in runs.items():
        if name != "l1":
            assert rec["zero_share"] == 0, name


def test_full_batch_rows_approach_scipys_optimum(quick: tuple[Path, str]) -> None:
    out, _ = quick
    doc = _results(out)
    optimum = doc["logistic_optimum"]
    for rec in doc["runs"]:
        if rec["name"] in ("lbfgs", "cg"):
            assert rec["objective"] >= optimum - 1e-9  # nobody beats the optimum
            assert rec["objective_gap"] < 1e-4 and math.isclose(rec["objective"] - optimum, rec["objective_gap"])
    assert doc["lbfgs"] == ("descend.LBFGS" if hasattr(descend, "LBFGS") else "torch.optim.LBFGS")


def _short_run(out: Path, seed: int) -> dict[str, torch.Tensor]:
    assert cli.main(["demo", "--epochs", "1", "--only", "sgd-wd,l1", "--seed", str(seed), "--out", str(out),
                     "--no-progress"]) == 0
    return _weights(out)


def test_seed_makes_it_deterministic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _short_run(tmp_path / "a", 3)
    b = _short_run(tmp_path / "b", 3)
    c = _short_run(tmp_path / "c", 4)
    assert set(a) == {"sgd-wd", "l1"}
    for name in a:
        assert torch.equal(a[name], b[name])
        assert not torch.equal(a[name], c[name])


def test_ctrl_c_keeps_finished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    real = demo._train_mlp
    calls = []

    def train(config, *args, **kwargs):  # the third run is interrupted
        calls.append(config.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(config, *args, **kwargs)

    monkeypatch.setattr(demo, "_train_mlp", train)
    code = cli.main(["demo", "--epochs", "1", "--only", "sgdm,sgd-wd,adam,adamw", "--out", str(tmp_path),
                     "--no-progress"])
    assert code == 130
    assert [r["name"] for r in _results(tmp_path)["runs"]] == ["sgdm", "sgd-wd"]
    assert set(_weights(tmp_path)) == {"sgdm", "sgd-wd"}
    assert (tmp_path / "demo.png").exists()
    assert "interrupted" in capsys.readouterr().err


# --- options and outputs checked before the work ---------------------------------------------


@pytest.mark.parametrize("taken", list(demo.OUTPUTS))
def test_an_output_name_taken_by_a_directory_is_one_line_exit_1_before_any_work(
        taken: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / taken).mkdir()
    monkeypatch.setattr(demo.digits, "load_digits", lambda *a, **k: pytest.fail("the demo started"))
    assert cli.main(["demo", "--epochs", "1", "--only", "sgd-wd", "--out", str(tmp_path), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"descend demo: error: cannot write {str(tmp_path / taken)!r}: "
                                         "it is a directory"]
    assert captured.out == "" and sorted(os.listdir(tmp_path)) == [taken]


@pytest.mark.parametrize("value", ["1" * 23, str(2**64), str(-(2**63) - 1)])
def test_a_seed_torch_cannot_take_is_a_usage_error(value: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # before: the demo trained nothing and died in torch.manual_seed with a traceback
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--seed", value, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: descend demo" in err and "Traceback" not in err
    assert (f"descend demo: error: argument --seed: a seed must be an integer in [-2**63, 2**64 - 1] "
            f"(torch.manual_seed's range), got {value}") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("seed", [-(2**63), -1, 2**64 - 1])
def test_every_seed_the_option_takes_trains(seed: int) -> None:
    """The ends of the range: the model's seed and the minibatch order's (seed + 1, modulo 2**64 as
    torch takes seeds) are both valid."""
    args = cli.build_parser().parse_args(["demo", "--seed", str(seed)])
    assert args.seed == seed
    torch.manual_seed(0)
    data = digits.Digits(torch.randn(12, 5, dtype=torch.float64), torch.arange(12) % 10,
                         torch.randn(4, 5, dtype=torch.float64), torch.arange(4))
    model = digits.make_mlp(data, 3, seed)
    history = digits.train_minibatch(model, descend.SGD(model.parameters(), lr=0.1), data, epochs=1, batch_size=5,
                                     seed=seed)
    assert history.steps == 3 and math.isfinite(history.snapshots[-1].train_loss)
    again = digits.make_mlp(data, 3, seed)
    digits.train_minibatch(again, descend.SGD(again.parameters(), lr=0.1), data, epochs=1, batch_size=5, seed=seed)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
