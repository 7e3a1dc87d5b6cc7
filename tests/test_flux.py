"""The Flux family (Flux.1, Chroma): both trees a host may hold, every published LoRA key
format, fused and split layers both ways, blocks, `<model:>`, detection.

The reference for every format is a network defined on the original (BFL) layers, merged
into a copy of the BFL tree by hand; a file in each format is written from it, applied by the
engine on the diffusers tree and on the BFL tree (tests/flux_bfl.py), and both outputs must
match the reference.
"""
import copy

import pytest
import torch
from safetensors.torch import save_file

from engine_helpers import assert_pristine, make_engine, plan, snapshot
from flux_bfl import bfl_state_dict, from_diffusers
from tinymodels import FLUX_CONTEXT, FLUX_POOLED, flux_transformer, flux_trees

from netweave.network.detect import detect_architecture
from netweave.network.files import NetworkFileError
from netweave.network.flux_keys import FUSED, RENAMED, SWAPPED, _match
from netweave.network.keymap import KeyMap
from netweave.network.loader import load_checkpoint, load_network

RANK, ALPHA = 4, 2.0
H, W, TXT = 4, 6, 5  # latent grid of packed tokens, text tokens


def inputs(batch=2):
    torch.manual_seed(11)
    ids = torch.zeros(H, W, 3)
    ids[..., 1], ids[..., 2] = torch.arange(H)[:, None], torch.arange(W)[None]
    return dict(img=torch.randn(batch, H * W, 64), txt=torch.randn(batch, TXT, FLUX_CONTEXT),
                pooled=torch.randn(batch, FLUX_POOLED), t=torch.full((batch,), 0.6),
                g=torch.full((batch,), 3.5), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TXT, 3))


def run(model, x):
    with torch.no_grad():
        if hasattr(model, "double_blocks"):
            b = x["img"].shape[0]
            return model(x["img"], x["img_ids"][None].expand(b, -1, -1), x["txt"],
                         x["txt_ids"][None].expand(b, -1, -1), x["t"], x["pooled"], x["g"])
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"],
                     pooled_projections=x["pooled"], timestep=x["t"], img_ids=x["img_ids"],
                     txt_ids=x["txt_ids"], guidance=x["g"]).sample


def test_the_bfl_tree_computes_what_diffusers_computes():
    model = flux_transformer().eval()
    bfl = from_diffusers(model).eval()
    x = inputs()
    assert torch.allclose(run(model, x), run(bfl, x), atol=1e-5)


# ---- a network defined on the canonical (BFL) layers ---------------------------------------
def canonical_layers(bfl):
    return {n: m for n, m in bfl.named_modules() if isinstance(m, torch.nn.Linear)}


def random_network(bfl, seed=5):
    """{canonical layer: (down [r, in], up [out, r])}, ΔW = ALPHA / RANK · up · down."""
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(RANK, m.in_features, generator=g) * 0.3,
                torch.randn(m.out_features, RANK, generator=g) * 0.3)
            for n, m in canonical_layers(bfl).items()}


def merged_reference(bfl, deltas):
    """A copy of the BFL tree with ΔW added to the named layers' weights."""
    ref = copy.deepcopy(bfl)
    layers = canonical_layers(ref)
    with torch.no_grad():
        for name, dw in deltas.items():
            layers[name].weight += dw
    return ref


def lora_deltas(net, strength=1.0):
    return {n: strength * ALPHA / RANK * up @ down for n, (down, up) in net.items()}


def _us(name):
    return name.replace(".", "_")


def diffusers_parts(layer, rows, width):
    """(diffusers name, rows of the canonical layer in the diffusers layer's own order)."""
    hit = _match(FUSED, layer)
    if hit:
        sizes = (width,) * 3 + ((rows - 3 * width,) if layer.endswith("linear1") else ())
        if not layer.endswith("linear1"):
            sizes = (rows // 3,) * 3
        start, out = 0, []
        for part, n in zip(FUSED[hit[0]], sizes):
            out.append((part.replace("{}", hit[1]), torch.arange(start, start + n)))
            start += n
        return out
    hit = _match(SWAPPED, layer)
    if hit:
        half = rows // 2
        return [(SWAPPED[hit[0]], torch.cat([torch.arange(half, rows), torch.arange(half)]))]
    hit = _match(RENAMED, layer)
    return [(RENAMED[hit[0]].replace("{}", hit[1]), torch.arange(rows))] if hit else []


def write_format(path, net, fmt):
    """The network in one published key format; returns the ΔW per canonical layer it holds."""
    sd, scale = {}, ALPHA / RANK
    held = set(net)
    for layer, (down, up) in net.items():
        rows, width = up.shape[0], down.shape[1]
        if fmt == "kohya":  # sd-scripts: BFL names, fused, alpha
            sd.update({f"lora_unet_{_us(layer)}.lora_down.weight": down,
                       f"lora_unet_{_us(layer)}.lora_up.weight": up,
                       f"lora_unet_{_us(layer)}.alpha": torch.tensor(ALPHA)})
        elif fmt == "comfy":  # ComfyUI/BFL names, lora_A/B, alpha baked in
            sd.update({f"diffusion_model.{layer}.lora_A.weight": down,
                       f"diffusion_model.{layer}.lora_B.weight": up * scale})
        elif fmt in ("diffusers", "onetrainer"):  # split names; a fused layer: one down, cut up
            for name, idx in diffusers_parts(layer, rows, width):
                if fmt == "diffusers":
                    sd.update({f"transformer.{name}.lora_A.weight": down,
                               f"transformer.{name}.lora_B.weight": up[idx] * scale})
                else:
                    sd.update({f"lora_transformer_{_us(name)}.lora_down.weight": down,
                               f"lora_transformer_{_us(name)}.lora_up.weight": up[idx],
                               f"lora_transformer_{_us(name)}.alpha": torch.tensor(ALPHA)})
        elif fmt == "xlabs":  # attention only; a single block's qkv_lora holds no MLP rows
            import re
            m = re.match(r"(double|single)_blocks\.(\d+)\.(img_attn\.qkv|txt_attn\.qkv|"
                         r"img_attn\.proj|txt_attn\.proj|linear1|linear2)$", layer)
            if not m:
                held.discard(layer)
                continue
            name = {"img_attn.qkv": "qkv_lora1", "txt_attn.qkv": "qkv_lora2", "img_attn.proj":
                    "proj_lora1", "txt_attn.proj": "proj_lora2", "linear1": "qkv_lora",
                    "linear2": "proj_lora"}[m.group(3)]
            u = up * scale
            if name == "qkv_lora":
                u = u.clone()
                u[3 * width:] = 0  # the reference: what the file holds
                net[layer] = (down, u / scale)
                u = u[:3 * width]
            key = f"{m.group(1)}_blocks.{m.group(2)}.processor.{name}"
            sd.update({f"{key}.down.weight": down, f"{key}.up.weight": u})
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(path))
    return lora_deltas({n: net[n] for n in held})


FORMATS = ("kohya", "comfy", "diffusers", "onetrainer", "xlabs")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_every_format_on_both_trees_matches_merging_the_full_delta(fmt, layout, tmp_path):
    trees = flux_trees("flux", layout)
    bfl = trees["unet"] if layout == "bfl" else from_diffusers(trees["unet"])
    net = random_network(bfl)
    deltas = write_format(tmp_path / "net.safetensors", net, fmt)
    x = inputs()
    expected = run(merged_reference(bfl.eval(), {n: 0.8 * d for n, d in deltas.items()}), x)
    before, base = snapshot(trees), run(trees["unet"], x)
    engine = make_engine(trees, "flux", tmp_path)
    assert engine.activate(plan("<lora:net:0.8>", "flux", steps=2)) == []
    loaded = engine.entries[0].network if hasattr(engine.entries[0], "network") else None
    engine.set_step(0)
    got = run(trees["unet"], x)
    assert not torch.allclose(got, base, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    engine.deactivate()
    assert_pristine(trees, before)
    assert loaded is None or not loaded.unmatched
