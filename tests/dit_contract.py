"""What every transformer architecture's tests check (Z-Image, Qwen-Image, SD3): a network
defined on the canonical (original) layers, written in each published key format, must give
what merging its full ΔW by hand gives, on the diffusers tree (forward) and on the original
tree (weights). The reference never uses NetWeave's tables: each architecture's test names,
per diffusers layer, the original layer and which part of it the layer holds
(tinydits.native_tree's `to_native`)."""
import copy

import torch
from safetensors.torch import save_file
from torch import nn

RANK, ALPHA = 4, 2.0


def us(name):
    return name.replace(".", "_")


def canonical_layers(native):
    return {n: m for n, m in native.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def random_network(native, seed=5, skip=()):
    """{canonical layer: (down [r, in…], up [out, r…])}; ΔW = ALPHA / RANK · up · down."""
    g = torch.Generator().manual_seed(seed)
    net = {}
    for n, m in canonical_layers(native).items():
        if n in skip:
            continue
        w = m.weight
        kernel = tuple(w.shape[2:])
        down = torch.randn(RANK, w.shape[1], *kernel, generator=g) * 0.3
        up = torch.randn(w.shape[0], RANK, *((1,) * len(kernel)), generator=g) * 0.3
        net[n] = (down, up)
    return net


def lora_delta(down, up, scale=ALPHA / RANK):
    if down.dim() == 4:
        return scale * (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])
    return scale * up @ down


def parts_of(model, to_native):
    """{canonical layer: [(diffusers path, row indices of the canonical layer, in the diffusers
    layer's order)]} from the architecture's `to_native`."""
    found = {}
    for path, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        hit = to_native(path)
        name, i, n, swapped = hit if hit else (path, 0, 1, False)
        found.setdefault(name, [None] * n)[i] = (path, m.weight.shape[0], swapped)
    out = {}
    for name, parts in found.items():
        start, rows = 0, []
        for path, size, swapped in parts:
            idx = torch.arange(start, start + size)
            if swapped:
                idx = torch.cat([idx[size // 2:], idx[:size // 2]])
            rows.append((path, idx))
            start += size
        out[name] = rows
    return out


def write_format(path, net, fmt, parts, native_prefix="diffusion_model.", split_prefix="transformer."):
    """The network in one published key format; returns ΔW per canonical layer.
    kohya: original names underscored with alpha; comfy: original names under `native_prefix`
    (lora_A/B); diffusers: split names under `split_prefix` (a fused layer: one down, its up
    cut); aitoolkit: split names under `diffusion_model.`; onetrainer: `lora_transformer_` +
    split names underscored; musubi: `lora_unet_` + split names underscored."""
    sd, scale = {}, ALPHA / RANK
    for layer, (down, up) in net.items():
        if fmt == "kohya":
            sd.update({f"lora_unet_{us(layer)}.lora_down.weight": down,
                       f"lora_unet_{us(layer)}.lora_up.weight": up,
                       f"lora_unet_{us(layer)}.alpha": torch.tensor(ALPHA)})
        elif fmt == "comfy":
            sd.update({f"{native_prefix}{layer}.lora_A.weight": down,
                       f"{native_prefix}{layer}.lora_B.weight": up * scale})
        else:
            for name, idx in parts[layer]:
                if fmt in ("diffusers", "aitoolkit"):
                    prefix = split_prefix if fmt == "diffusers" else "diffusion_model."
                    sd.update({f"{prefix}{name}.lora_A.weight": down,
                               f"{prefix}{name}.lora_B.weight": up[idx] * scale})
                else:
                    head = {"onetrainer": "lora_transformer_", "musubi": "lora_unet_"}[fmt]
                    sd.update({f"{head}{us(name)}.lora_down.weight": down,
                               f"{head}{us(name)}.lora_up.weight": up[idx],
                               f"{head}{us(name)}.alpha": torch.tensor(ALPHA)})
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(path))
    return {n: lora_delta(d, u) for n, (d, u) in net.items()}


FORMATS = ("kohya", "comfy", "diffusers", "aitoolkit", "onetrainer", "musubi")


def merged_diffusers(model, deltas, parts):
    """A copy of the diffusers model with each canonical ΔW's rows added to its layers."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for layer, dw in deltas.items():
            for name, idx in parts[layer]:
                modules[name].weight += dw[idx]
    return ref


def assert_native_weights(native, before, deltas, atol=1e-4):
    """Every layer of the original tree holds its pristine weight plus its ΔW (or none)."""
    for name, m in canonical_layers(native).items():
        expected = before[name] + deltas[name] if name in deltas else before[name]
        assert torch.allclose(m.weight, expected, atol=atol), (name, (m.weight - expected).abs().max())


def weights(native):
    return {n: m.weight.detach().clone() for n, m in canonical_layers(native).items()}


def kron_and_hada(net, parts, path):
    """LoKr on every fused (multi-part) canonical layer under its original name, and LoHa on
    each split part under SimpleTuner's LyCORIS names; returns ΔW per canonical layer."""
    g = torch.Generator().manual_seed(9)
    sd, deltas = {}, {}
    for layer, (down, up) in net.items():
        if down.dim() != 2 or len(parts[layer]) < 2:
            continue
        rows, cols = up.shape[0], down.shape[1]
        a = 3 if rows % 3 == 0 else 1
        w1, w2 = torch.randn(a, 2, generator=g) * 0.3, torch.randn(rows // a, cols // 2, generator=g) * 0.3
        sd.update({f"lora_unet_{us(layer)}.lokr_w1": w1, f"lora_unet_{us(layer)}.lokr_w2": w2})
        deltas[layer] = torch.kron(w1, w2)
    hada = {}
    for layer, (down, up) in net.items():
        if down.dim() != 2 or len(parts[layer]) < 2:
            continue
        dw = torch.zeros(up.shape[0], down.shape[1])
        for name, idx in parts[layer]:
            w = [torch.randn(len(idx) if i % 2 == 0 else 2, 2 if i % 2 == 0 else down.shape[1],
                             generator=g) * 0.3 for i in range(4)]
            hada.update({f"lycoris_{us(name)}.hada_w1_a": w[0], f"lycoris_{us(name)}.hada_w1_b": w[1],
                         f"lycoris_{us(name)}.hada_w2_a": w[2], f"lycoris_{us(name)}.hada_w2_b": w[3]})
            dw[idx] = (w[0] @ w[1]) * (w[2] @ w[3])
        deltas.setdefault(layer + "#hada", dw)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "kron.safetensors"))
    save_file({k: v.contiguous() for k, v in hada.items()}, str(path / "hada.safetensors"))
    return ({k: v for k, v in deltas.items() if "#" not in k},
            {k[:-5]: v for k, v in deltas.items() if k.endswith("#hada")})


def image_token_reference(model, deltas, parts, tokens_of, cells):
    """The diffusers model with the network on the image tokens only, by hand: on every layer
    that sees image tokens (`tokens_of(canonical) in ("image", "joint")`), ΔW·x added to the
    rows of the image tokens (`cells(n)`: their slice among a layer's n rows)."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    for layer, dw in deltas.items():
        if tokens_of(layer) not in ("image", "joint"):
            continue
        for name, idx in parts[layer]:
            def hook(module, args, out, dw=dw[idx]):
                if out.dim() != 3:
                    return out
                extra = torch.zeros_like(out)
                rows = cells(out.shape[1])
                extra[:, rows] = args[0][:, rows] @ dw.T
                return out + extra
            modules[name].register_forward_hook(hook)
    return ref


# ---- the checks each architecture's tests run ---------------------------------------------
class Case:
    """One architecture under test: its tiny diffusers model (`factory()` makes it, the same
    weights each time), its original tree (`native(model)`), `to_native` (see parts_of), a
    batch of inputs and how to run the model on them."""

    def __init__(self, arch, factory, native, to_native, inputs, run):
        self.arch, self.factory, self.native, self.to_native = arch, factory, native, to_native
        self.inputs, self.run = inputs, run
        self.model = factory().eval()
        self.parts = parts_of(self.model, to_native)

    def engine(self, trees, tmp_path, **kw):
        from engine_helpers import make_engine
        return make_engine(trees, self.arch, tmp_path, **kw)

    def plan(self, tag):
        from engine_helpers import plan
        return plan(tag, self.arch, steps=2)


def check_format_on_diffusers(case, fmt, tmp_path):
    """The file applied on diffusers' tree draws what the hand-merged ΔW draws; restore exact."""
    from engine_helpers import assert_pristine, snapshot
    model = case.model
    deltas = write_format(tmp_path / "net.safetensors", random_network(case.native(model)), fmt,
                          case.parts)
    trees = {"unet": copy.deepcopy(model)}
    x = case.inputs()
    expected = case.run(merged_diffusers(model, {n: 0.8 * d for n, d in deltas.items()},
                                         case.parts), x)
    before = snapshot(trees)
    engine = case.engine(trees, tmp_path)
    assert engine.activate(case.plan("<lora:net:0.8>")) == []
    engine.set_step(0)
    got = case.run(trees["unet"], x)
    assert not torch.allclose(got, case.run(model, x), atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    engine.deactivate()
    assert_pristine(trees, before)


def check_format_on_native(case, fmt, tmp_path):
    """The file applied on the original tree adds exactly its ΔW to each layer; restore exact."""
    from engine_helpers import assert_pristine, snapshot
    native = case.native(case.model)
    deltas = write_format(tmp_path / "net.safetensors", random_network(native), fmt, case.parts)
    trees = {"unet": native}
    before, pristine = snapshot(trees), weights(native)
    engine = case.engine(trees, tmp_path)
    assert engine.activate(case.plan("<lora:net:0.5>")) == []
    engine.set_step(0)
    assert_native_weights(native, pristine, {n: 0.5 * d for n, d in deltas.items()})
    engine.deactivate()
    assert_pristine(trees, before)


def check_kron_and_hada(case, layout, tmp_path):
    """LoKr on fused layers and LoHa on their split parts, merged and beside the layer."""
    model, native = case.model, case.native(case.model)
    kron, hada = kron_and_hada(random_network(native), case.parts, tmp_path)
    for name, deltas in (("kron", kron), ("hada", hada)):
        host = copy.deepcopy(model if layout == "diffusers" else native)
        for strategy, tag in (("merge", f"<lyco:{name}:0.7>"), ("bypass", f"<lyco:{name}:0.7:neg=0.5>")):
            engine = case.engine({"unet": host}, tmp_path, strategy=strategy)
            assert engine.activate(case.plan(tag)) == []
            engine.set_step(0)
            scaled = {n: 0.7 * d for n, d in deltas.items()}
            if layout == "native" and strategy == "merge":
                assert_native_weights(host, weights(native), scaled)
            elif layout == "diffusers":
                x = case.inputs()
                expected = case.run(merged_diffusers(model, scaled, case.parts), x)
                assert torch.allclose(case.run(host, x), expected, atol=1e-4), (name, strategy)
            engine.deactivate()


def check_model_blend(case, host, tmp_path):
    """`<model:>` from a checkpoint in the other layout: an original single file on diffusers'
    tree, a diffusers folder on the original tree; every Linear (and patch conv) blends."""
    from netweave.network.keymap import KeyMap
    from netweave.network.loader import load_checkpoint
    model = case.model
    other = case.factory()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if host == "diffusers":
        path = tmp_path / "other.safetensors"
        save_file({f"model.diffusion_model.{k}": v.contiguous()
                   for k, v in case.native(other).state_dict().items()}, str(path))
    else:
        path = tmp_path / "other"
        (path / "transformer").mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in other.state_dict().items()},
                  str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
    trees = {"unet": copy.deepcopy(model) if host == "diffusers" else case.native(model)}
    assert load_checkpoint(str(path), KeyMap(trees), case.arch).arch == case.arch
    engine = case.engine(trees, tmp_path)
    engine.find = lambda kind, name: str(path)
    assert engine.activate(case.plan("<model:other:0.4>")) == []
    engine.set_step(0)
    mine, theirs = canonical_layers(case.native(model)), canonical_layers(case.native(other))
    if host == "native":
        assert_native_weights(trees["unet"], weights(case.native(model)),
                              {n: 0.4 * (theirs[n].weight - mine[n].weight) for n in mine})
    else:
        blended = copy.deepcopy(model)  # weight and bias of each layer; norms stay
        with torch.no_grad():
            for m, n in zip(blended.modules(), other.modules()):
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    for p, q in zip(m.parameters(), n.parameters()):
                        p.lerp_(q, 0.4)
        x = case.inputs()
        assert torch.allclose(case.run(trees["unet"], x), case.run(blended, x), atol=1e-4)
    engine.deactivate()


def check_formats_detected(case, formats, tmp_path):
    """Each format's file is detected as the architecture and every key reaches a layer."""
    from netweave.network.keymap import KeyMap
    from netweave.network.loader import load_network
    native = case.native(case.model)
    for fmt in formats:
        write_format(tmp_path / f"{fmt}.safetensors", random_network(native), fmt, case.parts)
        loaded = load_network(str(tmp_path / f"{fmt}.safetensors"), KeyMap({"unet": case.model}),
                              case.arch)
        assert loaded.arch == case.arch and not loaded.unmatched, (fmt, loaded.unmatched)


def check_inspect(tmp_path, shapes, arch, layers):
    """A file of real-size factors ({key: shape}, zeros) maps onto the real tree on the meta
    device: detected as `arch`, reaching `layers` host layers, every key used."""
    from netweave.network.inspect import inspect
    path = tmp_path / "real.safetensors"
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    report = inspect(str(path))
    assert report["error"] is None and report["architecture"] == arch, report
    assert report["layers"] == layers and not report["unmatched_keys"], report


def check_regions(case, tmp_path, latent, tokens_of, cells, halves, blend=True):
    """A region on the image tokens: all ones is the network on exactly the image tokens of
    every layer that sees them (`cells(n)`: their rows among n), all zeros no network at all;
    the left half moves the left of the output (`halves(out)`: its left and right parts)
    more; with a blended start the right is the model's own and the left the one-pass
    regional prediction."""
    model, parts = case.model, case.parts
    deltas = write_format(tmp_path / "net.safetensors", random_network(case.native(model)),
                          "diffusers", parts)
    x = case.inputs()
    base = case.run(model, x)
    expected = case.run(image_token_reference(model, {n: 0.9 * d for n, d in deltas.items()},
                                              parts, lambda n: tokens_of(n).value, cells), x)
    masks = {"none": torch.zeros(latent[0] * 8, latent[1] * 8).numpy()}
    outs = {}
    tags = ("region=full", "region=none", "region=left") + (("region=left:blend=1",) if blend else ())
    for tag in tags:
        trees = {"unet": copy.deepcopy(model)}
        engine = case.engine(trees, tmp_path, latent=latent, masks=masks)
        assert engine.activate(case.plan(f"<lora:net:0.9:{tag}>")) == []
        engine.set_step(0)
        outs[tag] = case.run(trees["unet"], x)
        engine.deactivate()
    full = outs["region=full"]
    assert torch.allclose(full, expected, atol=1e-4), (full - expected).abs().max()
    assert torch.allclose(outs["region=none"], base, atol=1e-6)
    left, right = halves((outs["region=left"] - base).abs())
    assert left.mean() > 3 * right.mean()
    if blend:
        blended, one_pass = outs["region=left:blend=1"], outs["region=left"]
        assert torch.allclose(halves(blended)[1], halves(base)[1], atol=1e-5)
        assert torch.allclose(halves(blended)[0], halves(one_pass)[0], atol=1e-5)
        assert not torch.allclose(blended, one_pass, atol=1e-3)
