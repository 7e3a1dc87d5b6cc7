"""Engine II invariants: regions, `rest`, per-row scales and `neg`, regional text encoders, in
one forward, on tiny LDM and diffusers UNets and CLIP encoders (docs/design.md §3 "Regions", §4)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from netweave.network.regions import RegionMaps, grid_for, uses_rest
from netweave.devtools.synthetic import write_network
from netweave.parser import parse_region
from tinymodels import TREES, ldm_trees

from engine_helpers import assert_pristine, make_engine, plan, snapshot

LATENT = (8, 8)


def no_time_mlp(t):  # the global time-embedding MLP has no image grid (see bypass.py)
    return "time_embedding" not in t.name


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("regional")
    trees = ldm_trees("sd1")
    for fmt, seed in (("lora", 1), ("loha", 2), ("full", 3), ("lokr", 4)):
        write_network(root / f"{fmt}.safetensors", trees, fmt, "kohya", "sd1", seed=seed,
                      select=no_time_mlp)
    write_network(root / "te.safetensors", trees, "lora", "kohya", "sd1", seed=6,
                  components=("te1",), scale=0.3)
    other = lively(ldm_trees("sd1"), seed=9)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in
               other["unet"].state_dict().items() if not k.startswith("time_embed")},
              str(root / "other.safetensors"))
    return root


def lively(trees, seed=0):
    """LDM zero-initialises its output layers; give every zero weight values, so that a change
    anywhere reaches the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trees["unet"].parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return trees


def build(layout="diffusers"):
    trees = TREES[layout]("sd1")
    return lively(trees) if layout == "ldm" else trees


def run_unet(trees, ctx=None, x=None, rows=2):
    torch.manual_seed(0)
    x = torch.randn(rows, 4, *LATENT) if x is None else x
    ctx = torch.randn(rows, 5, 32) if ctx is None else ctx
    t = torch.full((x.shape[0],), 10)
    unet = trees["unet"]
    with torch.no_grad():
        if hasattr(unet, "input_blocks"):
            return unet(x, t, context=ctx)
        return unet(x, t, encoder_hidden_states=ctx).sample


def generate(trees, engine, prompt, masks=None, steps=1, on_active=lambda: None):
    """A tiny host: activate, per step encode (one conditioning per segment and per regional
    text-encoder network) and run the UNet; returns the last output."""
    errors = engine.activate(plan(prompt, steps=steps), masks=masks) if prompt else []
    on_active()
    ids = torch.tensor([[0, 5, 17, 33, 2], [0, 9, 12, 2, 1]])
    te = getattr(trees["te1"], "transformer", trees["te1"])  # LDM keeps CLIP in a wrapper
    for k in range(steps):
        seg = engine.segment_at(k) if prompt else None
        if seg is not None:
            engine.apply_te(seg)
        with torch.no_grad():
            base = te(ids).last_hidden_state
            variants = {}
            for j in (seg.variants if seg else ()):
                engine.apply_te(seg, variant=j)
                variants[j] = te(ids).last_hidden_state
        if variants:
            engine.set_text_variants(base, variants)
        engine.set_step(k)
        out = run_unet(trees, base)
    return out, errors


def outputs(prompt, layout="diffusers", masks=None, **kw):
    trees = build(layout)
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT, **kw)
    out, errors = generate(trees, engine, prompt, masks)
    engine.deactivate()
    assert_pristine(trees, before)
    return out, errors, engine


NETS = []


@pytest.fixture(autouse=True)
def _nets(nets):
    NETS[:] = [nets]


# ---- 1. all-ones equals global, all-zeros equals none ------------------------------------
@pytest.mark.parametrize("layout", sorted(TREES))
@pytest.mark.parametrize("net", ["lora:lora", "lora:te"] + [  # the other algorithms: sampled
    pytest.param(n, marks=pytest.mark.slow) for n in ("lora:loha", "lora:full", "lora:lokr",
                                                      "model:other")])
def test_all_ones_region_is_the_global_network_all_zeros_is_none(layout, net):
    ones = np.ones((20, 30), np.float32)
    none, _, _ = outputs("", layout)
    merged, errors, _ = outputs(f"<{net}:0.8>", layout)
    assert not errors and not torch.equal(merged, none)
    for region in ("full", "allones", "left+right"):
        out, errors, engine = outputs(f"<{net}:0.8:region={region}>", layout, {"allones": ones})
        assert not errors and not engine.errors, engine.errors
        torch.testing.assert_close(out, merged, rtol=1e-4, atol=1e-4)
    for region in ("!full", "allzeros", "left&right"):
        out, errors, engine = outputs(f"<{net}:0.8:region={region}>", layout, {"allzeros": ones * 0})
        assert torch.equal(out, none), region


# ---- 2. a half-image mask: outside exactly unpatched, inside the merged network ------------
def record(modules, runtime):
    """Each module's call as the host made it (before the engine's pre-hooks, which may run
    a cross-attention's main call on fewer tokens) and its output after the engine's hooks."""
    seen, calls = {}, {}
    hooks = []
    for name, m in modules.items():
        def before(mod, args, kwargs, name=name):
            if runtime.variant is None:  # not a cross-attention's re-run of its region
                calls[name] = (args, kwargs)

        def hook(mod, args, kwargs, out, name=name):
            if runtime.variant is None:
                seen[name] = (*calls[name], out.detach().clone())
        hooks += [m.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
                  m.register_forward_hook(hook, with_kwargs=True)]
    return seen, hooks


@pytest.mark.parametrize("layout", sorted(TREES))
@pytest.mark.parametrize("net", ["lora:lora", "lora:loha", "model:other"])
def test_half_mask_outside_is_unpatched_inside_is_merged(layout, net):
    trees = build(layout)
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    engine.activate(plan(f"<{net}:0.9:region=left>"))
    layers = {s.target.path: s for s in engine._slots.values()
              if s.target.component == "unet" and s.contributions[0].route == "layer"
              and isinstance(s.target.module, (torch.nn.Linear, torch.nn.Conv2d))}
    attn2 = {u.path: u for u in engine._units.values()}
    assert len(layers) > 30 and len(attn2) >= 5
    unet = trees["unet"]
    seen, hooks = record({p: unet.get_submodule(p) for p in [*layers, *attn2]}, engine.runtime)
    run_unet(trees)
    for h in hooks:
        h.remove()
    engine.deactivate()
    assert_pristine(trees, before)
    maps = engine.runtime.maps
    checked = 0
    for path, (args, kwargs, out) in seen.items():
        module = unet.get_submodule(path)
        with torch.no_grad():
            pristine = module(*args, **kwargs)
            if path in layers:
                slot = layers[path]
                c = slot.contributions[0]
                w0 = module.weight.detach().float()
                w = w0 + c.adapter.delta(w0, 0.9)
                b = module.bias.detach().float() if module.bias is not None else None
                if b is not None and c.adapter.bias_delta(b, 0.9) is not None:
                    b = b + c.adapter.bias_delta(b, 0.9)
                x = args[0].float()
                merged = module._conv_forward(x, w, b) if isinstance(module, torch.nn.Conv2d) \
                    else F.linear(x, w, b)
            else:
                engine.activate(plan(f"<{net}:0.9>"))  # the whole attention, merged
                merged = module(*args, **kwargs)
                engine.deactivate()
        if out.dim() == 4:
            shape = out.shape[-2:]
            inside = maps.on_grid(0, shape, "cpu").values.view(shape) > 0
            pick = (lambda t, m: t.permute(0, 2, 3, 1)[:, m])
        else:
            shape = grid_for(out.shape[1], LATENT)
            assert shape is not None, (path, out.shape)
            inside = maps.on_grid(0, shape, "cpu").values > 0
            pick = (lambda t, m: t[:, m])
        assert inside.any() and (~inside).any()
        if path in layers:
            assert torch.equal(pick(out, ~inside), pick(pristine, ~inside)), path
        else:  # the attention's main call ran on the tokens outside only: the same arithmetic
            # per token, its matrix products shaped for fewer tokens (rounding may differ)
            torch.testing.assert_close(pick(out, ~inside), pick(pristine, ~inside),
                                       rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pick(out, inside), pick(merged, inside), rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == len(layers) + len(attn2)


@pytest.mark.parametrize("layout", sorted(TREES))
@pytest.mark.parametrize("soft", [False, True])
def test_a_cross_attention_runs_each_token_once_where_regions_replace_it_whole(layout, soft):
    """The main call leaves out the tokens inside a region at weight 1 (its re-run computes
    them): with two regions covering the image each token is attended once (the main call
    keeps one); a soft edge and the tokens outside every region run in the main call too."""
    trees = build(layout)
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    mask = np.zeros((20, 30), np.float32)
    mask[:, :12], mask[:, 12:18] = 1, 0.5
    prompt = "<lora:lora:0.9:region=%s> <lora:loha:0.7:region=right>" % \
        ("soft" if soft else "left")
    engine.activate(plan(prompt), masks={"soft": mask})
    units = list(engine._units.values())
    assert units and all(len(u.networks) == 2 for u in units)
    host, ran = [], []
    hooks = [h for u in units for h in (
        u.module.register_forward_pre_hook(  # before the engine's: the host's call
            lambda m, a, kw: host.append(a[0].shape[1]) if engine.runtime.variant is None
            else None, with_kwargs=True, prepend=True),
        u.module.register_forward_pre_hook(  # after it: the tokens the attention runs on
            lambda m, a, kw: ran.append((engine.runtime.variant, a[0].shape[1])),
            with_kwargs=True))]
    run_unet(trees)
    for h in hooks:
        h.remove()
    maps = engine.runtime.maps
    assert len(host) == len(units) and len(ran) == 3 * len(units)
    for unit, n in zip(units, host):
        (main, kept), *reruns = [ran.pop(0) for _ in range(3)]
        assert main is None and [j for j, _ in reruns] == sorted(unit.networks)
        values = torch.stack([maps.on_grid(engine.entries[j].region, grid_for(n, LATENT),
                                           "cpu").values for j in sorted(unit.networks)])
        assert [k for _, k in reruns] == [int((v > 0).sum()) for v in values]
        whole = int(((values == 1).any(0) & (values.sum(0) == 1)).sum())
        assert kept == (1 if whole == n else n - whole)
        assert kept < n if n > 4 else kept <= n  # a 2×2 grid may have no cell at 1
        assert (kept == 1) != soft
    engine.deactivate()


@pytest.mark.parametrize("layout", sorted(TREES))
def test_time_embedding_route_masks_the_feature_map(layout):
    trees = build(layout)
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    unet = trees["unet"]
    norms = [m for n, m in unet.named_modules() if n.endswith(("out_layers.0", "norm2"))
             and isinstance(m, torch.nn.GroupNorm)]
    seen = {}
    first = [n.register_forward_pre_hook(lambda m, a: seen.setdefault((id(m), 0), a[0].clone()))
             for n in norms]  # before the engine's pre-hooks: the feature map without the delta
    engine.activate(plan("<lora:lora:1:region=top>"))
    emb = [s for s in engine._slots.values() if s.contributions[0].route == "emb"]
    assert len(emb) == len(norms) == 17  # every resblock's embedding projection
    assert {id(s.emb_norm) for s in emb} == {id(n) for n in norms}
    last = [n.register_forward_pre_hook(lambda m, a: seen.setdefault((id(m), 1), a[0].clone()))
            for n in norms]
    run_unet(trees)
    for h in first + last:
        h.remove()
    engine.deactivate()
    for n in norms:
        d = seen[id(n), 1] - seen[id(n), 0]
        rows = d.shape[-2]
        assert d[..., : rows // 2, :].abs().amin() > 0  # the top half: every position moved
        assert not d[..., (rows + 1) // 2:, :].any()  # the bottom half: untouched


# ---- 3. rest ----------------------------------------------------------------------------
@pytest.mark.parametrize("latent", [(8, 8), (7, 12), (13, 5)])
def test_rest_and_the_other_regions_cover_every_token_once(latent):
    rng = np.random.default_rng(0)
    blob = (rng.random((8 * latent[0], 8 * latent[1])) > 0.6).astype(np.float32)  # image-sized
    masks = {"blob": blob}
    regions = [parse_region(r)[0] for r in ("left&top", "blob&!left", "rest")]
    maps = RegionMaps(latent)
    from netweave.network.regions import rest_of
    rest = rest_of(regions, maps.size, masks)
    for i, r in enumerate(regions):
        maps.add(i, r, masks, rest if uses_rest(r) else None)
    canvas = [maps.canvas(i) for i in range(3)]
    assert set(np.unique(canvas[2])) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.maximum(canvas[0], canvas[1]) + canvas[2], 1.0)
    np.testing.assert_array_equal(np.minimum(np.maximum(canvas[0], canvas[1]), canvas[2]), 0.0)
    h, w = latent
    for shape in [(h, w), ((h + 1) // 2, (w + 1) // 2), ((h + 3) // 4, (w + 3) // 4)]:
        on = [maps.on_grid(i, shape, "cpu").values for i in range(3)]
        # area resampling is linear: the soft cells on a coarse grid still add up to one
        torch.testing.assert_close(on[0] + on[1] + on[2], torch.ones(shape[0] * shape[1]))


def test_rest_through_the_engine_is_the_complement():
    a, _, _ = outputs("<lora:lora:1:region=left> <lora:loha:1:region=rest>")
    b, _, _ = outputs("<lora:lora:1:region=left> <lora:loha:1:region=right>")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_odd_and_non_square_grids():
    maps = RegionMaps((5, 7))
    maps.add("l", parse_region("left")[0], {})
    g = maps.on_grid("l", (5, 7), "cpu").values.view(5, 7)
    assert torch.equal(g[:, :3], torch.ones(5, 3)) and torch.equal(g[:, 4:], torch.zeros(5, 3))
    torch.testing.assert_close(g[:, 3], torch.full((5,), 0.5))
    assert grid_for(35, (5, 7)) == (5, 7) and grid_for(12, (5, 7)) == (3, 4)
    assert grid_for(77, (5, 7)) is None  # the text's 77 tokens are no grid of this image
    assert grid_for(35 * 49, (35, 49)) == (35, 49)
    trees = build("diffusers")
    engine = make_engine(trees, "sd1", NETS[0], latent=(5, 7))
    engine.activate(plan("<lora:lora:1:region=left*0.5>"))
    torch.manual_seed(0)
    out = run_unet(trees, x=torch.randn(2, 4, 5, 7))
    assert torch.isfinite(out).all() and out.shape == (2, 4, 5, 7)
    engine.deactivate()


def test_missing_mask_skips_only_its_network():
    out, errors, engine = outputs("<lora:lora:1:region=nosuchmask> <lora:loha:1>")
    assert len(errors) == 1 and "no mask named 'nosuchmask'" in errors[0]
    ref, _, _ = outputs("<lora:loha:1>")
    assert torch.equal(out, ref)


# ---- 4. per-row: a batch of two prompts equals each alone; neg ---------------------------
@pytest.mark.parametrize("layout", sorted(TREES))
def test_a_batch_of_two_prompts_equals_each_alone(layout):
    prompts = ["<lora:full:0.5> <lora:lora:1:region=left>", "<lora:full:0.5> <lora:loha:0.7>"]
    torch.manual_seed(3)
    x, ctx = torch.randn(2, 4, *LATENT), torch.randn(2, 5, 32)
    alone = []
    for i, p in enumerate(prompts):
        trees = build(layout)
        engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
        engine.activate(plan(p))
        alone.append(run_unet(trees, ctx[i:i + 1], x[i:i + 1]))
        engine.deactivate()
    trees = build(layout)
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    assert engine.activate([plan(p) for p in prompts]) == []
    assert [e.owner for e in engine.entries] == [None, 0, 1]  # the shared tag merges
    engine.set_rows([0, 1], [False, False])
    both = run_unet(trees, ctx, x)
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-4, atol=1e-5)
    engine.deactivate()
    assert_pristine(trees, before)


def test_neg_scales_only_the_unconditional_rows():
    torch.manual_seed(4)
    x, ctx = torch.randn(1, 4, *LATENT).repeat(2, 1, 1, 1), torch.randn(1, 5, 32).repeat(2, 1, 1)
    trees = build()
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    engine.activate(plan("<lora:lora:1:neg=0>"))
    engine.set_rows([0, 0], [False, True])
    out = run_unet(trees, ctx, x)
    engine.deactivate()
    none = run_unet(trees, ctx, x)
    engine.activate(plan("<lora:lora:1>"))
    full = run_unet(trees, ctx, x)
    engine.deactivate()
    torch.testing.assert_close(out[0], full[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(out[1], none[1])


def test_rows_that_do_not_match_the_batch_are_refused():
    trees = build()
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    engine.activate(plan("<lora:lora:1:neg=0.5>"))
    engine.set_rows([0, 0, 0], [False, False, True])
    with pytest.raises(ValueError, match="got 2 rows"):
        run_unet(trees)
    engine.deactivate()


# ---- regional text encoders ---------------------------------------------------------------
def test_regional_text_encoder_network_acts_inside_its_region_only():
    trees = build()
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    unet = trees["unet"]
    attn2 = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
    seen, hooks = {}, []

    def on_active():  # recorders after the engine's hooks: they see what the UNet gets
        found, hooks[:] = record(attn2, engine.runtime)
        seen.update(found=found)
    texts = {}
    original = engine.set_text_variants
    engine.set_text_variants = lambda base, v: (texts.update(base=base, **{"v": v[0]}),
                                                original(base, v))
    out, errors = generate(trees, engine, "<lora:te:1:region=left>", on_active=on_active)
    seen = seen["found"]
    assert not errors and not engine.errors
    assert sorted(engine._units) == sorted(attn2)  # every cross-attention
    assert engine.segment_at(0).variants == (0,)
    maps = engine.runtime.maps
    engine.deactivate()
    for h in hooks:
        h.remove()
    assert not torch.equal(texts["base"], texts["v"])
    for path, (args, kwargs, got) in seen.items():
        inside = maps.on_grid(0, grid_for(got.shape[1], LATENT), "cpu").values > 0
        with torch.no_grad():
            plain = attn2[path](args[0], encoder_hidden_states=texts["base"])
            variant = attn2[path](args[0], encoder_hidden_states=texts["v"])
        assert torch.equal(got[:, ~inside], plain[:, ~inside]), path
        torch.testing.assert_close(got[:, inside], variant[:, inside], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got[:, inside], plain[:, inside])


# ---- strategy: a global network stays merged beside a regional one on the same layer -------
def test_global_merges_while_regional_bypasses_on_the_same_layer():
    trees = build()
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    engine.activate(plan("<lora:lora:0.6> <lora:loha:1:region=left>"))
    both = [s for s in engine._slots.values() if s.target.component == "unet"
            and len(s.contributions) == 2]
    assert both and all(not s.contributions[0].bypass and s.contributions[1].bypass for s in both)
    assert all(len(s.applied) == 1 for s in both)
    engine.deactivate()


def test_everything_restores_after_a_failure_mid_forward():
    trees = build()
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    engine.activate(plan("<lora:lora:0.6> <lora:te:1:region=top> <lora:loha:1:region=left>"))
    (slot,) = [s for s in engine._slots.values() if s.target.path.endswith("up_blocks.1.attentions.0.proj_out")]
    boom = slot.target.module.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_unet(trees)
    boom.remove()
    engine.deactivate()
    assert_pristine(trees, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in trees["unet"].modules())


def test_text_encoders_per_prompt_and_negative():
    trees = build()
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    engine.activate([plan("<lora:te:1:neg=0>", steps=4), plan("<lora:te:0.5@0,1@0.5>", steps=4)])
    (q,) = engine.keymap.lookup("lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    seg0 = engine.te_segments(prompt=0)
    seg1 = engine.te_segments(prompt=1)
    assert [(s.start, s.stop) for s in seg0] == [(0, 4)]
    assert [(s.start, s.stop) for s in seg1] == [(0, 2), (2, 4)]
    w0 = before["te1", q.path + ".weight"]
    delta = engine._slots[q].contributions[0].adapter.delta(w0.float(), 1.0)
    engine.apply_te(seg0[0])
    torch.testing.assert_close(q.weight.detach(), w0 + delta, rtol=1e-5, atol=1e-6)
    engine.apply_te(seg0[0], uncond=True)  # neg=0: the negative prompt encodes without it
    assert torch.equal(q.weight.detach(), w0)
    engine.apply_te(seg1[0])
    torch.testing.assert_close(q.weight.detach(), w0 + 0.5 * delta, rtol=1e-5, atol=1e-6)
    engine.deactivate()
    assert_pristine(trees, before)


def test_a_hires_pass_finds_its_grids_from_the_new_latent():
    trees = build()
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    engine.activate(compile_hires("<lora:lora:1:region=left>"))
    engine.set_latent((12, 12))  # the host upscaled the latent 1.5×
    engine.set_step(0, "hires")
    torch.manual_seed(0)
    out = run_unet(trees, x=torch.randn(2, 4, 12, 12))
    assert not engine.errors and torch.isfinite(out).all()
    engine.deactivate()
    ref = run_unet(trees, x=torch.randn(2, 4, 12, 12))
    assert out.shape == ref.shape


def compile_hires(prompt):
    from netweave.network.plan import CompileContext, compile_prompt
    return compile_prompt(prompt, CompileContext(arch="sd1", steps=4, hires_steps=2))


def test_the_next_generation_drops_every_hook_of_the_last():
    trees = build()
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    engine.activate(plan("<lora:te:1:region=left> <lora:lora:1:region=top> <lora:loha:1:neg=0>"))
    run_unet(trees)
    assert engine.activate(plan("<lora:full:0.5>")) == []
    hooked = [n for n, m in trees["unet"].named_modules()
              if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []  # a global network merges: nothing left at run time
    out = run_unet(trees)
    fresh = build()
    other = make_engine(fresh, "sd1", NETS[0], latent=LATENT)
    other.activate(plan("<lora:full:0.5>"))
    assert torch.equal(out, run_unet(fresh))


def test_one_file_twice_in_a_prompt_is_two_networks():
    trees = build()
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT)
    engine.activate(plan("<lora:lora:0.5> <lora:lora:0.25:region=left>"))
    (t,) = engine.keymap.lookup("lora_unet_down_blocks_1_attentions_0_proj_in")
    assert engine.strengths(t) == {0: 0.5, 1: 0.25}
    slot = engine._slots[t]
    assert slot.contributions[0].adapter is slot.contributions[1].adapter  # cached once
    engine.deactivate()


@pytest.mark.parametrize("layout", sorted(TREES))
def test_a_layer_call_like_an_earlier_one_adds_what_a_fresh_engine_adds(layout):
    """Hooked layers keep each kind of call made ready at its first (bypass.Prepared). Across
    a step called twice, strengths that change with the step, rows that change and a network
    of other arithmetic beside them, every output equals that of an engine activated afresh
    for that one call."""
    prompts = ["<lora:lora:0.2@0,1@0.5:region=left> <lora:lora:0.5:region=right:neg=0.5>",
               "<lora:lora:0.7:region=top> <lora:loha:0.4@0,0.8@0.5:region=left>"]
    same = ([0, 1], [False, False])
    calls = [(0, *same), (0, *same), (1, *same), (2, *same), (2, [1, 0], [False, False]),
             (2, [0, 0], [False, True]), (3, *same), (0, [1, 1], [True, False])]
    torch.manual_seed(5)
    x, ctx = torch.randn(2, 4, *LATENT), torch.randn(2, 5, 32)
    trees, fresh = build(layout), build(layout)
    engine = make_engine(trees, "sd1", NETS[0], latent=LATENT, strategy="bypass")
    other = make_engine(fresh, "sd1", NETS[0], latent=LATENT, strategy="bypass")
    assert engine.activate([plan(p, steps=4) for p in prompts]) == []
    changed = []
    for k, prompt_rows, uncond in calls:
        engine.set_step(k)
        engine.set_rows(prompt_rows, uncond)
        out = run_unet(trees, ctx, x)
        other.activate([plan(p, steps=4) for p in prompts])
        other.set_step(k)
        other.set_rows(prompt_rows, uncond)
        assert torch.equal(out, run_unet(fresh, ctx, x)), (k, prompt_rows, uncond)
        other.deactivate()
        changed.append(out)
    assert torch.equal(changed[0], changed[1])
    assert not torch.equal(changed[2], changed[3])  # the schedule and the rows each tell
    assert not torch.equal(changed[3], changed[4])
    engine.deactivate()
