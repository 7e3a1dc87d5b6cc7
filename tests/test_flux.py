"""The Flux family (Flux.1, Chroma): both trees a host may hold, every published LoRA key
format, fused and split layers both ways, blocks, `<model:>`, detection.

The reference for every format is a network defined on the original (BFL) layers, merged
into a copy of the BFL tree by hand; a file in each format is written from it, applied by the
engine on the diffusers tree and on the BFL tree (tests/flux_bfl.py), and both outputs must
match the reference.
"""
import copy
import re

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


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_scheduled_and_bypassed_pieces_match_the_merged_ones(layout, tmp_path):
    """The runtime branch (a schedule the cost model leaves beside the layer, or forced) on
    rows of a fused layer or parts placed in one gives what merging gives."""
    trees = flux_trees("flux", layout)
    bfl = trees["unet"] if layout == "bfl" else from_diffusers(trees["unet"])
    # the file in the other layout than the host: every layer is pieces
    fmt = "kohya" if layout == "diffusers" else "diffusers"
    deltas = write_format(tmp_path / "net.safetensors", random_network(bfl), fmt)
    x = inputs()
    expected = run(merged_reference(bfl.eval(), {n: 0.5 * d for n, d in deltas.items()}), x)
    engine = make_engine(trees, "flux", tmp_path, strategy="bypass")
    assert engine.activate(plan("<lora:net:0@0,0.5@1>", "flux", steps=2)) == []
    engine.set_step(1)
    assert torch.allclose(run(trees["unet"], x), expected, atol=1e-4)
    engine.deactivate()


def kron_network(bfl, seed=6):
    g = torch.Generator().manual_seed(seed)
    net = {}
    for n, m in canonical_layers(bfl).items():
        if n.endswith(("qkv", "linear1")):
            a = 4 if m.out_features % 4 == 0 else 1
            net[n] = (torch.randn(a, 2, generator=g) * 0.3,
                      torch.randn(m.out_features // a, m.in_features // 2, generator=g) * 0.3)
    return net


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_lokr_on_a_fused_layer_reaches_split_layers(layout, tmp_path):
    """LoKr's Kronecker product has no per-row factors: on a host that splits the fused layer
    ΔW is built whole and its rows handed out (algorithms/rows.py RowsOf)."""
    trees = flux_trees("flux", layout)
    bfl = trees["unet"] if layout == "bfl" else from_diffusers(trees["unet"])
    net = kron_network(bfl)
    save_file({f"lora_unet_{_us(n)}.{p}": t.contiguous() for n, (w1, w2) in net.items()
               for p, t in (("lokr_w1", w1), ("lokr_w2", w2))}, str(tmp_path / "kron.safetensors"))
    x = inputs()
    expected = run(merged_reference(bfl.eval(), {n: 0.7 * torch.kron(w1, w2)
                                                 for n, (w1, w2) in net.items()}), x)
    for strategy in ("merge", "bypass"):
        engine = make_engine(trees, "flux", tmp_path, strategy=strategy)
        assert engine.activate(plan("<lyco:kron:0.7:neg=0.5>" if strategy == "bypass"
                                    else "<lyco:kron:0.7>", "flux", steps=2)) == []
        engine.set_step(0)
        got = run(trees["unet"], x)
        engine.deactivate()
        assert torch.allclose(got, expected, atol=1e-4), (strategy, (got - expected).abs().max())


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_loha_on_split_layers_fills_a_fused_layer(layout, tmp_path):
    """SimpleTuner's LyCORIS names (diffusers layers): each split LoHa builds its rows."""
    trees = flux_trees("flux", layout)
    bfl = trees["unet"] if layout == "bfl" else from_diffusers(trees["unet"])
    g = torch.Generator().manual_seed(7)
    sd, deltas = {}, {}
    for layer, m in canonical_layers(bfl).items():
        if not layer.endswith(("qkv", "linear1")):
            continue
        dw = torch.zeros(m.out_features, m.in_features)
        for name, idx in diffusers_parts(layer, m.out_features, m.in_features):
            w = [torch.randn(len(idx) if i % 2 == 0 else 2, 2 if i % 2 == 0 else m.in_features,
                             generator=g) * 0.3 for i in range(4)]
            sd.update({f"lycoris_{_us(name)}.hada_w1_a": w[0], f"lycoris_{_us(name)}.hada_w1_b": w[1],
                       f"lycoris_{_us(name)}.hada_w2_a": w[2], f"lycoris_{_us(name)}.hada_w2_b": w[3]})
            dw[idx] = (w[0] @ w[1]) * (w[2] @ w[3])
        deltas[layer] = dw
    save_file(sd, str(tmp_path / "hada.safetensors"))
    x = inputs()
    expected = run(merged_reference(bfl.eval(), deltas), x)
    engine = make_engine(trees, "flux", tmp_path)
    assert engine.activate(plan("<lyco:hada:1>", "flux", steps=2)) == []
    engine.set_step(0)
    assert torch.allclose(run(trees["unet"], x), expected, atol=1e-4)
    engine.deactivate()


def test_dora_on_a_fused_layer_is_refused_on_a_split_host_and_applies_on_a_fused_one(tmp_path):
    """DoRA normalises the whole weight it was trained on: the rows of a split host layer are
    not that weight, so the file is refused, naming the layer; the BFL host takes it."""
    bfl_trees = flux_trees("flux", "bfl")
    layer = "double_blocks.0.img_attn.qkv"
    m = canonical_layers(bfl_trees["unet"])[layer]
    sd = {f"lora_unet_{_us(layer)}.lora_down.weight": torch.randn(RANK, m.in_features),
          f"lora_unet_{_us(layer)}.lora_up.weight": torch.randn(m.out_features, RANK),
          f"lora_unet_{_us(layer)}.dora_scale": torch.rand(m.out_features, 1) + 0.5}
    save_file(sd, str(tmp_path / "dora.safetensors"))
    with pytest.raises(NetworkFileError, match="dora builds its change from the whole fused weight"):
        load_network(str(tmp_path / "dora.safetensors"), KeyMap(flux_trees("flux")), "flux")
    loaded = load_network(str(tmp_path / "dora.safetensors"), KeyMap(bfl_trees), "flux")
    assert [t.name for t in loaded.layers] == [layer] and loaded.algorithms == {"dora": 1}


TEXT_KEYS = {  # (component, a layer) in each published spelling
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("te1", "encoder.layers.0.self_attn.q_proj"),
    "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc1": ("te1", "encoder.layers.1.mlp.fc1"),
    "lora_te3_encoder_block_0_layer_0_SelfAttention_q": ("te2", "encoder.block.0.layer.0.SelfAttention.q"),
    "lora_te2_encoder_block_1_layer_1_DenseReluDense_wi_0": ("te2", "encoder.block.1.layer.1.DenseReluDense.wi_0"),
    "text_encoders.t5xxl.transformer.encoder.block.1.layer.0.SelfAttention.o": ("te2", "encoder.block.1.layer.0.SelfAttention.o"),
}


def test_text_encoder_keys_reach_clip_l_and_t5_in_their_blocks():
    km = KeyMap(flux_trees("flux"))
    for key, (component, name) in TEXT_KEYS.items():
        (piece,) = km.pieces(key)
        assert (piece.target.component, piece.target.name) == (component, name), key
        assert piece.whole and piece.target.block == ("CLIP" if component == "te1" else "T5")
    chroma = KeyMap(flux_trees("chroma"))
    assert chroma.pieces("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") == []
    assert chroma.pieces("lora_te3_encoder_block_0_layer_0_SelfAttention_q")[0].target.block == "T5"


def test_blocks_of_every_layer_on_both_trees():
    for layout in ("diffusers", "bfl"):
        km = KeyMap(flux_trees("flux", layout))
        blocks = {t.name: t.block for t in km.targets if t.component == "unet"}
        d = "transformer_blocks.1.attn.to_q" if layout == "diffusers" else "double_blocks.1.img_attn.qkv"
        s = "single_transformer_blocks.0.proj_mlp" if layout == "diffusers" else "single_blocks.0.linear1"
        first = "x_embedder" if layout == "diffusers" else "img_in"
        last = "norm_out.linear" if layout == "diffusers" else "final_layer.adaLN_modulation.1"
        assert (blocks[d], blocks[s], blocks[first], blocks[last]) == ("D01", "S00", "IN", "OUT")
        assert None not in blocks.values()


def test_double_and_single_groups_and_lbw_vectors_act_on_their_blocks(tmp_path):
    trees = flux_trees("flux")
    bfl = from_diffusers(trees["unet"])
    net = random_network(bfl)
    deltas = write_format(tmp_path / "net.safetensors", net, "kohya")
    x = inputs()
    only_single = {n: d for n, d in deltas.items() if n.startswith("single_blocks")}
    lbw = ",".join(["0"] * 3 + ["0"] * 19 + ["1"] * 38 + ["0"])  # LBW's 61: singles only
    for tag in ("<lora:net:1:double=0:in=0:out=0>", f"<lora:net:1:lbw={lbw}>"):
        expected = run(merged_reference(bfl.eval(), only_single), x)
        engine = make_engine(trees, "flux", tmp_path)
        assert engine.activate(plan(tag, "flux", steps=2)) == []
        engine.set_step(0)
        assert torch.allclose(run(trees["unet"], x), expected, atol=1e-4), tag
        engine.deactivate()


@pytest.mark.parametrize("host", ["diffusers", "bfl"])
def test_model_blend_from_a_checkpoint_in_the_other_layout(host, tmp_path):
    """`<model:>` with another Flux: a BFL single file on the diffusers tree and a diffusers
    transformer/ folder on the BFL tree give the same blended weights."""
    trees = flux_trees("flux", host)
    other = flux_transformer()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if host == "diffusers":
        path = tmp_path / "other.safetensors"
        sd = {f"model.diffusion_model.{k}": v for k, v in bfl_state_dict(
            other.state_dict(), 2, 2).items()}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "other"
        (path / "transformer").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in other.state_dict().items()},
                  str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
    base = trees["unet"] if host == "bfl" else from_diffusers(trees["unet"])
    target = from_diffusers(other)
    x = inputs()
    blended = copy.deepcopy(base)
    with torch.no_grad():
        for p, q in zip(blended.parameters(), target.parameters()):
            p.lerp_(q, 0.4)
    loaded = load_checkpoint(str(path), KeyMap(trees), "flux")
    # every Linear layer blends, and so do the attention's RMSNorm scales (4 per double block, 2
    # per single block)
    assert not loaded.unmatched and loaded.arch == "flux"
    assert sum(t.weight.dim() == 1 for t in loaded.layers) == 2 * 4 + 2 * 2
    expected, plain = run(blended.eval(), x), run(trees["unet"], x)
    engine = make_engine(trees, "flux", tmp_path)
    engine.find = lambda kind, name: str(path)
    assert engine.activate(plan("<model:other:0.4>", "flux", steps=2)) == []
    engine.set_step(0)
    assert torch.allclose(run(trees["unet"], x), expected, atol=1e-4)
    engine.deactivate()
    # the first prompt's own: beside every layer, on its row only (RMSNorms: norm.py)
    assert engine.activate([plan("<model:other:0.4>", "flux", steps=2), plan("", "flux", steps=2)]) == []
    assert engine.pristine_bytes == 0  # nothing merged
    engine.set_rows([0, 1], [False, False])
    engine.set_step(0)
    out = run(trees["unet"], x)
    engine.deactivate()
    assert torch.allclose(out[0], expected[0], atol=1e-4) and torch.allclose(out[1], plain[1], atol=1e-5)


def test_detection_tells_flux_from_chroma_and_from_sd(tmp_path):
    shape = lambda k: (4, 16)  # noqa: E731
    assert detect_architecture(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                                "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"], shape)[0] == "flux"
    assert detect_architecture(["transformer.single_transformer_blocks.3.proj_mlp.lora_A.weight"],
                               shape)[0] == "flux"
    chroma, reasons = detect_architecture(
        ["diffusion_model.double_blocks.0.img_attn.qkv.weight",
         "diffusion_model.distilled_guidance_layer.in_proj.weight"], shape)
    assert chroma == "chroma" and any("distilled guidance" in r for r in reasons)
    # kohya's T5 is SD3's third encoder too: undecided, refused by neither
    # (tests/test_dit_text_encoders.py)
    assert detect_architecture(["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"],
                               shape)[0] is None
    # SDXL's deep transformer blocks are not Flux's
    assert detect_architecture(["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight"],
                               shape)[0] == "sdxl"


def test_a_flux_lora_loads_on_chroma_and_an_sd_lora_is_refused(tmp_path):
    trees = flux_trees("chroma")
    bfl = from_diffusers(flux_transformer())
    write_format(tmp_path / "net.safetensors", random_network(bfl), "kohya")
    loaded = load_network(str(tmp_path / "net.safetensors"), KeyMap(trees), "chroma")
    assert loaded.arch == "flux" and loaded.layers
    # Chroma prunes Flux's modulation and embedder layers: those keys are reported
    assert any("img_mod" in k for k in loaded.unmatched)
    assert not any("img_attn_qkv" in k for k in loaded.unmatched)
    sd = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1),
          "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1)}
    save_file(sd, str(tmp_path / "sd.safetensors"))
    with pytest.raises(NetworkFileError, match="for SD1"):
        load_network(str(tmp_path / "sd.safetensors"), KeyMap(trees), "chroma")


# ---- regions on joint attention ------------------------------------------------------------
def image_token_reference(bfl, deltas, txt):
    """The network on the image tokens only, computed without the engine: merged into the
    layers that see image tokens alone, added by hand to the image rows of the single blocks'
    layers (text first, then image), nothing on the text stream and the per-image vectors."""
    from netweave.network.flux_keys import Tokens, tokens_of
    ref = copy.deepcopy(bfl)
    layers = canonical_layers(ref)
    for name, dw in deltas.items():
        kind = tokens_of(name)
        if kind is Tokens.IMAGE:
            with torch.no_grad():
                layers[name].weight += dw
        elif kind is Tokens.JOINT:
            def hook(module, args, out, dw=dw):
                extra = torch.zeros_like(out)
                extra[:, txt:] = args[0][:, txt:] @ dw.T
                return out + extra
            layers[name].register_forward_hook(hook)
    return ref


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_a_region_acts_on_the_image_tokens_inside_it_exactly(layout, tmp_path):
    """All ones: the network on every image token, text untouched (the reference above); all
    zeros: no network at all; a half: something between, and text-stream layers unchanged."""
    trees = flux_trees("flux", layout)
    bfl = trees["unet"] if layout == "bfl" else from_diffusers(trees["unet"])
    deltas = write_format(tmp_path / "net.safetensors", random_network(bfl), "kohya")
    x = inputs()
    base = run(trees["unet"], x)
    expected = run(image_token_reference(bfl.eval(), {n: 0.9 * d for n, d in deltas.items()}, TXT), x)
    masks = {"none": torch.zeros(2 * H * 8, 2 * W * 8).numpy()}
    outs = {}
    for region in ("full", "none", "left"):
        engine = make_engine(trees, "flux", tmp_path, latent=(2 * H, 2 * W), masks=masks)
        p = plan(f"<lora:net:0.9:region={region}>", "flux", steps=2)
        assert engine.activate(p) == []
        assert any("regional on Flux, it acts on the image tokens" in w and "embedding and modulation" in w
                   for w in engine.warnings), engine.warnings
        engine.set_step(0)
        outs[region] = run(trees["unet"], x)
        engine.deactivate()
    assert torch.allclose(outs["full"], expected, atol=1e-4), (outs["full"] - expected).abs().max()
    assert torch.allclose(outs["none"], base, atol=1e-6)
    left = outs["left"]
    assert not torch.allclose(left, base, atol=1e-3) and not torch.allclose(left, expected, atol=1e-3)
    # the left half's tokens moved more than the right half's (attention mixes them a little)
    grid = (left - base).abs().mean(-1).view(-1, H, W)
    assert grid[:, :, :W // 2].mean() > 3 * grid[:, :, W // 2:].mean()


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_a_blended_start_on_flux_keeps_the_image_outside_the_region(layout, tmp_path):
    """blend=1: one doubled forward, the prediction of the tokens outside the region is the
    model's own and inside it the one-pass regional one (network/blend.py on packed tokens)."""
    trees = flux_trees("flux", layout)
    bfl = trees["unet"] if layout == "bfl" else from_diffusers(trees["unet"])
    write_format(tmp_path / "net.safetensors", random_network(bfl), "kohya")
    x = inputs()
    base = run(trees["unet"], x)
    outs = {}
    for blend in (0, 1):
        engine = make_engine(trees, "flux", tmp_path, latent=(2 * H, 2 * W))
        assert engine.activate(plan(f"<lora:net:0.9:region=left:blend={blend}>", "flux", steps=2)) == []
        engine.set_step(0)
        outs[blend] = run(trees["unet"], x)
        engine.deactivate()
    left = torch.zeros(H, W, dtype=torch.bool)
    left[:, :W // 2] = True
    left = left.reshape(-1)
    assert torch.allclose(outs[1][:, ~left], base[:, ~left], atol=1e-5)
    assert torch.allclose(outs[1][:, left], outs[0][:, left], atol=1e-5)
    assert not torch.allclose(outs[1], outs[0], atol=1e-3)


def test_inspect_maps_a_real_size_flux_file_onto_the_real_trees(tmp_path):
    from netweave.network.inspect import inspect
    path = tmp_path / "real.safetensors"
    save_file({"lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight": torch.zeros(1, 3072),
               "lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight": torch.zeros(9216, 1),
               "lora_unet_single_blocks_37_linear1.lora_down.weight": torch.zeros(1, 3072),
               "lora_unet_single_blocks_37_linear1.lora_up.weight": torch.zeros(21504, 1),
               "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(1, 4096),
               "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": torch.zeros(4096, 1)},
              str(path), metadata={"ss_base_model_version": "flux1"})
    report = inspect(str(path))
    # qkv reaches to_q, to_k, to_v; linear1 those three and proj_mlp; one T5 layer
    assert report["error"] is None and report["architecture"] == "flux"
    assert report["layers"] == 3 + 4 + 1 and not report["unmatched_keys"]


def test_a_blended_start_never_doubles_position_ids_whose_length_is_the_batch(tmp_path):
    """diffusers passes img_ids/txt_ids as (tokens, 3): with as many text tokens as rows in
    the batch they look batch-sized, and doubling them would break the call."""
    trees = flux_trees("flux")
    bfl = from_diffusers(trees["unet"])
    write_format(tmp_path / "net.safetensors", random_network(bfl), "kohya")
    x = inputs(batch=TXT)  # as many rows as text tokens
    engine = make_engine(trees, "flux", tmp_path, latent=(2 * H, 2 * W), batch=TXT)
    assert engine.activate(plan("<lora:net:1:region=left:blend=1>", "flux", steps=2)) == []
    engine.set_step(0)
    assert run(trees["unet"], x).shape == (TXT, H * W, 64)
    engine.deactivate()
