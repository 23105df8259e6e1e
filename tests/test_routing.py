"""descend.param_groups(model, ..., muon=True): which parameters Muon steps (descend.routing), on
small models built like GPT-2, Llama, ViT, ResNet and a mixture of experts; the groups train in
descend.Muon, resume bit for bit, and descend.explain names the algorithm of each parameter."""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import descend

D, HEADS, VOCAB, SEQ = 16, 2, 32, 8


def _attention(qkv: Tensor, heads: int) -> Tensor:
    b, t, _ = qkv.shape
    q, k, v = (x.view(b, t, heads, -1).transpose(1, 2) for x in qkv.chunk(3, dim=-1))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)


# --- GPT-2: token and position embeddings, c_attn/c_proj, LayerNorms, lm_head tied to wte -------


class GPTAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(_attention(self.c_attn(x), HEADS))


class GPTMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = nn.Linear(D, 4 * D)
        self.c_proj = nn.Linear(4 * D, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class GPTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(D), GPTAttention()
        self.ln_2, self.mlp = nn.LayerNorm(D), GPTMLP()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's layout: the head is registered last and wte is tied to it."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(VOCAB, D), wpe=nn.Embedding(SEQ, D),
            h=nn.ModuleList([GPTBlock() for _ in range(layers)]), ln_f=nn.LayerNorm(D)))
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: Tensor) -> Tensor:
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


# --- Llama: RMSNorm, q/k/v/o and gate/up/down without biases, an untied lm_head ------------------


class LlamaAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D, bias=False) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.o_proj(_attention(torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1), HEADS))


class LlamaMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, 3 * D, bias=False), nn.Linear(D, 3 * D, bias=False)
        self.down_proj = nn.Linear(3 * D, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = nn.RMSNorm(D), LlamaAttention()
        self.post_attention_layernorm, self.mlp = nn.RMSNorm(D), LlamaMLP()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList([LlamaLayer() for _ in range(layers)])
        self.norm = nn.RMSNorm(D)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class Llama(nn.Module):
    """transformers' LlamaForCausalLM layout: ``model`` then ``lm_head``."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.model = LlamaModel(layers)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        return self.lm_head(self.model(idx))


# --- ViT: convolutional patch embedding, cls token, position embedding, blocks, head ------------


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, D, kernel_size=4, stride=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (y.view(b, t, HEADS, -1).transpose(1, 2) for y in self.qkv(x).chunk(3, -1))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


class ViTMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(D), ViTAttention(), nn.LayerNorm(D), ViTMlp()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """timm's VisionTransformer layout, with its no_weight_decay()."""

    def __init__(self, classes: int = 5, layers: int = 2) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, D) * 0.02)  # 4 patches of a 8×8 image, and cls
        self.blocks = nn.Sequential(*(ViTBlock() for _ in range(layers)))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, classes)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# --- ResNet: convolutions, BatchNorm, a downsampling shortcut, fc ------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nn.Module):
    """torchvision's layout: stem, layers, then fc registered last."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2))
        self.fc = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean(dim=(2, 3)))


# --- a mixture of experts: experts as [E, out, in] parameters, a router, per-expert biases -------


class Experts(nn.Module):
    def __init__(self, experts: int = 4, hidden: int = 24) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(experts, hidden, D) / D**0.5)
        self.bias = nn.Parameter(torch.zeros(experts, hidden))  # 2-D, but a bias
        self.w_out = nn.Parameter(torch.randn(experts, D, hidden) / hidden**0.5)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        h = F.gelu(torch.einsum("btd,ehd->bteh", x, self.w_in) + self.bias)
        return torch.einsum("bteh,edh,bte->btd", h, self.w_out, weights)


class MoELayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.router = nn.Linear(D, 4, bias=False)
        self.experts = Experts()

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return x + self.experts(h, self.router(h).softmax(-1))


class MoE(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList([MoELayer() for _ in range(layers)])
        self.head = nn.Linear(D, VOCAB)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _tokens(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(step % 2)  # two batches, seen again and again
    idx = torch.randint(0, VOCAB, (4, SEQ), generator=g)
    return idx, torch.randint(0, VOCAB, (4, SEQ), generator=g)


def _images(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(step % 2)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)


def _lm_loss(model: nn.Module, step: int) -> Tensor:
    idx, target = _tokens(step)
    return F.cross_entropy(model(idx).flatten(0, 1), target.flatten())


def _image_loss(model: nn.Module, step: int) -> Tensor:
    x, y = _images(step)
    return F.cross_entropy(model(x), y)


#: model, loss, the names Muon steps (matrix "flatten"), those it steps as stacks, and the groups
#: as (algorithm, matrix, decayed)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module, int], Tensor], set[str], set[str],
                       list[tuple[str, str | None, bool]]]] = {
    "gpt2": (GPT, _lm_loss,
             {f"transformer.h.{i}.{m}.weight" for i in range(2)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
             set(),
             [("muon", "flatten", True), ("adamw", None, False)]),  # the tied head is an embedding: not decayed
    "llama": (Llama, _lm_loss,
              {f"model.layers.{i}.{m}.weight" for i in range(2)
               for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
              set(),
              [("muon", "flatten", True), ("adamw", None, True), ("adamw", None, False)]),  # lm_head decayed
    "vit": (ViT, _image_loss,
            {"patch_embed.proj.weight"} | {f"blocks.{i}.{m}.weight" for i in range(2)
                                           for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")},
            set(),
            [("muon", "flatten", True), ("adamw", None, True), ("adamw", None, False)]),
    "resnet": (ResNet, _image_loss,
               {"conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer2.0.conv1.weight",
                "layer2.0.conv2.weight", "layer2.0.downsample.0.weight"},
               set(),
               [("muon", "flatten", True), ("adamw", None, True), ("adamw", None, False)]),
    "moe": (MoE, _lm_loss,
            {"layers.0.router.weight", "layers.1.router.weight"},
            {f"layers.{i}.experts.{w}" for i in range(2) for w in ("w_in", "w_out")},
            # the experts' 2-D bias is decayed (ndim 2) but stepped by AdamW (its name)
            [("muon", "flatten", True), ("muon", "stack", True), ("adamw", None, True), ("adamw", None, False)]),
}


def _make(case: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[case][0]()


def _routed(groups: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"flatten": set(), "stack": set(), "adamw": set()}
    for g in groups:
        key = g["matrix"] if g["algorithm"] == "muon" else "adamw"
        out[key] |= {n for n, _ in g["params"]}
    return out


def _muon(groups: list[dict], **options) -> descend.Muon:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # plausibility warnings are not what these tests are about
        return descend.Muon(groups, lr=0.02, weight_decay=0.01, adamw=dict(lr=3e-3), **options)


@pytest.mark.parametrize("case", list(CASES))
def test_the_names_muon_steps(case: str) -> None:
    model = _make(case)
    _, _, flat, stacked, layout = CASES[case]
    groups = descend.param_groups(model, 0.1, muon=True, lr=0.02)
    routed = _routed(groups)
    assert routed["flatten"] == flat and routed["stack"] == stacked
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert routed["adamw"] == trainable - flat - stacked  # every parameter once, the rest AdamW's
    assert [(g["algorithm"], g.get("matrix"), g["weight_decay"] == 0.1) for g in groups] == layout
    assert all(g["lr"] == 0.02 and g["l1"] == 0.0 for g in groups)
    # decay is decided apart: the same (name → λ) as without muon
    plain = {n: g["weight_decay"] for g in descend.param_groups(model, 0.1) for n, _ in g["params"]}
    assert {n: g["weight_decay"] for g in groups for n, _ in g["params"]} == plain


def test_what_adamw_gets_in_each_model() -> None:
    assert _routed(descend.param_groups(_make("gpt2"), 0.1, muon=True))["adamw"] == {
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
    } | {f"transformer.h.{i}.{m}" for i in range(2) for m in (
        "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias",
        "mlp.c_fc.bias", "mlp.c_proj.bias")}
    vit = _routed(descend.param_groups(_make("vit"), 0.1, muon=True))["adamw"]
    assert {"cls_token", "pos_embed", "head.weight", "head.bias", "norm.weight", "patch_embed.proj.bias"} <= vit
    resnet = _routed(descend.param_groups(_make("resnet"), 0.1, muon=True))["adamw"]
    assert resnet == {"bn1.weight", "bn1.bias", "fc.weight", "fc.bias", "layer1.0.bn1.weight", "layer1.0.bn1.bias",
                      "layer1.0.bn2.weight", "layer1.0.bn2.bias", "layer2.0.bn1.weight", "layer2.0.bn1.bias",
                      "layer2.0.bn2.weight", "layer2.0.bn2.bias", "layer2.0.downsample.1.weight",
                      "layer2.0.downsample.1.bias"}


def test_vectors_in_disguise_and_other_modules() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(D, HEADS, add_bias_kv=True)  # in_proj_weight [3D, D], bias_k [1, 1, D]
            self.gru = nn.GRU(D, D)  # weight_ih_l0 [3D, D]
            self.score = nn.Linear(D, 1)  # a Linear with one output: a vector
            self.scale = nn.Parameter(torch.ones(()))  # 0-D
            self.table = nn.Parameter(torch.zeros(7, 7))  # a plain matrix parameter
            self.relative_position_bias_table = nn.Parameter(torch.zeros(9, HEADS))
            self.mask_token = nn.Parameter(torch.zeros(3, D))
            self.out = nn.Conv1d(D, 4, 1)  # the last layer registered: the output layer

    routed = _routed(descend.param_groups(Odd(), 0.1, muon=True))
    assert routed["flatten"] == {"mha.in_proj_weight", "mha.out_proj.weight", "gru.weight_ih_l0",
                                 "gru.weight_hh_l0", "table"}
    assert routed["stack"] == set()
    assert {"mha.bias_k", "mha.bias_v", "score.weight", "scale", "relative_position_bias_table", "mask_token",
            "out.weight", "out.bias"} <= routed["adamw"]


def test_wrapped_models_route_as_the_plain_one() -> None:
    class Wrapper(nn.Module):  # as DDP: the model under .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = _make("moe")
    plain = _routed(descend.param_groups(model, 0.1, muon=True))
    assert _routed(descend.param_groups(torch.compile(model), 0.1, muon=True)) == plain
    assert _routed(descend.param_groups(Wrapper(model), 0.1, muon=True)) == plain
    assert _routed(descend.param_groups(Wrapper(model), 0.1, muon=["*.router.*", "*.experts.w_*"])) == plain


def test_muon_false_changes_nothing() -> None:
    model = _make("llama")
    for off in (False, None):
        groups = descend.param_groups(model, 0.1, muon=off, lr=0.5)
        assert len(groups) == 2 and not any("algorithm" in g or "matrix" in g for g in groups)
        assert [[n for n, _ in g["params"]] for g in groups] == [
            [n for n, _ in g["params"]] for g in descend.param_groups(model, 0.1, lr=0.5)]


def test_patterns_replace_the_rule() -> None:
    model = _make("llama")
    routed = _routed(descend.param_groups(model, 0.1, muon=["*.mlp.*", "lm_head.weight"]))
    mlp = {f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")}
    assert routed["flatten"] == mlp | {"lm_head.weight"}
    assert "model.layers.0.self_attn.q_proj.weight" in routed["adamw"]
    # one pattern as a string
    assert _routed(descend.param_groups(model, 0.1, muon="*.q_proj.*"))["flatten"] == {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    # the DDP spelling matches too
    wrapped = nn.Module()
    wrapped.module = model
    assert _routed(descend.param_groups(wrapped, 0.1, muon=["module.lm_head.*"]))["flatten"] == {"lm_head.weight"}
    # patterns give stacks their mode, and select nothing more than they name
    moe = _routed(descend.param_groups(_make("moe"), 0.1, muon=["*.experts.w_in"]))
    assert moe["stack"] == {"layers.0.experts.w_in", "layers.1.experts.w_in"} and moe["flatten"] == set()


def test_a_callable_replaces_the_rule_and_sees_the_plain_name() -> None:
    model = _make("vit")
    seen: list[str] = []

    def two_d(name: str, param: Tensor) -> bool:
        seen.append(name)
        return param.ndim == 2 and not name.startswith("head")

    routed = _routed(descend.param_groups(torch.compile(model), 0.1, muon=two_d))
    assert routed["flatten"] == {f"blocks.{i}.{m}.weight" for i in range(2)
                                 for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert "patch_embed.proj.weight" in routed["adamw"]  # 4-D: not chosen
    assert len(seen) == len(list(model.parameters())) and not any("_orig_mod" in n for n in seen)


def test_a_vector_given_to_muon_is_a_value_error_that_names_it() -> None:
    model = _make("gpt2")
    with pytest.raises(ValueError, match=re.escape(
            "Invalid muon: ['*'] (allowed: patterns or a callable that select parameters of 2 or more dimensions "
            "only; it selects 'transformer.h.0.ln_1.weight' of shape (16,))")):
        descend.param_groups(model, 0.1, muon=["*"])
    with pytest.raises(ValueError, match=r"^Invalid muon: <function .*it selects 'transformer.h.0.attn.c_attn.bias' "
                                         r"of shape \(48,\)\)$"):
        descend.param_groups(model, 0.1, muon=lambda name, p: "attn" in name)
    scalar = nn.Linear(2, 2)
    scalar.gain = nn.Parameter(torch.ones(()))
    with pytest.raises(ValueError, match=r"it selects 'gain' of shape \(\)"):
        descend.param_groups(scalar, 0.1, muon="gain")


def test_bad_muon_values_and_clashing_options() -> None:
    model = _make("resnet")
    for bad in (1, 2.5, [3], object()):
        with pytest.raises(ValueError, match=r"^Invalid muon: .* \(allowed: True, False, name patterns \(fnmatch\) "
                                             r"or a callable \(name, param\) -> bool\)$"):
            descend.param_groups(model, 0.1, muon=bad)
    with pytest.raises(ValueError, match=r"^Invalid algorithm: 'adamw' \(allowed: no value of its own"):
        descend.param_groups(model, 0.1, muon=True, algorithm="adamw")
    with pytest.raises(ValueError, match=r"^Invalid matrix: 'stack' "):
        descend.param_groups(model, 0.1, muon=True, matrix="stack")
    # without muon, an option is only an option
    assert {g["algorithm"] for g in descend.param_groups(model, 0.1, algorithm="adamw")} == {"adamw"}


def _train(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[nn.Module, int], Tensor],
           steps: range) -> list[float]:
    losses = []
    for step in steps:
        opt.zero_grad()
        loss = loss_fn(model, step)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("case", list(CASES))
def test_muon_trains_on_the_groups_and_resumes_bit_for_bit(case: str) -> None:
    model = _make(case)
    loss_fn = CASES[case][1]
    opt = _muon(descend.param_groups(model, 0.1, muon=True))
    assert [g["algorithm"] for g in opt.param_groups] == [g[0] for g in CASES[case][4]]
    losses = _train(model, opt, loss_fn, range(8))
    assert losses[-1] < 0.9 * losses[0], losses  # two batches, memorized
    # each Muon parameter has a momentum buffer, each AdamW one Adam's moments
    for group in opt.param_groups:
        keys = {"momentum_buffer"} if group["algorithm"] == "muon" else {"step", "exp_avg", "exp_avg_sq"}
        assert all(set(opt.state[p]) == keys for p in group["params"])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, loss_fn, range(8, 12))
    resumed = _make(case)
    resumed.load_state_dict(saved_model)
    opt2 = _muon(descend.param_groups(resumed, 0.1, muon=True))
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, loss_fn, range(8, 12))
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", ["llama", "moe"])
def test_explain_shows_the_algorithm_of_each_parameter(case: str) -> None:
    model = _make(case)
    _, _, flat, stacked, _ = CASES[case]
    opt = _muon(descend.param_groups(model, 0.1, muon=True))
    table = descend.explain(opt, model=model)
    assert [r.name for r in table] == [n for n, _ in model.named_parameters()]
    assert {r.name for r in table if r.algorithm == "muon"} == flat | stacked
    assert {r.algorithm for r in table} == {"muon", "adamw"}
    head = table["lm_head.weight" if case == "llama" else "head.weight"]
    assert (head.algorithm, head.lr, head.weight_decay) == ("adamw", 3e-3, 0.1)
    first = sorted(flat)[0]
    assert (table[first].lr, table[first].weight_decay) == (0.02, 0.1)
    lines = table.format(width=1000).splitlines()
    row = next(line for line in lines if line.startswith(first + " "))
    assert re.search(r"  muon +float32  float32 +nearest$", row), row
    assert [r["algorithm"] for r in table.to_json()] == [r.algorithm for r in table]
