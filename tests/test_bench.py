"""``descend bench``'s overhead set and its ``--device`` option (the timings themselves are not
tested: they are what the benchmark reports)."""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

import pytest
import torch

from descend import cli
from descend.cli import bench

OVERHEAD_LABELS = ["torch fused", "torch foreach", "descend (default)", "descend l1=0.0001",
                   'descend nonfinite="skip"', "descend flat=True"]


def test_overhead_set_is_150_tiny_tensors() -> None:
    label, shapes = bench.param_shapes("overhead")
    assert (len(shapes), sum(math.prod(s) for s in shapes)) == (150, 9_300)
    assert max(math.prod(s) for s in shapes) == 256 and {len(s) for s in shapes} == {1, 2}
    assert bench.param_shapes("overhead", quick=True) == (label, shapes)  # --quick keeps it as it is


def test_overhead_set_runs_in_quick_mode_and_reports_every_row(tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "Triad", lambda *a, **k: pytest.fail("the overhead set needs no triad"))
    threads = torch.get_num_threads()
    seen: list[int] = []
    step = torch.optim.AdamW.step

    def counting_step(self: Any, *a: Any, **k: Any) -> Any:
        seen.append(torch.get_num_threads())
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--sets", "overhead", "--steps", "3", "--warmup", "1",
                     "--min-seconds", "0", "--json", str(out)]) == 0
    assert torch.get_num_threads() == threads  # restored
    assert seen and set(seen) == {1}  # the set runs on one thread
    text = capsys.readouterr().out
    for label in OVERHEAD_LABELS:
        assert f"| 150 tiny tensors | AdamW | {label} |" in text
    assert "| torch fused | " in text and "| 1.00× |" in text
    doc = json.loads(out.read_text())
    rows = {r["label"]: r for r in doc["rows"]}
    assert list(rows) == OVERHEAD_LABELS and {r["kind"] for r in rows.values()} == {"overhead"}
    assert doc["machine"]["triad_gbps_median"] is None and doc["args"]["device"] == "cpu"
    fused = rows["torch fused"]
    assert fused["baseline"] is None and fused["rounds"] == 3
    for label in OVERHEAD_LABELS[1:]:
        r = rows[label]
        assert r["baseline"] == "torch fused" and r["rounds"] == 3 and r["share"] is None
        # the ratio is the median over rounds of the two times in the same round
        expected = statistics.median(a / b for a, b in zip(r["samples"], fused["samples"]))
        assert r["vs_baseline"] == pytest.approx(expected, rel=1e-12)
        assert r["ms"] == pytest.approx(statistics.median(r["samples"]), rel=1e-12)
    for label in ("descend (default)", "descend l1=0.0001", 'descend nonfinite="skip"'):
        verdict = "met" if rows[label]["vs_baseline"] <= bench.OVERHEAD_TARGET else "missed"
        assert f"| ≤ 1.25×: {verdict} |" in next(line for line in text.splitlines() if f"| {label} |" in line)


def test_overhead_rows_follow_the_other_sets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                             tmp_path: Any) -> None:
    shapes = bench.param_shapes

    def tiny(name: str, quick: bool = False) -> tuple[str, bench.Shapes]:
        return ("tiny", [(30,), (4, 5)]) if name == "many-small" else shapes(name, quick)

    monkeypatch.setattr(bench, "param_shapes", tiny)
    out = tmp_path / "bench.json"
    assert bench.main(["--sets", "many-small,overhead", "--optimizers", "sgd", "--steps", "1", "--warmup", "1",
                       "--triad-mb", "1", "--threads", "1", "--min-seconds", "0", "--no-memory",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| tiny | SGD | torch fused |" in text and "| 150 tiny tensors | AdamW | torch fused |" in text
    kinds = [r["kind"] for r in json.loads(out.read_text())["rows"]]
    assert kinds.count("overhead") == 6 and kinds.count("main") == 5 and kinds.count("modes") == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is")
def test_device_cuda_without_a_gpu_is_one_line_exit_1_before_any_work(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "Triad", lambda *a, **k: pytest.fail("the benchmark started"))
    monkeypatch.setattr(bench, "_run", lambda *a: pytest.fail("the benchmark started"))
    assert cli.main(["bench", "--device", "cuda", "--quick"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("descend bench: error: --device cuda: no CUDA device is available")
    assert bench.main(["--device", "cuda"]) == 1


def test_device_must_be_cpu_or_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--device", "tpu"]) == 2
    assert "argument --device: invalid choice: 'tpu'" in capsys.readouterr().err


def test_the_torch_default_label_follows_the_device() -> None:
    labels = [c.label for c in bench.main_candidates("adamw", "cpu")]
    assert f"torch {bench._torch_default_impl('cpu')} (torch's default)" in labels
    assert bench._torch_default_impl("meta") == "loop"  # (no fused or foreach kernels there)
