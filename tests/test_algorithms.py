"""network/algorithms against LyCORIS and against the real layer forward.

Every ΔW is compared with LyCORIS (functional API where it has one, modules otherwise) and
every bypass Δy with the layer itself: F.linear / F.conv2d(x, W + ΔW, b + Δb) − layer(x).
Where LyCORIS follows another convention than ours (formats.md 5), the test says so and
checks an independent formula instead. All in fp32 on CPU; values are scaled so that ΔW is
of the order of W, and `close` compares relative to the expected tensor's magnitude.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lycoris.functional.boft as ly_boft
import lycoris.functional.diag_oft as ly_oft
import lycoris.functional.locon as ly_locon
import lycoris.functional.loha as ly_loha
import lycoris.functional.lokr as ly_lokr
from lycoris.functional.general import apply_dora_scale, weight_decompose
from lycoris.modules.diag_oft import DiagOFTModule
from lycoris.modules.full import FullModule
from lycoris.modules.glora import GLoRAModule, _glora_weight
from lycoris.modules.ia3 import IA3Module
from lycoris.modules.locon import LoConModule
from lycoris.modules.norms import NormModule

from netweave.network.algorithms import Adapter, FormatError, detect, make

torch.set_grad_enabled(False)

TOL = 1e-5


def close(actual, expected, tol=TOL):
    """assert_close relative to the magnitude of `expected` (atol and rtol both `tol`)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(actual.float() / scale, expected.float() / scale, atol=tol, rtol=tol)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g) * std


# ----------------------------------------------------------------------------- host layers

LAYERS = {
    "lin320": lambda: nn.Linear(320, 320),
    "lin768": lambda: nn.Linear(768, 320),
    "conv3": lambda: nn.Conv2d(320, 640, 3, padding=1),
    "conv3s": lambda: nn.Conv2d(64, 128, 3, stride=2, padding=1),
    "conv3d": lambda: nn.Conv2d(64, 128, 3, padding=2, dilation=2),
    "conv1": lambda: nn.Conv2d(320, 320, 1),
    "conv3r": lambda: nn.Conv2d(64, 128, 3, padding=1, padding_mode="reflect"),
}


def layer(name, seed=0):
    torch.manual_seed(seed)
    return LAYERS[name]()


def inputs(module, g):
    if isinstance(module, nn.Linear):
        return randn(g, 2, 7, module.in_features)
    return randn(g, 2, module.in_channels, 8, 8)


def forward_with(module, x, weight, bias):
    """The real layer op with a replaced weight / bias: the bypass oracle."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    padding = module.padding
    if module.padding_mode != "zeros":
        ph, pw = module.padding
        x, padding = F.pad(x, (pw, pw, ph, ph), mode=module.padding_mode), 0
    return F.conv2d(x, weight, bias, module.stride, padding, module.dilation, module.groups)


def conv_args(module):
    if isinstance(module, nn.Linear):
        return {}
    return dict(stride=module.stride, padding=module.padding, dilation=module.dilation)


def check_bypass(adapter, module, g, strength=1.0, dyn=None):
    """bypass == layer(x; W + ΔW, b + Δb) − layer(x)."""
    x = inputs(module, g)
    y = module(x)
    dw = adapter.delta(module.weight, strength, dyn)
    db = adapter.bias_delta(module.bias, strength)
    bias = module.bias if db is None else module.bias + db
    expected = forward_with(module, x, module.weight + dw, bias) - y
    # the reference is a difference of two whole outputs: its round-off scales with |y|, not
    # with the delta (seen at 3.5e-5 on a Tucker conv), hence the looser tolerance
    close(adapter.bypass(x, module, y, strength, dyn), expected, tol=1e-4)
    return x, y


def dims(module):
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    return module.out_channels, module.in_channels, tuple(module.kernel_size)


# ----------------------------------------------------------------------------- LoRA / LoCon


def lora_parts(module, rank, tucker, g, alpha=None):
    out, inp, k = dims(module)
    if tucker:
        down = randn(g, rank, inp, 1, 1, std=inp ** -0.5)
        mid = randn(g, rank, rank, *k, std=(rank * math.prod(k)) ** -0.5)
        up = randn(g, out, rank, 1, 1, std=rank ** -0.5)
        parts = {"lora_down.weight": down, "lora_mid.weight": mid, "lora_up.weight": up}
    else:
        down = randn(g, rank, inp, *k, std=(inp * math.prod(k)) ** -0.5)
        up = randn(g, out, rank, *([1] * len(k)), std=rank ** -0.5)
        parts = {"lora_down.weight": down, "lora_up.weight": up}
    parts["alpha"] = torch.tensor(float(rank / 2 if alpha is None else alpha))
    return parts


LORA_CASES = [("lin320", 8, False), ("lin768", 8, False), ("conv3", 16, False), ("conv3", 16, True),
              ("conv1", 8, False), ("conv3s", 4, True), ("conv3d", 4, False)]


@pytest.mark.parametrize("name,rank,tucker", LORA_CASES)
def test_lora_matches_lycoris(name, rank, tucker):
    module, g = layer(name), gen(1)
    parts = lora_parts(module, rank, tucker, g)
    a = make(parts)
    assert (a.algorithm, a.rank, a.linear) == ("lora", rank, True)
    scale = 0.5
    down, up, mid = parts["lora_down.weight"], parts["lora_up.weight"], parts.get("lora_mid.weight")
    expected = ly_locon.diff_weight(down, up, mid, gamma=scale).reshape(module.weight.shape)
    close(a.delta(module.weight), expected)
    x, y = check_bypass(a, module, g)
    ly = ly_locon.bypass_forward_diff(x, y, down, up, mid, gamma=scale, extra_args=conv_args(module))
    close(a.bypass(x, module, y), ly)


def test_peft_lora_a_b_with_default_alpha():
    module, g = layer("lin768"), gen(2)
    A, B = randn(g, 8, 768, std=768 ** -0.5), randn(g, 320, 8, std=8 ** -0.5)
    parts = {"lora_A.weight": A, "lora_B.weight": B}
    assert detect(parts) == "lora"
    close(make(parts).delta(module.weight), B @ A)  # no alpha anywhere: scale 1
    close(make(parts, default_alpha=16).delta(module.weight), 2 * (B @ A))  # lora_alpha / r
    parts["alpha"] = torch.tensor(4.0)  # a per-layer alpha beats metadata
    close(make(parts, default_alpha=16).delta(module.weight), 0.5 * (B @ A))
    check_bypass(make(parts, default_alpha=16), module, g, 0.7)


def test_lora_dyn_truncation():
    module, g = layer("lin320"), gen(3)
    parts = lora_parts(module, 8, False, g)
    a = make(parts)
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    close(a.delta(module.weight, 1.0, dyn=3), 0.5 * up[:, :3] @ down[:3])  # scale of the full rank
    close(a.delta(module.weight, 1.0, dyn=8), a.delta(module.weight))
    close(a.delta(module.weight, 1.0, dyn=None), 0.5 * up @ down)
    check_bypass(a, module, g, 0.8, dyn=3)
    conv = layer("conv3s")
    t = make(lora_parts(conv, 4, True, g))
    check_bypass(t, conv, g, 1.0, dyn=2)


def test_lora_scale_rules():
    module, g = layer("lin320"), gen(4)
    parts = lora_parts(module, 8, False, g, alpha=4)
    raw = parts["lora_up.weight"] @ parts["lora_down.weight"]
    close(make(parts).delta(module.weight), raw * 4 / 8)
    close(make({**parts, "scale": torch.tensor(0.7)}).delta(module.weight), raw * 0.7)  # A1111 `scale` wins
    no_alpha = {k: v for k, v in parts.items() if k != "alpha"}
    close(make(no_alpha).delta(module.weight), raw)
    close(make({**parts, "alpha": torch.tensor(0.0)}).delta(module.weight), raw)  # alpha 0 trains as alpha = r


def test_rs_lora_alpha_is_folded_by_lycoris():
    """LyCORIS rs_lora saves alpha·√r, so the plain alpha / r rule gives alpha / √r."""
    module = layer("lin320")
    torch.manual_seed(5)
    m = LoConModule("x", module, 1.0, lora_dim=16, alpha=4, rs_lora=True)
    nn.init.normal_(m.lora_up.weight, std=0.1)
    sd = {k: v for k, v in m.custom_state_dict().items()}
    a = make(sd)
    assert a.scale == pytest.approx(4 / math.sqrt(16)) == pytest.approx(m.scale)
    close(a.delta(module.weight), m.get_diff_weight(1.0)[0])


def test_lora_linear_factors_fit_a_1x1_conv():
    conv, g = layer("conv1"), gen(6)
    parts = {"lora_down.weight": randn(g, 4, 320, std=0.05), "lora_up.weight": randn(g, 320, 4, std=0.5)}
    a = make(parts)
    assert a.check(tuple(conv.weight.shape)) is None
    assert a.delta(conv.weight).shape == conv.weight.shape
    check_bypass(a, conv, g)


# ----------------------------------------------------------------------------- LoHa


def loha_parts(module, rank, tucker, g):
    out, inp, k = dims(module)
    K = math.prod(k)
    sa, sb = rank ** -0.5, (inp * K) ** -0.25
    if tucker:
        p = {"hada_w1_a": randn(g, rank, out, std=sa), "hada_w1_b": randn(g, rank, inp, std=sb),
             "hada_w2_a": randn(g, rank, out, std=sa), "hada_w2_b": randn(g, rank, inp, std=sb),
             "hada_t1": randn(g, rank, rank, *k, std=(rank * K) ** -0.5),
             "hada_t2": randn(g, rank, rank, *k, std=(rank * K) ** -0.5)}
    else:
        p = {"hada_w1_a": randn(g, out, rank, std=sa), "hada_w1_b": randn(g, rank, inp * K, std=sb),
             "hada_w2_a": randn(g, out, rank, std=sa), "hada_w2_b": randn(g, rank, inp * K, std=sb)}
    p["alpha"] = torch.tensor(rank / 2)
    return p


@pytest.mark.parametrize("name,rank,tucker", [("lin320", 8, False), ("lin768", 4, False), ("conv3", 8, False),
                                              ("conv3", 8, True), ("conv3s", 4, True), ("conv1", 4, False)])
def test_loha_matches_lycoris(name, rank, tucker):
    module, g = layer(name), gen(7)
    p = loha_parts(module, rank, tucker, g)
    a = make(p)
    assert (a.algorithm, a.rank, a.linear) == ("loha", rank, True)
    # Functional API, not LohaModule: its get_diff_weight applies alpha / r twice (formats.md 5.2).
    expected = ly_loha.diff_weight(p["hada_w1_b"], p["hada_w1_a"], p["hada_w2_b"], p["hada_w2_a"],
                                   p.get("hada_t1"), p.get("hada_t2"), gamma=0.5)
    close(a.delta(module.weight), expected.reshape(module.weight.shape))
    check_bypass(a, module, g, 0.6)


# ----------------------------------------------------------------------------- LoKr


def lokr_parts(kind, module, g, rank=8):
    """LoKr factorisations: 'w2ab' (w1 full, w2 low rank), 'full' (both full), 'both' (both
    decomposed), 'tucker' (conv: w2 Tucker), 'w2conv' (conv: w2 full 4-D)."""
    out, inp, k = dims(module)
    a, c = {320: 16, 640: 16, 128: 8}[out], {320: 16, 768: 24, 64: 8}[inp]
    b, d, K = out // a, inp // c, math.prod(k)
    s1 = c ** -0.5
    s2 = (d * K) ** -0.5
    p = {}
    if kind == "both":
        p["lokr_w1_a"], p["lokr_w1_b"] = randn(g, a, rank, std=rank ** -0.5), randn(g, rank, c, std=s1)
    else:
        p["lokr_w1"] = randn(g, a, c, std=s1)
    if kind == "full":
        p["lokr_w2"] = randn(g, b, d, std=s2)
    elif kind == "w2conv":
        p["lokr_w2"] = randn(g, b, d, *k, std=s2)
    elif kind == "tucker":
        p["lokr_w2_a"], p["lokr_w2_b"] = randn(g, rank, b, std=rank ** -0.5), randn(g, rank, d, std=d ** -0.5)
        p["lokr_t2"] = randn(g, rank, rank, *k, std=(rank * K) ** -0.5)
    else:
        p["lokr_w2_a"], p["lokr_w2_b"] = randn(g, b, rank, std=rank ** -0.5), randn(g, rank, d * K, std=s2)
    p["alpha"] = torch.tensor(rank / 4)
    return p


LOKR_CASES = [("lin320", "w2ab"), ("lin768", "full"), ("lin768", "both"), ("conv3", "w2ab"),
              ("conv3", "tucker"), ("conv3", "w2conv"), ("conv3s", "tucker"), ("conv3d", "w2ab"), ("conv1", "w2ab")]


@pytest.mark.parametrize("name,kind", LOKR_CASES)
def test_lokr_matches_lycoris(name, kind):
    module, g = layer(name), gen(8)
    p = lokr_parts(kind, module, g)
    a = make(p)
    assert (a.algorithm, a.linear) == ("lokr", True)
    scale = 1.0 if kind in ("full", "w2conv") else 0.25  # both full: 1 whatever alpha says
    assert a.scale == scale and a.rank == (None if scale == 1 else 8)
    f = [p.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")]
    # Functional API: LokrModule.get_diff_weight, like LoHa's, applies the scale twice.
    # functional LoKr computes scale = gamma / rank with rank read off w1_a / w2_a's 2nd dim (for
    # Tucker that is `b`, not the rank: formats.md 5.2), so hand it the gamma that yields our scale.
    rank_read = f[1].shape[1] if f[1] is not None else f[4].shape[1] if f[4] is not None else None
    gamma = scale * rank_read if rank_read else 1.0
    close(a.delta(module.weight), ly_lokr.diff_weight(*f, gamma=gamma).reshape(module.weight.shape))
    x, y = check_bypass(a, module, g, 0.9)
    if isinstance(module, nn.Linear):  # LyCORIS' Kronecker bypass reads the rank off the b factor
        rank_b = f[2].shape[0] if f[0] is None else f[5].shape[0] if f[3] is None else None
        ly = ly_lokr.bypass_forward_diff(x, y, *f, gamma=scale * rank_b if rank_b else 1.0)
        close(a.bypass(x, module, y), ly)


# ----------------------------------------------------------------------------- DoRA


def inner_delta(algorithm, parts, weight):
    """The inner ΔW at s = 1 from LyCORIS functional, with our scale."""
    if algorithm == "lora":
        d = ly_locon.diff_weight(parts["lora_down.weight"], parts["lora_up.weight"],
                                 parts.get("lora_mid.weight"), gamma=0.5)
    elif algorithm == "loha":
        d = ly_loha.diff_weight(parts["hada_w1_b"], parts["hada_w1_a"], parts["hada_w2_b"], parts["hada_w2_a"],
                                parts.get("hada_t1"), parts.get("hada_t2"), gamma=0.5)
    else:
        f = [parts.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")]
        d = ly_lokr.diff_weight(*f, None, gamma=0.25 * f[4].shape[1])
    return d.reshape(weight.shape)


def magnitude(weight, axis, g):
    if axis == "out":
        m = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        m = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        m = m.reshape(1, -1, *[1] * (weight.dim() - 2))
    return m * (1 + 0.2 * torch.rand(m.shape, generator=g))


DORA_CASES = [("lora", "lin320"), ("lora", "conv3"), ("loha", "lin768"), ("loha", "conv3s"),
              ("lokr", "lin320"), ("lokr", "conv3")]


@pytest.mark.parametrize("algorithm,name", DORA_CASES)
@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_matches_lycoris(algorithm, name, axis):
    module, g = layer(name), gen(9)
    base = {"lora": lambda: lora_parts(module, 8, False, g), "loha": lambda: loha_parts(module, 4, False, g),
            "lokr": lambda: lokr_parts("w2ab", module, g)}[algorithm]()
    W = module.weight
    m = magnitude(W, axis, g)
    a = make({**base, "dora_scale": m})
    assert (a.algorithm, a.linear) == ("dora" if algorithm == "lora" else f"{algorithm}+dora", True)
    dw = inner_delta(algorithm, base, W)
    if axis == "in":  # LyCORIS functional: W + s·(m·(W+ΔW)/‖W+ΔW‖_col − W), our form exactly
        for s in (1.0, 0.3):
            close(a.delta(W, s), apply_dora_scale(W, dw, m, s) - W)
    else:  # LyCORIS' DoRA epilogue at s = 1 (its s ≠ 1 form is not ours: see dora.py)
        close(a.delta(W), weight_decompose(W + dw, m, 1, wd_on_out=True) - W)
        close(a.delta(W, 0.3), 0.3 * (weight_decompose(W + dw, m, 1, wd_on_out=True) - W))
    check_bypass(a, module, g, 0.7)


def test_dora_output_axis_matches_lycoris_locon_module():
    module, g = layer("conv3s"), gen(10)
    p = lora_parts(module, 4, True, g)
    m = magnitude(module.weight, "out", g)
    ly = LoConModule.make_module_from_state_dict("x", module, p["lora_up.weight"], p["lora_down.weight"],
                                                 p["lora_mid.weight"], p["alpha"], m)
    close(make({**p, "dora_scale": m}).delta(module.weight), ly.get_merged_weight(1.0)[0] - module.weight)


def test_dora_rejects_a_magnitude_on_no_axis():
    module, g = layer("lin768"), gen(11)
    a = make({**lora_parts(module, 4, False, g), "dora_scale": torch.ones(7, 1)})
    msg = a.check(tuple(module.weight.shape))
    assert "dora_scale" in msg and "[7, 1]" in msg and "[320, 768]" in msg
    with pytest.raises(FormatError):
        a.delta(module.weight)


# ----------------------------------------------------------------------------- GLoRA


def glora_parts(module, rank, g, old=False):
    out, inp, k = dims(module)
    sa = inp ** -0.5
    if old:
        p = {"a1.weight": randn(g, rank, inp, std=sa), "a2.weight": randn(g, inp, rank, std=rank ** -0.5),
             "b1.weight": randn(g, rank, inp, std=sa), "b2.weight": randn(g, out, rank, std=rank ** -0.5)}
    else:
        one = [1] * len(k)
        p = {"a1.weight": randn(g, inp, rank, *one, std=rank ** -0.5), "a2.weight": randn(g, rank, inp, *one, std=sa),
             "b1.weight": randn(g, out, rank, *one, std=rank ** -0.5),
             "b2.weight": randn(g, rank, inp, *k, std=(inp * math.prod(k)) ** -0.5)}
    p["alpha"] = torch.tensor(rank / 2)
    return p


@pytest.mark.parametrize("name,rank", [("lin320", 8), ("lin768", 8), ("conv3", 8), ("conv3s", 4), ("conv1", 4)])
def test_glora_matches_lycoris_module(name, rank):
    module, g = layer(name), gen(12)
    p = glora_parts(module, rank, g)
    a = make(p)
    assert (a.algorithm, a.rank, a.old, a.linear) == ("glora", rank, False, True)
    ly = GLoRAModule.make_module_from_state_dict("x", module, p["a1.weight"], p["a2.weight"], p["b1.weight"],
                                                 p["b2.weight"], None, p["alpha"])
    for s in (1.0, 0.4):
        close(a.delta(module.weight, s), ly.get_diff_weight(s)[0].reshape(module.weight.shape))
    x, y = check_bypass(a, module, g, 0.8)
    # LyCORIS' bypass runs the layer a second time on A·x, bias included; ours is exactly Δy.
    bias = module.bias if isinstance(module, nn.Linear) else module.bias.view(1, -1, 1, 1)
    close(a.bypass(x, module, y, 0.8), ly.bypass_forward_diff(x, 0.8) - bias)


def test_glora_tucker_bm_matches_lycoris():
    module, g = layer("conv3s"), gen(13)
    r = 4
    p = {"a1.weight": randn(g, 64, r, 1, 1, std=0.5), "a2.weight": randn(g, r, 64, 1, 1, std=0.125),
         "b1.weight": randn(g, 128, r, 1, 1, std=0.5), "b2.weight": randn(g, r, 64, 1, 1, std=0.125),
         "bm.weight": randn(g, r, r, 3, 3, std=1 / 6), "alpha": torch.tensor(2.0)}
    a = make(p)
    expected = _glora_weight(module.weight, p["a1.weight"], p["a2.weight"], p["b1.weight"], p["b2.weight"],
                             p["bm.weight"], 0.5)
    close(a.delta(module.weight), expected)
    check_bypass(a, module, g)


@pytest.mark.parametrize("name", ["lin320", "lin768"])
def test_glora_old_layout(name):
    """Old layout: LyCORIS no longer reads it; ComfyUI's / A1111's formula is the reference."""
    module, g = layer(name), gen(14)
    p = glora_parts(module, 8, g, old=True)
    a = make(p)
    assert a.old and a.rank == 8
    W = module.weight
    expected = 0.5 * (p["b2.weight"] @ p["b1.weight"] + (W @ p["a2.weight"]) @ p["a1.weight"])
    close(a.delta(W), expected)
    check_bypass(a, module, g, 0.5)


# ----------------------------------------------------------------------------- IA3


@pytest.mark.parametrize("name", ["lin768", "conv3"])
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_matches_lycoris_module(name, on_input):
    module, g = layer(name), gen(15)
    out, inp, k = dims(module)
    n = inp if on_input else out
    ly = IA3Module("x", module, 1.0, train_on_input=on_input)
    ly.weight.copy_(randn(g, *ly.weight.shape, std=0.3))
    parts = {"weight": ly.weight.clone(), "on_input": torch.tensor(int(on_input))}
    assert detect(parts) == "ia3"
    a = make(parts)
    assert a.w.numel() == n and a.linear
    for s in (1.0, 0.6):
        close(a.delta(module.weight, s), ly.get_diff_weight(s)[0])
    check_bypass(a, module, g, 0.6)


# ----------------------------------------------------------------------------- full / diff


@pytest.mark.parametrize("name", ["lin320", "conv3s"])
def test_full_matches_lycoris_module(name):
    module, g = layer(name), gen(16)
    diff = randn(g, *module.weight.shape, std=0.05)
    diff_b = randn(g, *module.bias.shape, std=0.05)
    a = make({"diff": diff, "diff_b": diff_b})
    ly = FullModule.make_module_from_state_dict("x", module, diff, diff_b)
    for s in (1.0, 0.3):
        dw, db = ly.get_diff_weight(s)
        close(a.delta(module.weight, s), dw)
        close(a.bias_delta(module.bias, s), db)
    check_bypass(a, module, g, 0.3)


# ----------------------------------------------------------------------------- norm


@pytest.mark.parametrize("kind", ["layer", "group"])
def test_norm_matches_lycoris_module(kind):
    g = gen(17)
    torch.manual_seed(17)
    module = nn.LayerNorm(320) if kind == "layer" else nn.GroupNorm(32, 320)
    nn.init.normal_(module.weight)
    nn.init.normal_(module.bias)
    w_norm, b_norm = randn(g, 320, std=0.2), randn(g, 320, std=0.2)
    a = make({"w_norm": w_norm, "b_norm": b_norm})
    ly = NormModule.make_module_from_state_dict("x", module, w_norm, b_norm)
    x = randn(g, 2, 9, 320) if kind == "layer" else randn(g, 2, 320, 4, 4)
    y = module(x)
    for s in (1.0, 0.3):
        dw, db = ly.get_diff_weight(s)
        close(a.delta(module.weight, s), dw)
        close(a.bias_delta(module.bias, s), db)
        w, b = module.weight + dw, module.bias + db
        real = F.layer_norm(x, (320,), w, b, module.eps) if kind == "layer" else F.group_norm(x, 32, w, b, module.eps)
        close(a.bypass(x, module, y, s), real - y)
        ly.multiplier = s
        close(a.bypass(x, module, y, s), ly.forward(x) - y)


# ----------------------------------------------------------------------------- OFT


def oft_parts(module, b, g, alpha=0.0, rescale=False):
    out = dims(module)[0]
    p = {"oft_blocks": randn(g, out // b, b, b, std=0.1), "alpha": torch.tensor(alpha)}
    if rescale:
        p["rescale"] = 1 + randn(g, out, *[1] * (module.weight.dim() - 1), std=0.1)
    return p


OFT_CASES = [("lin320", 8, 0.0, False), ("lin768", 16, 5e-3, False), ("conv3", 8, 0.0, True),
             ("conv1", 8, 5e-3, True), ("conv3s", 4, 0.0, False)]


@pytest.mark.parametrize("name,b,alpha,rescale", OFT_CASES)
def test_oft_matches_lycoris(name, b, alpha, rescale):
    module, g = layer(name), gen(18)
    p = oft_parts(module, b, g, alpha, rescale)
    a = make(p)
    assert (a.algorithm, a.linear) == ("oft", True)
    out = dims(module)[0]
    kappa = alpha * out  # kohya / LyCORIS trainers: the saved alpha is per output channel
    blocks, rs = p["oft_blocks"], p.get("rescale")
    assert alpha == 0 or (blocks - blocks.transpose(1, 2)).norm() > kappa  # the clamp is exercised
    at1 = ly_oft.diff_weight(module.weight, blocks, rs, constraint=kappa)
    close(a.delta(module.weight), at1)
    if rs is None:  # LyCORIS module: (s·R − s·I)ᵀW at any s, and κ = alpha·out from the saved alpha
        ly = DiagOFTModule.make_module_from_state_dict("x", module, blocks, None, p["alpha"])
        close(a.delta(module.weight, 0.3), ly.get_diff_weight(0.3)[0])
    else:  # LyCORIS leaves (rescale − 1)·W at s = 0; ours interpolates linearly to the trained weight
        close(a.delta(module.weight, 0.3), 0.3 * at1)
    x, y = check_bypass(a, module, g, 0.7)
    # LyCORIS' output transform includes the bias; feed it the bias-free output.
    z = y - (module.bias if isinstance(module, nn.Linear) else module.bias.view(1, -1, 1, 1))
    ly_dy = ly_oft.bypass_forward_diff(x, z, blocks, rs, constraint=kappa, need_transpose=not isinstance(module, nn.Linear))
    close(a.bypass(x, module, y), ly_dy)


def test_oft_constraint_clamps():
    module, g = layer("lin320"), gen(19)
    p = oft_parts(module, 8, g)
    free = make(p).delta(module.weight)
    clamped = make({**p, "alpha": torch.tensor(1e-4)}).delta(module.weight)
    assert clamped.norm() < 0.5 * free.norm()


def test_oft_diag_holds_the_rotation():
    """Old LyCORIS `oft_diag` is R itself (A1111, SD.Next): ΔW = s·(RᵀW − W) blockwise."""
    module, g = layer("conv1"), gen(20)
    q = randn(g, 40, 8, 8, std=0.1)
    q = q - q.transpose(1, 2)
    eye = torch.eye(8)
    R = (eye + q) @ torch.linalg.inv(eye - q)
    W = module.weight
    expected = torch.einsum("knm,kni->kmi", R, W.reshape(40, 8, -1)).reshape(W.shape) - W
    parts = {"oft_diag": R, "alpha": torch.tensor(5.0)}
    assert detect(parts) == "oft"
    close(make(parts).delta(W, 0.5), 0.5 * expected)
    close(make({"oft_diag": R - eye}).delta(W), expected)  # the early R − I variant
    check_bypass(make(parts), module, g, 0.5)


# ----------------------------------------------------------------------------- BOFT


def boft_parts(module, m, b, g, alpha=0.0, rescale=False):
    out = dims(module)[0]
    p = {"oft_blocks": randn(g, m, out // b, b, b, std=0.1), "alpha": torch.tensor(alpha)}
    if rescale:
        p["rescale"] = 1 + randn(g, out, *[1] * (module.weight.dim() - 1), std=0.1)
    return p


BOFT_CASES = [("lin320", 3, 10, 0.0, False), ("lin768", 2, 20, 5e-3, True), ("conv3", 4, 10, 0.0, True),
              ("conv3s", 3, 8, 0.0, False)]


@pytest.mark.parametrize("name,m,b,alpha,rescale", BOFT_CASES)
def test_boft_matches_lycoris(name, m, b, alpha, rescale):
    module, g = layer(name), gen(21)
    p = boft_parts(module, m, b, g, alpha, rescale)
    a = make(p)
    assert (a.algorithm, a.linear) == ("boft", False)
    kappa = alpha * dims(module)[0]
    blocks, rs = p["oft_blocks"], p.get("rescale")
    for s in (1.0, 0.3):
        # s enters every stage as s·R + (1 − s)·I in both; we also take rescale as 1 + s·(rescale − 1)
        rs_s = None if rs is None else 1 + s * (rs - 1)
        close(a.delta(module.weight, s), ly_boft.diff_weight(module.weight, blocks, rs_s, constraint=kappa, scale=s))
    x, y = check_bypass(a, module, g, 0.6)
    z = y - (module.bias if isinstance(module, nn.Linear) else module.bias.view(1, -1, 1, 1))
    ly_dy = ly_boft.bypass_forward_diff(z, blocks, rs, constraint=kappa,
                                        need_transpose=not isinstance(module, nn.Linear))
    close(a.bypass(x, module, y), ly_dy)


def test_boft_is_not_linear_in_strength():
    module, g = layer("lin320"), gen(22)
    a = make(boft_parts(module, 3, 10, g))
    d1, d3 = a.delta(module.weight, 1.0), a.delta(module.weight, 0.3)
    assert (d3 - 0.3 * d1).abs().max() > 1e-4 * d1.abs().max()


# ----------------------------------------------------------------------------- every algorithm


def every_adapter(g):
    """(algorithm, host module, parts) for one case of every algorithm and DoRA."""
    lin, conv = layer("lin320"), layer("conv3s")
    return [
        ("lora", conv, lora_parts(conv, 4, True, g)),
        ("loha", lin, loha_parts(lin, 4, False, g)),
        ("lokr", conv, lokr_parts("tucker", conv, g)),
        ("dora", lin, {**lora_parts(lin, 4, False, g), "dora_scale": magnitude(lin.weight, "out", g)}),
        ("dora", conv, {**lokr_parts("w2ab", conv, g), "dora_scale": magnitude(conv.weight, "in", g)}),
        ("glora", conv, glora_parts(conv, 4, g)),
        ("ia3", lin, {"weight": randn(g, 320, std=0.3), "on_input": torch.tensor(0)}),
        ("full", conv, {"diff": randn(g, *conv.weight.shape, std=0.05), "diff_b": randn(g, 128, std=0.05)}),
        ("oft", lin, oft_parts(lin, 8, g, rescale=True)),
        ("boft", conv, boft_parts(conv, 2, 8, g, rescale=True)),
    ]


@pytest.mark.parametrize("index", range(10))
def test_strength_zero_and_linearity(index):
    g = gen(23)
    name, module, parts = every_adapter(g)[index]
    a = make(parts)
    W = module.weight
    assert torch.count_nonzero(a.delta(W, 0.0)) == 0
    db = a.bias_delta(module.bias, 0.0)
    assert db is None or torch.count_nonzero(db) == 0
    x = inputs(module, g)
    y = module(x)
    assert a.bypass(x, module, y, 0.0).abs().max() < 1e-6 * max(1.0, y.abs().max().item())
    if a.linear:
        close(a.delta(W, 0.3), 0.3 * a.delta(W, 1.0), tol=1e-6)
        close(a.bypass(x, module, y, 0.3), 0.3 * a.bypass(x, module, y, 1.0))
    assert a.linear == (name != "boft")


def test_norm_strength_zero():
    a = make({"w_norm": torch.ones(8), "b_norm": torch.ones(8)})
    assert torch.count_nonzero(a.delta(torch.ones(8), 0.0)) == 0
    assert torch.count_nonzero(a.bias_delta(torch.ones(8), 0.0)) == 0
    close(a.delta(torch.ones(8), 0.3), 0.3 * a.delta(torch.ones(8)))


def test_half_precision_inputs():
    g = gen(24)
    module = layer("lin768")
    p32 = lora_parts(module, 8, False, g)
    p16 = {k: v.to(torch.float16) for k, v in p32.items()}
    a = make(p16)
    assert a.nbytes == sum(v.numel() * 2 for v in p16.values() if v.dim() > 0)  # kept in fp16
    ref = make({k: v.float() for k, v in p16.items()})
    dw = a.delta(module.weight.to(torch.bfloat16))
    assert dw.dtype == torch.float32
    close(dw, ref.delta(module.weight))  # computed in fp32 from the half values: no half rounding
    half = layer("lin768").to(torch.float16)
    x = inputs(half, g).to(torch.float16)
    y = half(x)
    dy = a.bypass(x, half, y)
    assert dy.dtype == torch.float16
    close(dy, ref.bypass(x.float(), module, y.float()), tol=2e-3)
    conv = layer("conv3s")
    b16 = {k: v.to(torch.bfloat16) for k, v in lokr_parts("tucker", conv, g).items()}
    close(make(b16).delta(conv.weight), make({k: v.float() for k, v in b16.items()}).delta(conv.weight))



# ----------------------------------------------------------------------------- detect / make / check


DETECT = [
    ({"lora_down.weight", "lora_up.weight", "alpha", "lora_mid.weight", "dora_scale", "scale"}, "lora"),
    ({"lora_A.weight", "lora_B.weight"}, "lora"),
    ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}, "loha"),
    ({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}, "lokr"),
    ({"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}, "glora"),
    ({"weight", "on_input"}, "ia3"),
    ({"oft_diag"}, "oft"),
    ({"diff", "diff_b"}, "full"),
    ({"w_norm", "b_norm"}, "norm"),
    ({"alpha"}, None),
    ({"something.else"}, None),
]


@pytest.mark.parametrize("names,expected", DETECT)
def test_detect(names, expected):
    assert detect({n: torch.zeros(2, 2) for n in names}) == expected


def test_detect_by_names_only():
    """The loader asks with part -> key-name maps; only BOFT needs the tensor (then: "oft")."""
    assert detect({"lora_up.weight": "k1", "lora_down.weight": "k2", "alpha": "k3"}) == "lora"
    assert detect({"hada_w1_a": "k"}) == "loha" and detect({"oft_blocks": "k"}) == "oft"


def test_detect_oft_vs_boft_by_rank_of_blocks():
    assert detect({"oft_blocks": torch.zeros(4, 8, 8), "alpha": torch.tensor(0.0), "rescale": torch.ones(32, 1)}) == "oft"
    assert detect({"oft_blocks": torch.zeros(2, 4, 8, 8)}) == "boft"


BAD_PARTS = [
    ({"lora_up.weight": torch.zeros(8, 4)}, "lora_down.weight"),
    ({"lora_down.weight": torch.zeros(4, 16), "lora_up.weight": torch.zeros(8, 5)}, "[out, 4"),
    ({"lora_down.weight": torch.zeros(4, 16, 3, 3), "lora_up.weight": torch.zeros(8, 4, 1, 1),
      "lora_mid.weight": torch.zeros(4, 4, 3, 3)}, "lora_mid"),
    ({"hada_w1_a": torch.zeros(8, 4), "hada_w1_b": torch.zeros(4, 16), "hada_w2_a": torch.zeros(8, 4)}, "hada_w2_b"),
    ({"hada_w1_a": torch.zeros(8, 4), "hada_w1_b": torch.zeros(4, 16), "hada_w2_a": torch.zeros(8, 4),
      "hada_w2_b": torch.zeros(4, 12)}, "inconsistent"),
    ({"lokr_w1": torch.zeros(2, 2)}, "lokr_w2"),
    ({"lokr_w1": torch.zeros(2, 2), "lokr_w2_a": torch.zeros(4, 3), "lokr_w2_b": torch.zeros(2, 4)}, "rank"),
    ({"a1.weight": torch.zeros(16, 4), "a2.weight": torch.zeros(4, 16), "b1.weight": torch.zeros(8, 4)}, "b2.weight"),
    ({"a1.weight": torch.zeros(16, 4), "a2.weight": torch.zeros(5, 16), "b1.weight": torch.zeros(8, 4),
      "b2.weight": torch.zeros(4, 16)}, "neither layout"),
    ({"oft_blocks": torch.zeros(4, 8, 7)}, "[n, b, b]"),
    ({"oft_blocks": torch.zeros(2, 4, 7, 7)}, "butterfly"),
    ({"oft_blocks": torch.zeros(4, 8, 8), "rescale": torch.ones(16, 1)}, "rescale"),
    ({"diff_b": torch.zeros(4)}, "diff"),
    ({"b_norm": torch.zeros(4)}, "w_norm"),
    ({"weight": torch.zeros(4, 4), "on_input": torch.tensor(0)}, "vector"),
    ({"lora_down.weight": torch.zeros(4, 16), "lora_up.weight": torch.zeros(8, 4), "hada_w1_a": torch.zeros(8, 4)},
     "mixes"),
    ({"alpha": torch.tensor(1.0)}, "no known algorithm"),
    ({"weight": torch.zeros(8), "on_input": torch.tensor(0), "dora_scale": torch.ones(8, 1)}, "dora"),
]


@pytest.mark.parametrize("parts,fragment", BAD_PARTS)
def test_make_raises_format_error(parts, fragment):
    with pytest.raises(FormatError) as err:
        make(parts)
    assert fragment in str(err.value)


def test_check_names_expected_and_found():
    g = gen(25)
    lin = layer("lin320")
    cases = [
        (make(lora_parts(lin, 8, False, g)), (640, 320), "[320, 320]"),
        (make(lora_parts(layer("conv3"), 8, True, g)), (640, 320, 1, 1), "[640, 320, 3, 3]"),
        (make(loha_parts(lin, 4, False, g)), (320, 768), "[320, 320 (in × kernel)]"),
        (make(lokr_parts("w2ab", lin, g)), (320, 640), "[320, 320 (in × kernel)]"),
        (make(glora_parts(lin, 4, g)), (320, 768), "320"),
        (make({"weight": torch.zeros(320), "on_input": torch.tensor(1)}), (320, 768), "320"),
        (make(oft_parts(lin, 8, g)), (640, 320), "320 output channels"),
        (make(boft_parts(lin, 2, 10, g)), (640, 320), "320 output channels"),
        (make({"diff": torch.zeros(320, 320)}), (320, 768), "[320, 320]"),
        (make({"w_norm": torch.zeros(320)}), (640,), "320"),
    ]
    for adapter, bad, expected in cases:
        msg = adapter.check(bad)
        assert msg and expected in msg and str(list(bad)) in msg, (adapter, msg)
        with pytest.raises(FormatError):
            adapter.delta(torch.zeros(bad))
    assert cases[0][0].check((320, 320)) is None


def test_adapter_metadata():
    g = gen(26)
    lin = layer("lin320")
    parts = {**lora_parts(lin, 8, False, g), "lora_te_extra": torch.zeros(1)}
    a = make(parts)
    assert isinstance(a, Adapter)
    assert a.ignored == ("lora_te_extra",)
    assert a.nbytes == (8 * 320 + 320 * 8) * 4
    assert make(lokr_parts("full", layer("lin768"), g)).rank is None
    dora = make({**lora_parts(lin, 8, False, g), "dora_scale": torch.ones(320, 1)})
    assert dora.nbytes == (8 * 320 * 2 + 320) * 4 and dora.rank == 8
    assert make({"diff": torch.zeros(3, 3)}).bias_delta(None) is None
    assert make(lora_parts(lin, 8, False, g)).bias_delta(lin.bias) is None


def test_lokr_scale_rules():
    lin, g = layer("lin320"), gen(27)
    p = lokr_parts("w2ab", lin, g)
    assert make(p).scale == 0.25  # alpha 2 / rank 8 of the decomposed factor
    assert make({k: v for k, v in p.items() if k != "alpha"}).scale == 1.0
    assert make({**p, "scale": torch.tensor(0.6)}).scale == pytest.approx(0.6)
    full = lokr_parts("full", layer("lin768"), g)
    assert make({**full, "alpha": torch.tensor(123.0)}).scale == 1.0


def test_loha_and_glora_scale_is_alpha_over_rank():
    lin, g = layer("lin320"), gen(28)
    assert make({**loha_parts(lin, 4, False, g), "alpha": torch.tensor(1.0)}).scale == 0.25
    assert make({**glora_parts(lin, 8, g), "alpha": torch.tensor(2.0)}).scale == 0.25
    assert make({k: v for k, v in glora_parts(lin, 8, g).items() if k != "alpha"}).scale == 1.0


@pytest.mark.parametrize("kind", ["lora", "lokr", "glora"])
def test_reflect_padding_is_honoured(kind):
    module, g = layer("conv3r"), gen(30)
    parts = {"lora": lambda: lora_parts(module, 4, True, g), "lokr": lambda: lokr_parts("tucker", module, g),
             "glora": lambda: glora_parts(module, 4, g)}[kind]()
    check_bypass(make(parts), module, g, 0.9)


def test_grouped_conv_bypass_rebuilds():
    torch.manual_seed(29)
    conv, g = nn.Conv2d(64, 128, 3, padding=1, groups=2), gen(29)
    parts = {"lora_down.weight": randn(g, 4, 32, 3, 3, std=0.05), "lora_up.weight": randn(g, 128, 4, 1, 1, std=0.5)}
    check_bypass(make(parts), conv, g)
