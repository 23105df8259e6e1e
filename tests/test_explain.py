"""descend.explain: timescales, rows as data, the group summary, model order and the width limit."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import descend
from descend.explain import ParamRow


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def _adamw(model: nn.Module, **options) -> descend.AdamW:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plausibility warnings are not what these tests are about
        return descend.AdamW(descend.param_groups(model, weight_decay=0.05), lr=1e-3, **options)


# README.md's table, with the columns added after rule: algorithm, dtypes, rounding, decay erased
README_HEADER = ("name      shape  group  lr     decay      weight_decay  factor   timescale  l1  rule              "
                 "algorithm  dtype    state_dtype  rounding  decay_erased")


def test_timescale_column_of_every_mode() -> None:
    model = _model()
    lr0, lr = 1e-2, 5e-3
    scales = {"decoupled": lr, "independent": lr / lr0, "fixed": 1.0, "corrected": lr**2 / lr0}
    for decay, s in scales.items():
        opt = descend.SGD(descend.param_groups(model, weight_decay=0.001), lr=lr0, decay=decay)
        opt.param_groups[0]["lr"] = lr  # as a scheduler would
        row = descend.explain(opt)["0.weight"]
        assert row.factor == pytest.approx(1 - s * 0.001, rel=1e-15)
        assert row.timescale == pytest.approx(-1 / math.log(1 - s * 0.001), rel=1e-12)
        assert row.factor**row.timescale == pytest.approx(math.exp(-1), rel=1e-12)
        assert row.timescale == descend.timescale(decay, weight_decay=0.001, lr=lr, base_lr=lr0)
        assert descend.explain(opt)["0.bias"].timescale == math.inf  # not decayed
    coupled = descend.explain(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.01))
    assert [r.timescale for r in coupled] == [math.inf] * 6  # λ·θ joins the gradient: no fixed shrink


def test_printed_table_keeps_its_format_and_shows_the_timescale() -> None:
    text = descend.explain(_adamw(_model()), width=200).format()
    lines = text.splitlines()
    header = lines.index(README_HEADER)
    assert lines[header + 2] == ("0.weight  8×4    0      0.001  decoupled  0.05          0.99995  19999.5    0   "
                                 "θ *= 1 − lr·0.05  adamw      float32  float32      nearest")
    assert lines[header + 4] == ("0.bias    8      1      0.001  decoupled  0             1        inf        0   "
                                 "none              adamw      float32  float32      nearest")
    assert lines[-1] == "6 parameters, 2 regularized, 4 not"


def test_group_summary_above_the_rows() -> None:
    table = descend.explain(_adamw(_model()), width=200)
    assert [(g.group, g.lr, g.decay, g.weight_decay, g.l1, g.parameters, g.elements) for g in table.groups] == [
        (0, 1e-3, "decoupled", 0.05, 0.0, 2, 8 * 4 + 2 * 8),
        (1, 1e-3, "decoupled", 0.0, 0.0, 4, 8 + 8 + 8 + 2),
    ]
    lines = str(table).splitlines()
    assert lines[:4] == [
        "group  lr     decay      weight_decay  l1  parameters  elements",
        "-----  -----  ---------  ------------  --  ----------  --------",
        "0      0.001  decoupled  0.05          0   2           48",
        "1      0.001  decoupled  0             0   4           26",
    ]
    assert lines[4] == "" and lines[5] == README_HEADER


def test_group_summary_counts_an_empty_group() -> None:
    a = torch.zeros(3, 5, requires_grad=True)
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [], "lr": 0.5}], lr=0.1, weight_decay=0.2)
    table = descend.explain(opt)
    assert [(g.group, g.parameters, g.elements, g.lr) for g in table.groups] == [(0, 1, 15, 0.1), (1, 0, 0, 0.5)]
    assert len(table) == 1


def test_to_json_gives_every_field_as_strict_json() -> None:
    model = _model()
    opt = _adamw(model, l1=1e-4, decay="independent")
    opt.param_groups[0]["lr"] = 5e-4
    table = descend.explain(opt)
    data = table.to_json()
    text = json.dumps(data, allow_nan=False)  # strict JSON: no Infinity
    back = json.loads(text)
    assert back == data and len(back) == 6
    assert set(back[0]) == {"name", "shape", "group", "lr", "decay", "weight_decay", "factor", "timescale", "l1", "rule",
                            "algorithm", "dtype", "state_dtype", "rounding", "decay_erased"}
    row = table["0.weight"]
    assert back[0] == {"name": "0.weight", "shape": [8, 4], "group": 0, "lr": 5e-4, "decay": "independent",
                       "weight_decay": 0.05, "factor": row.factor, "timescale": row.timescale, "l1": 0.0,
                       "rule": "θ *= 1 − (lr/lr₀)·0.05", "algorithm": "adamw", "dtype": "float32",
                       "state_dtype": "float32", "rounding": "nearest", "decay_erased": False}
    assert row.factor == pytest.approx(1 - 0.5 * 0.05)
    bias = next(r for r in back if r["name"] == "0.bias")
    assert bias["timescale"] is None and bias["factor"] == 1.0  # inf is null
    # every field of every row survives, inf as null
    for r, d in zip(table, back, strict=True):
        expected = ParamRow(d["name"], tuple(d["shape"]), d["group"], d["lr"], d["decay"], d["weight_decay"],
                            d["factor"], math.inf if d["timescale"] is None else d["timescale"], d["l1"], d["rule"],
                            d["algorithm"], d["dtype"], d["state_dtype"], d["rounding"], d["decay_erased"])
        assert r == expected


def test_model_order_lists_rows_as_the_model_names_them() -> None:
    model = _model()
    opt = _adamw(model)
    names = [n for n, _ in model.named_parameters()]
    assert [r.name for r in descend.explain(opt)] == ["0.weight", "2.weight", "0.bias", "1.weight", "1.bias", "2.bias"]
    assert [r.name for r in descend.explain(opt, model=model)] == names
    # the rows keep what they say: only the order changes
    by_name = {r.name: r for r in descend.explain(opt)}
    assert list(descend.explain(opt, model=model)) == [by_name[n] for n in names]


def test_model_order_puts_parameters_the_model_lacks_last_and_ignores_the_reverse() -> None:
    model = _model()
    extra_a, extra_b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2))
    unused = nn.Linear(3, 3)  # in the model, not in the optimizer
    model.add_module("unused", unused)
    opt = torch.optim.AdamW([{"params": [extra_a, model[2].weight]},
                             {"params": [model[0].bias, extra_b, model[0].weight]}], lr=0.1)
    rows = [r.name for r in descend.explain(opt, model=model)]
    assert rows == ["group1.param2", "group1.param0", "group0.param1", "group0.param0", "group1.param1"]


def test_model_order_with_a_wrapped_model_and_tied_weights() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(6, 4)
            self.proj = nn.Linear(4, 4)
            self.head = nn.Linear(4, 6, bias=False)
            self.head.weight = self.embed.weight

    class Wrapper(nn.Module):  # DDP-like: the model under .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    inner = Tied()
    opt = _adamw(inner)
    rows = [r.name for r in descend.explain(opt, model=Wrapper(inner))]
    assert rows == ["embed.weight", "proj.weight", "proj.bias"]  # the optimizer's names, the model's order


def test_columns_that_do_not_fit_are_dropped_from_the_right_with_a_note() -> None:
    table = descend.explain(_adamw(_model()))
    full = table.format(width=1000).splitlines()
    assert not any(line.startswith("not shown") for line in full)
    widest = max(len(line) for line in full)
    assert table.format(width=widest).splitlines() == full
    narrow = table.format(width=80).splitlines()
    assert all(len(line) <= 80 for line in narrow)
    assert narrow[-2:] == ["not shown (wider than 80 characters): rule, algorithm, dtype, state_dtype,",
                           "  rounding, decay_erased"]  # the note wraps after a comma, at the width
    assert "name      shape  group  lr     decay      weight_decay  factor   timescale  l1" in narrow
    assert len(narrow) == len(full) + 2  # two note lines, no row wrapped
    tiny = descend.explain(_adamw(_model()), width=30).format().splitlines()
    note = tiny.index("not shown (wider than 30 characters): decay,")  # (the note's start stays whole)
    assert all(len(line) <= 30 for line in tiny[:note - 1])  # the table; the count runs on
    assert all(len(line) <= 30 and line.startswith("  ") for line in tiny[note + 1:])
    assert " ".join(line.strip() for line in tiny[note:]) == (
        "not shown (wider than 30 characters): decay, weight_decay, factor, timescale, l1, rule, algorithm, dtype, "
        "state_dtype, rounding, decay_erased, group weight_decay, group l1, group parameters, group elements")
    assert tiny[0] == "group  lr     decay" and tiny[tiny.index("") + 1] == "name      shape  group  lr"


def test_the_name_column_always_stays() -> None:
    table = descend.explain(_adamw(_model()), width=3)
    lines = table.format().splitlines()
    assert "0.weight" in lines and "-----" in lines and "name" in lines


def test_terminal_width_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    table = descend.explain(_adamw(_model()))
    monkeypatch.setenv("COLUMNS", "70")
    lines = str(table).splitlines()
    assert all(len(line) <= 70 for line in lines)
    assert lines[-2].startswith("not shown (wider than 70 characters): ") and lines[-1].endswith("decay_erased")
    monkeypatch.setenv("COLUMNS", "400")
    assert not str(table).splitlines()[-1].startswith("not shown")


def test_a_bad_width_is_a_value_error() -> None:
    opt = _adamw(_model())
    with pytest.raises(ValueError, match=r"Invalid width: 0 \(allowed: an integer >= 1\)"):
        descend.explain(opt, width=0)
    with pytest.raises(ValueError, match=r"Invalid width: 80.0 "):
        descend.explain(opt).format(width=80.0)  # type: ignore[arg-type]


def test_precision_columns_and_the_decay_erased_flag() -> None:
    model = _model().bfloat16()
    # bfloat16's half ulp is 2⁻⁹ ≈ 0.00195: lr·λ = 1e-3·0.05 = 5e-5 rounds away, lr·λ = 1e-1·0.05 does not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nearest = descend.AdamW(descend.param_groups(model, weight_decay=0.05), lr=1e-3)
        kept = descend.AdamW(descend.param_groups(model, weight_decay=0.05), lr=1e-3, rounding="compensated",
                             state_dtype=torch.float32)
        loud = descend.AdamW(descend.param_groups(model, weight_decay=0.05), lr=1e-1)
    assert 1e-3 * 0.05 < torch.finfo(torch.bfloat16).eps / 4 < 1e-1 * 0.05
    table = descend.explain(nearest)
    w, b = table["0.weight"], table["0.bias"]
    assert (w.dtype, w.state_dtype, w.rounding, w.decay_erased) == ("bfloat16", "bfloat16", "nearest", True)
    assert (b.dtype, b.decay_erased) == ("bfloat16", False)  # not decayed: nothing to erase
    assert [r.name for r in table if r.decay_erased] == ["0.weight", "2.weight"]
    text = table.format(width=1000).splitlines()
    assert text[-1] == ("2 16-bit parameters whose decay rounding to nearest erases (decay_erased): a descend "
                        "optimizer keeps it with rounding='compensated' or 'stochastic'")
    row = next(line for line in text if line.startswith("0.weight"))
    assert row.endswith("adamw      bfloat16  bfloat16     nearest   yes")
    w = descend.explain(kept)["0.weight"]
    assert (w.dtype, w.state_dtype, w.rounding, w.decay_erased) == ("bfloat16", "float32", "compensated", False)
    assert not any(r.decay_erased for r in descend.explain(loud))
    # torch.optim: state in the parameter's dtype, rounding to nearest; its AdamW decays the biases too
    torch_rows = descend.explain(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05))
    assert {(r.algorithm, r.dtype, r.state_dtype, r.rounding, r.decay_erased) for r in torch_rows} == {
        ("adamw", "bfloat16", "bfloat16", "nearest", True)}
    assert {r.algorithm for r in descend.explain(torch.optim.SGD(model.parameters(), lr=0.1))} == {"sgd"}
    # float32 parameters ignore rounding, and nothing rounds away
    fp32 = descend.explain(_adamw(_model(), rounding="stochastic"))["0.weight"]
    assert (fp32.dtype, fp32.rounding, fp32.decay_erased) == ("float32", "nearest", False)


def test_8bit_state_is_named() -> None:
    torch.manual_seed(0)
    model = nn.Linear(256, 4)
    opt = _adamw(model, state_dtype="8bit")
    assert descend.explain(opt)["weight"].state_dtype == "8bit"
