"""descend.param_groups (what is decayed) and descend.explain (what each parameter gets)."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

import descend


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.bag = nn.EmbeddingBag(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.rms = nn.RMSNorm(8)
        self.fc = nn.Linear(8, 10)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.pos_embed = nn.Parameter(torch.zeros(4, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 8))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not needed here
        raise NotImplementedError


def _names(groups: list[dict]) -> list[set[str]]:
    return [{n for n, _ in g["params"]} for g in groups]


def test_default_rule() -> None:
    model = Net()
    groups = descend.param_groups(model, weight_decay=0.05, l1=1e-4, lr=3e-4)
    decayed, kept = _names(groups)
    assert decayed == {"conv.weight", "fc.weight", "cls_token"}
    assert kept == {
        "embed.weight", "bag.weight", "conv.bias", "bn.weight", "bn.bias", "ln.weight", "ln.bias",
        "gn.weight", "gn.bias", "rms.weight", "fc.bias", "pos_embed",
    }
    assert groups[0]["weight_decay"] == 0.05 and groups[0]["l1"] == 1e-4 and groups[0]["lr"] == 3e-4
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["l1"] == 0.0 and groups[1]["lr"] == 3e-4
    # tied: the shared tensor appears once; frozen: left out
    all_params = [p for g in groups for _, p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})
    assert not any(n.startswith("frozen") or n.startswith("head") for g in _names(groups) for n in g)


def test_patterns_add_to_the_rule_and_a_callable_replaces_it() -> None:
    model = Net()
    decayed, kept = _names(descend.param_groups(model, 0.1, no_decay=["cls_*", "conv.*"]))
    assert decayed == {"fc.weight"} and {"cls_token", "conv.weight"} <= kept
    only_fc = descend.param_groups(model, 0.1, no_decay=lambda name, p: not name.startswith("fc."))
    decayed, kept = _names(only_fc)
    assert decayed == {"fc.weight", "fc.bias"} and "embed.weight" in kept


def test_groups_work_in_descend_and_torch_optimizers() -> None:
    model = Net()
    for opt in (descend.AdamW(descend.param_groups(model, 0.05), lr=1e-3),
                torch.optim.AdamW(descend.param_groups(model, 0.05), lr=1e-3)):
        assert opt.param_groups[0]["param_names"][0] in {"conv.weight", "fc.weight", "cls_token"}
        assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_compiled_model_gives_the_same_names() -> None:
    model = Net()
    compiled = torch.compile(model)  # not run: wrapping alone adds the _orig_mod. prefix
    assert _names(descend.param_groups(compiled, 0.1)) == _names(descend.param_groups(model, 0.1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_wrapped_model_gives_the_same_names() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = Net()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert _names(descend.param_groups(ddp, 0.1)) == _names(descend.param_groups(model, 0.1))
    finally:
        dist.destroy_process_group()


def test_explain_shows_what_each_parameter_gets() -> None:
    model = Net()
    opt = descend.AdamW(descend.param_groups(model, 0.05), lr=0.01, decay="independent")
    opt.param_groups[0]["lr"] = 0.005  # as a scheduler would
    table = descend.explain(opt)
    assert len(table) == 15
    fc = table["fc.weight"]
    assert fc.shape == (10, 8) and fc.group == 0 and fc.decay == "independent"
    assert fc.factor == pytest.approx(1 - 0.05 * 0.005 / 0.01)
    bias = table["fc.bias"]
    assert bias.weight_decay == 0.0 and bias.factor == 1.0 and bias.rule == "none"
    text = str(table)
    assert "fc.weight" in text and "bn.weight" in text and "3 regularized, 12 not" in text
    assert [r.name for r in table][:3] == [n for n, _ in descend.param_groups(model, 0.05)[0]["params"]]


def test_explain_reads_torch_optimizers() -> None:
    a, b = torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)
    rows = list(descend.explain(torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.2)))
    assert rows[0].decay == "decoupled" and rows[0].factor == pytest.approx(0.98)
    assert rows[1].name == "group0.param1"
    rows = list(descend.explain(torch.optim.SGD([a], lr=0.1, weight_decay=0.2)))
    assert rows[0].decay == "coupled" and rows[0].factor == 1.0 and rows[0].rule == "g += 0.2·θ"
