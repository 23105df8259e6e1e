"""``descend muon-demo``: a character-level transformer trained with AdamW and with Muon+AdamW
from the same initial weights, on the same data, in lockstep. A few steps only: both runs learn
(finite losses, below where they started), they start from the same loss, and the routing sends
exactly the blocks' hidden matrices to Muon."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from descend import cli
from descend.cli import muon_demo

HIDDEN = [f"blocks.{i}.{layer}.weight" for i in range(muon_demo.LAYERS) for layer in ("qkv", "proj", "fc", "out")]


@pytest.fixture(scope="module")
def text() -> muon_demo.Text:
    return muon_demo.load_text()


def _check_learns(curve: muon_demo.Curve) -> None:
    for losses in (curve.train_loss, curve.val_loss, curve.minibatch_loss):
        assert all(math.isfinite(x) for x in losses)
    assert curve.train_loss[-1] < curve.train_loss[0] - 0.3
    assert curve.val_loss[-1] < curve.val_loss[0] - 0.3
    assert curve.seconds[0] == 0.0 and all(b >= a for a, b in zip(curve.seconds, curve.seconds[1:]))


def test_the_text_is_the_standard_librarys_source_with_a_fixed_split(text: muon_demo.Text) -> None:
    assert len(text.files) >= 10 and "argparse.py" in text.files
    assert len(text.val) > 50_000 and 8 < len(text.train) / len(text.val) < 10
    assert 60 <= text.vocab_size <= 300 and int(text.train.max()) < text.vocab_size
    again = muon_demo.load_text()
    assert torch.equal(again.train, text.train) and torch.equal(again.val, text.val)


def test_both_runs_learn_from_the_same_start(text: muon_demo.Text) -> None:
    result = muon_demo.compare(16, checkpoints=2, eval_windows=64, width=64, text=text)
    adamw, muon = result.curves["adamw"], result.curves["muon"]
    assert adamw.steps == muon.steps == [0, 8, 16]
    # the same initial weights, evaluated on the same windows; the same first minibatch
    assert adamw.train_loss[0] == muon.train_loss[0] and adamw.val_loss[0] == muon.val_loss[0]
    assert adamw.minibatch_loss[0] == muon.minibatch_loss[0]
    assert abs(adamw.val_loss[0] - math.log(text.vocab_size)) < 0.3  # an untrained model: about uniform
    assert adamw.minibatch_loss[1] != muon.minibatch_loss[1]  # ... and then different optimizers
    _check_learns(adamw)
    _check_learns(muon)
    assert len(adamw.minibatch_loss) == 16
    routed = {name: algorithm for name, _, algorithm, _ in result.routing}
    assert sorted(n for n, a in routed.items() if a == "muon") == sorted(HIDDEN)
    assert {"tok.weight", "pos.weight", "head.weight", "head.bias", "ln_f.weight", "blocks.0.qkv.bias"} <= {
        n for n, a in routed.items() if a == "adamw"}
    assert len(routed) == len(list(muon_demo.CharTransformer(text.vocab_size).parameters()))
    assert "blocks.0.qkv.weight" in result.explanation


@pytest.mark.parametrize("from_param_groups", [True, False])
def test_routing_puts_exactly_the_hidden_matrices_to_muon_with_the_adamw_runs_decay(
        from_param_groups: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not from_param_groups:  # the demo's own rule (for a descend whose param_groups has no muon=)
        monkeypatch.setattr(muon_demo, "_has_muon_routing", lambda: False)
    elif not muon_demo._has_muon_routing():
        pytest.skip("descend.param_groups has no muon= here")
    model = muon_demo.CharTransformer(97)
    groups = muon_demo.muon_groups(model, 0.1)
    muon = [n for g in groups if g["algorithm"] == "muon" for n, _ in g["params"]]
    assert sorted(muon) == sorted(HIDDEN)
    decay = {n: g["weight_decay"] for g in groups for n, _ in g["params"]}
    baseline = {n: g["weight_decay"] for g in descend_groups(model) for n, _ in g["params"]}
    assert decay == baseline  # every parameter is decayed as in the AdamW run
    assert decay["head.weight"] == 0.1 and decay["tok.weight"] == 0.0 and decay["blocks.1.fc.bias"] == 0.0


def descend_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    import descend

    return descend.param_groups(model, 0.1)


def test_the_command_prints_the_tables_and_writes_the_figure(tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(muon_demo, "CHECKPOINTS", 2)
    monkeypatch.setattr(muon_demo, "EVAL_WINDOWS", 32)
    code = cli.main(["muon-demo", "--quick", "--steps", "6", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "muon: 8 parameters" in out and "AdamW train" in out and "final val loss" in out
    assert "algorithm" in out or "group" in out  # descend.explain's table
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["command"].startswith("descend muon-demo --quick")
    assert doc["steps"] == 6 and doc["eval_windows"] == 32 and sorted(doc["runs"]) == ["adamw", "muon"]
    assert doc["runs"]["adamw"]["val_loss"][0] == doc["runs"]["muon"]["val_loss"][0]
    assert sorted(r["name"] for r in doc["routing"] if r["algorithm"] == "muon") == sorted(HIDDEN)
    assert (tmp_path / "muon_demo.png").stat().st_size > 10_000


def test_the_schedule_warms_up_then_decays_to_a_tenth() -> None:
    f = muon_demo.schedule(100)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0)
    assert f(99) == pytest.approx(muon_demo.FINAL_LR_SHARE, abs=1e-3)
    assert all(f(i) >= f(i + 1) for i in range(5, 99))
