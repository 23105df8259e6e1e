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


class Wrapper(nn.Module):
    """DDP-like: the model under ``.module``, so every name gains the prefix ``module.``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_patterns_match_names_with_and_without_wrapper_prefixes() -> None:
    model = Net()
    wrapped = Wrapper(model)
    assert next(n for n, _ in wrapped.named_parameters()).startswith("module.")
    for pattern in ("*.fc.*", "module.fc.weight", "fc.*"):  # the DDP spelling and the plain one
        decayed, kept = _names(descend.param_groups(wrapped, 0.1, no_decay=[pattern]))
        assert decayed == {"conv.weight", "cls_token"} and "fc.weight" in kept, pattern
    # the plain model has no prefix: "*.fc.*" (which needs a dot before fc) does not match fc.weight there
    decayed, _ = _names(descend.param_groups(model, 0.1, no_decay=["*.fc.*"]))
    assert decayed == {"conv.weight", "fc.weight", "cls_token"}
    decayed, _ = _names(descend.param_groups(model, 0.1, no_decay=["fc.*"]))
    assert decayed == {"conv.weight", "cls_token"}
    # a callable still sees the plain name
    seen: list[str] = []
    descend.param_groups(wrapped, 0.1, no_decay=lambda name, p: seen.append(name) or False)
    assert "fc.weight" in seen and not any(n.startswith("module.") for n in seen)


def test_patterns_match_compiled_names() -> None:
    compiled = torch.compile(Net())  # names gain _orig_mod.
    for pattern in ("_orig_mod.fc.weight", "*.fc.weight", "fc.weight"):
        decayed, kept = _names(descend.param_groups(compiled, 0.1, no_decay=[pattern]))
        assert decayed == {"conv.weight", "cls_token"} and "fc.weight" in kept, pattern


class Block(nn.Module):
    def __init__(self, skip: set[str] | None = None, keywords: set[str] | None = None) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(4, 8))
        self.relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))
        self.fc = nn.Linear(8, 8)
        self.skip, self.keywords = skip, keywords

    def no_weight_decay(self) -> set[str]:
        return self.skip or set()

    def no_weight_decay_keywords(self) -> set[str]:
        return self.keywords or set()


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(4, 8))  # same name as the block's, not excluded by the block
        self.relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))
        self.blocks = nn.ModuleList([Block(skip={"pos_embed"}), Block(keywords={"relative_position"})])
        self.out = Block()


def test_no_weight_decay_of_every_submodule_with_its_path() -> None:
    decayed, kept = _names(descend.param_groups(Encoder(), 0.1))
    assert kept == {"blocks.0.pos_embed", "blocks.1.relative_position_bias_table",
                    "blocks.0.fc.bias", "blocks.1.fc.bias", "out.fc.bias"}
    assert decayed == {"pos_embed", "relative_position_bias_table", "blocks.0.relative_position_bias_table",
                       "blocks.1.pos_embed", "out.pos_embed", "out.relative_position_bias_table",
                       "blocks.0.fc.weight", "blocks.1.fc.weight", "out.fc.weight"}


def test_no_weight_decay_keywords_are_substrings_of_names_below_the_module() -> None:
    model = Encoder()
    model.no_weight_decay_keywords = lambda: {"position_bias", "fc.w"}  # type: ignore[method-assign]
    decayed, kept = _names(descend.param_groups(model, 0.1))
    assert {"relative_position_bias_table", "blocks.0.relative_position_bias_table",
            "out.relative_position_bias_table", "blocks.0.fc.weight", "out.fc.weight"} <= kept
    assert decayed == {"pos_embed", "blocks.1.pos_embed", "out.pos_embed"}


def test_hooks_are_honoured_under_wrappers() -> None:
    plain = _names(descend.param_groups(Encoder(), 0.1))
    assert _names(descend.param_groups(Wrapper(Encoder()), 0.1)) == plain
    assert _names(descend.param_groups(torch.compile(Encoder()), 0.1)) == plain
    assert _names(descend.param_groups(Wrapper(torch.compile(Encoder())), 0.1)) == plain


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
        decayed, kept = _names(descend.param_groups(ddp, 0.1, no_decay=["*.fc.*"]))  # module.fc.weight
        assert decayed == {"conv.weight", "cls_token"} and "fc.weight" in kept
        assert _names(descend.param_groups(nn.parallel.DistributedDataParallel(Encoder()), 0.1)) == _names(
            descend.param_groups(Encoder(), 0.1))
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
