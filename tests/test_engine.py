"""Engine I invariants on tiny LDM and diffusers UNets and CLIP encoders: no tags is bit-exact,
everything restores bit-exactly (finished, raised, interrupted), schedules and block weights
reach exactly their layers, merges match an fp64 reference, fp16 does not drift."""
import pytest
import torch

from netweave.network.calibrate import Calibration
from netweave.network.engine import BYPASS_BELOW, Engine
from netweave.network.keymap import KeyMap
from tinymodels import TREES, diffusers_trees, ldm_trees

from engine_helpers import LBW17, assert_pristine, make_engine, plan, snapshot, unet_out


@pytest.mark.parametrize("layout", sorted(TREES))
def test_no_tags_is_bit_identical(layout, netdir):
    trees = TREES[layout]("sd1")
    before, out = snapshot(trees), unet_out(trees, "sd1")
    engine = make_engine(trees, "sd1", netdir)
    assert engine.activate(plan("a cat, no tags")) == []
    for k in range(6):
        engine.set_step(k)
    assert torch.equal(unet_out(trees, "sd1"), out)
    assert_pristine(trees, before)
    assert engine.merges == 0 and engine.pristine_bytes == 0


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", sorted(TREES))
def test_finished_generation_restores_bit_exactly(layout, arch, netdir):
    trees = TREES[layout](arch)
    before, out = snapshot(trees), unet_out(trees, arch)
    engine = make_engine(trees, arch, netdir)
    p = plan(f"<lora:{arch}_lora:0@0,1@0.5:hr=0.5> <lyco:{arch}_loha:0.7:te=0.2@0,1@3> "
             f"<lora:{arch}_full:0.3:in=0> <lora:{arch}_norm:1:stop=4> <lora:{arch}_lokr:0.5>",
             arch, steps=6, hires=3)
    assert engine.activate(p) == []
    for seg in engine.te_segments():
        engine.apply_te(seg)
    for k in range(6):
        engine.set_step(k)
    assert not torch.equal(unet_out(trees, arch), out)  # the networks did something
    for k in range(3):
        engine.set_step(k, "hires")
    engine.deactivate()
    assert_pristine(trees, before)
    assert torch.equal(unet_out(trees, arch), out)


def test_exception_in_a_callback_then_deactivate(netdir):
    trees = diffusers_trees("sd1")
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", netdir)
    with pytest.raises(RuntimeError, match="callback"):
        try:
            engine.activate(plan("<lora:sd1_lora:0@0,1@1>"))
            engine.set_step(0)
            engine.set_step(1)
            raise RuntimeError("a step callback failed")
        finally:
            engine.deactivate()
    assert_pristine(trees, before)


@pytest.mark.parametrize("error", [KeyboardInterrupt, MemoryError])
def test_interrupt_or_oom_mid_merge_restores_everything(error, netdir):
    trees = ldm_trees("sd1")
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", netdir)
    engine.activate(plan("<lora:sd1_lora:0@0,1@1> <lora:sd1_loha:1>"))
    calls = {"n": 0}
    first = next(s for s in engine._slots.values() if s.target.component == "unet")
    adapter = first.contributions[0].adapter

    def failing(*a, **kw):  # fails in the middle of a step's merges
        calls["n"] += 1
        raise error("simulated")
    adapter.delta = adapter.low_rank = failing  # instance attributes shadow the methods
    try:
        with pytest.raises(error):
            for k in range(6):
                engine.set_step(k)
    finally:
        del adapter.delta, adapter.low_rank
    assert calls["n"] == 1
    assert_pristine(trees, before)  # without any deactivate
    engine.set_step(5)  # a dead engine does nothing
    assert_pristine(trees, before)


def test_schedule_and_block_weights_read_back(netdir):
    trees = ldm_trees("sd1")
    engine = make_engine(trees, "sd1", netdir)
    p = plan(f"<loractl:sd1_lora:unet=0@0,1@1:te=0.5:lbw={LBW17}>", steps=5)
    engine.activate(p)
    net = p.networks[0]
    for k in range(5):
        engine.set_step(k)
        for slot in engine._slots.values():
            t = slot.target
            if t.component != "unet":
                continue
            block = net.base.blocks[t.block][k] if t.block else 1.0
            want = net.base.strength["unet"][k] * block
            got = engine.strengths(t)
            assert got == ({0: pytest.approx(want)} if want else {}), (t.name, k)
    # block weights reach exactly the layers of their block
    km = KeyMap(trees)
    (t,) = km.lookup("lora_unet_input_blocks_1_1_proj_in")
    assert engine.strengths(t) == {0: pytest.approx(0.1)}  # IN01 = 0.1, at step 4 (unet 1)
    (t,) = km.lookup("lora_unet_input_blocks_3_0_op")
    assert engine.strengths(t) == {}  # IN03 is not in the 17-value vector: 0
    (t,) = km.lookup("lora_te_text_model_encoder_layers_0_mlp_fc1")
    assert engine.strengths(t) == {0: pytest.approx(0.5)}  # BASE 1 × te 0.5


def test_merges_match_an_fp64_reference(netdir):
    trees = diffusers_trees("sd1")
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", netdir)
    engine.activate(plan("<lora:sd1_lora:0.7> <lora:sd1_full:-0.4>"))
    from safetensors.torch import load_file
    lora, full = load_file(str(netdir / "sd1_lora.safetensors")), load_file(str(netdir / "sd1_full.safetensors"))
    km = engine.keymap
    checked = 0
    for name in {k.split(".")[0] for k in lora}:
        (t,) = km.lookup(name)
        if t.component != "unet":
            continue
        w0 = before["unet", t.path + ".weight"].double()
        up, down = lora[name + ".lora_up.weight"].double(), lora[name + ".lora_down.weight"].double()
        scale = float(lora[name + ".alpha"]) / down.shape[0]
        ref = w0 + 0.7 * scale * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape) \
            - 0.4 * full[name + ".diff"].double()
        torch.testing.assert_close(t.weight.detach().double(), ref, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked > 100


def test_fp16_hundred_schedule_changes_no_drift(netdir):
    trees = {k: v.half() for k, v in ldm_trees("sd1").items()}
    before = snapshot(trees)
    steps = 101
    sched = ",".join(f"{(i % 2) * 0.9 + 0.05}@{i + 1}" for i in range(steps))
    engine = make_engine(trees, "sd1", netdir, strategy="merge")  # the merged path's drift
    p = plan(f"<lora:sd1_lora:{sched}>", steps=steps)
    engine.activate(p)
    km = engine.keymap
    (t,) = km.lookup("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")
    adapter = next(iter(engine._slots[t].contributions)).adapter
    w0 = before["unet", t.path + ".weight"].double()
    up, down = adapter.up.double(), adapter.down.double()
    worst = []
    for k in range(steps):
        engine.set_step(k)
        s = float(p.networks[0].base.strength["unet"][k])
        ref = w0 + s * adapter.scale * (up @ down)  # fp64, independent of the engine
        err = (t.weight.detach().double() - ref).abs().max().item()
        worst.append(err)
        assert err <= 1e-3, k  # one fp16 rounding of values below 1
    assert max(worst[-10:]) <= max(worst[:10]) * 1.5 + 1e-6  # no growth: nothing accumulates
    assert engine.merges > 100 * 50
    engine.deactivate()
    assert_pristine(trees, before)


def test_constant_schedule_costs_nothing_after_the_first_step(netdir):
    engine = make_engine(ldm_trees("sd1"), "sd1", netdir)
    engine.activate(plan("<lora:sd1_lora:0.8> <lora:sd1_loha:te=0.3:unet=0.6>", steps=20))
    after_activate = engine.merges
    for k in range(20):
        engine.set_step(k)
        engine.set_step(k)  # samplers call the denoiser twice per step
    assert engine.merges == after_activate


def test_keyframes_merge_only_their_layers(netdir):
    engine = make_engine(ldm_trees("sd1"), "sd1", netdir)
    engine.activate(plan("<lora:sd1_lora:0.8> <lora:sd1_loha:0@0,1@3:in=0>", steps=6))
    unet_loha = sum(1 for s in engine._slots.values() if s.target.component == "unet" and
                    any(c.network == 1 for c in s.contributions) and
                    not (s.target.block or "").startswith("IN"))
    start = engine.merges
    for k in range(6):
        engine.set_step(k)
    assert engine.merges - start == unet_loha  # one keyframe, only loha's non-IN layers


def test_between_generations_only_changed_networks_remerge(netdir):
    trees = ldm_trees("sd1")
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", netdir)
    engine.activate(plan("<lora:sd1_lora:0.8> <lora:sd1_loha:0.5>"))
    first = engine.merges
    engine.activate(plan("<lora:sd1_lora:0.8> <lora:sd1_loha:0.5>"))
    assert engine.merges == first  # an unchanged plan re-merges nothing
    loha_only = sum(1 for s in engine._slots.values()
                    if [c.network for c in s.contributions] == [1])
    shared = sum(1 for s in engine._slots.values() if len(s.contributions) == 2)
    engine.activate(plan("<lora:sd1_lora:0.8> <lora:sd1_loha:0.6>"))
    assert engine.merges - first == loha_only + shared  # only layers loha touches
    engine.activate(plan("no tags any more"))
    assert_pristine(trees, before) and engine.pristine_bytes == 0


def test_text_encoder_segments(netdir):
    trees = ldm_trees("sd1")
    engine = make_engine(trees, "sd1", netdir)
    engine.activate(plan("<lora:sd1_lora:te=0.1@0,0.6@0.5:unet=1>", steps=6))
    segs = engine.te_segments()
    assert [(s.start, s.stop) for s in segs] == [(0, 3), (3, 6)]
    assert engine.segment_at(4) == segs[1]
    (t,) = engine.keymap.lookup("lora_te_text_model_encoder_layers_0_mlp_fc1")
    engine.apply_te(segs[1])
    assert engine.strengths(t) == {0: pytest.approx(0.6)}
    engine.apply_te(segs[0])
    assert engine.strengths(t) == {0: pytest.approx(0.1)}


def test_openclip_fused_attention_merges_its_chunks(netdir):
    trees = ldm_trees("sdxl")
    before = snapshot(trees)
    engine = make_engine(trees, "sdxl", netdir)
    engine.activate(plan("<lora:sdxl_lora:1>", "sdxl"))
    mha = trees["te2"].model.transformer.resblocks[0].attn
    w0 = before["te2", "model.transformer.resblocks.0.attn.in_proj_weight"]
    assert not torch.equal(mha.in_proj_weight.detach(), w0)
    (q,) = engine.keymap.lookup("lora_te2_text_model_encoder_layers_0_self_attn_q_proj")
    slot = engine._slots[q]
    want = w0[:48] + slot.contributions[0].adapter.delta(w0[:48].float(), 1.0)
    assert torch.equal(mha.in_proj_weight.detach()[:48], want)
    engine.deactivate()
    assert_pristine(trees, before)


def test_model_as_lora_through_the_engine(tmp_path, netdir):
    from safetensors.torch import save_file
    other = ldm_trees("sd1")
    with torch.no_grad():
        for p in other["unet"].parameters():
            p.add_(0.05)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in other["unet"].state_dict().items()},
              str(tmp_path / "other.safetensors"))
    trees = ldm_trees("sd1")
    before = snapshot(trees)
    engine = Engine(trees, "sd1", lambda kind, name: str(tmp_path / f"{name}.safetensors"))
    assert engine.activate(plan("<model:other:0.5>")) == []
    w = trees["unet"].input_blocks[1][1].proj_in.weight.detach()
    w0 = before["unet", "input_blocks.1.1.proj_in.weight"]
    torch.testing.assert_close(w, w0 + 0.05 * 0.5, rtol=0, atol=1e-6)
    b = trees["unet"].input_blocks[1][1].proj_in.bias.detach()
    torch.testing.assert_close(b, before["unet", "input_blocks.1.1.proj_in.bias"] + 0.025, rtol=0, atol=1e-6)
    engine.deactivate()
    assert_pristine(trees, before)


def test_missing_and_bad_files_skip_only_their_network(tmp_path, netdir):
    (netdir / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    trees = ldm_trees("sd1")
    engine = make_engine(trees, "sd1", netdir)
    errors = engine.activate(plan("<lora:typo_name:1> <lora:broken:1> <lora:sd1_lora:1> "
                                  "<lora:sdxl_lora:1>"))
    assert len(errors) == 3
    assert "typo_name" in errors[0] and "broken" in errors[1] and "SDXL" in errors[2]
    assert {c.network for s in engine._slots.values() for c in s.contributions} == {2}


def test_pristine_copies_only_of_touched_params(netdir):
    trees = ldm_trees("sd1")
    engine = make_engine(trees, "sd1", netdir, pristine_on_cpu=True)
    engine.activate(plan("<lora:sd1_norm:1>"))  # norm layers only
    touched = {(id(s.target.module), s.target.param) for s in engine._slots.values()} | \
        {(id(s.target.module), s.target.bias_param) for s in engine._slots.values()}
    assert set(engine._pristine) == touched
    assert all(t.device.type == "cpu" for _, t in engine._pristine.values())
    norm_bytes = sum(m.weight.numel() * 4 * 2 for m in trees["unet"].modules()
                     if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)))
    assert engine.pristine_bytes <= norm_bytes + sum(
        m.weight.numel() * 8 for m in trees["te1"].modules() if isinstance(m, torch.nn.LayerNorm))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bit_exact_restore(netdir):
    trees = {k: v.cuda().half() for k, v in ldm_trees("sd1").items()}
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", netdir, pristine_on_cpu=True)
    engine.activate(plan("<lora:sd1_lora:0@0,1@1> <lora:sd1_loha:0.5>"))
    for k in range(6):
        engine.set_step(k)
    engine.deactivate()
    assert_pristine(trees, before)


# ---- merge or bypass: the cost model (docs/design.md §4) --------------------------------------------
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_bypass_equals_merge(arch, netdir):
    outputs = {}
    for strategy in ("merge", "bypass"):
        trees = diffusers_trees(arch)
        before = snapshot(trees)
        engine = make_engine(trees, arch, netdir, strategy=strategy)
        engine.activate(plan(f"<lora:{arch}_lora:0.2@0,1@3:lbw=" +
                             ("0.5,1,1,1,1,1,1,1,1,1,1,1" if arch == "sdxl" else LBW17) + ">",
                             arch, steps=6))
        outs = []
        for k in (0, 3, 5):
            engine.set_step(k)
            outs.append(unet_out(trees, arch))
        bypassed = sum(c.bypass for s in engine._slots.values() for c in s.contributions)
        assert (bypassed > 100) == (strategy == "bypass")
        engine.deactivate()
        assert_pristine(trees, before)
        assert torch.equal(unet_out(trees, arch), unet_out(TREES["diffusers"](arch), arch))
        outputs[strategy] = outs
    for merged, bypassed in zip(outputs["merge"], outputs["bypass"]):
        torch.testing.assert_close(bypassed, merged, rtol=1e-4, atol=1e-4)


def test_cost_model_bypasses_deep_layers_of_scheduled_networks(netdir):
    # a tiny latent, so that the tiny tree's deep layers see few rows: there a low-rank branch
    # each step costs less than re-merging at each of 4 keyframes
    prompt = "<lora:sd1_lora:0@0,0.3@0.25,0.6@0.5,1@0.75> <lora:sd1_loha:0@0,1@0.5>"
    hooked = make_engine(ldm_trees("sd1"), "sd1", netdir, latent=(8, 8), batch=1,
                         costs=Calibration(0.03, 10.0, 0.03, 20.0))  # per call as a CPU measures
    hooked.activate(plan(prompt, steps=20))  # a tiny tree's layers never pay for a hook
    assert not any(c.bypass for s in hooked._slots.values() for c in s.contributions)
    engine = make_engine(ldm_trees("sd1"), "sd1", netdir, latent=(8, 8), batch=1,
                         costs=Calibration(1.0, 0.0, 1.0, 0.0))  # multiply-adds alone
    engine.activate(plan(prompt, steps=20))
    km = engine.keymap
    near_parity = 0

    def bypassed(key):
        (t,) = km.lookup(key)
        return {c.adapter.algorithm: c.bypass for c in engine._slots[t].contributions}
    assert bypassed("lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q") == \
        {"lora": True, "loha": False}  # deep: 4 rows; LoHa has no cheap branch
    assert bypassed("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q") == \
        {"lora": False, "loha": False}  # full resolution: 64 rows, merging is cheaper
    for slot in engine._slots.values():  # every decision is the cost model's
        for c in slot.contributions:
            t = slot.target
            costs = c.adapter.costs(tuple(t.weight.shape), engine._tokens(t, 4)) \
                if t.component == "unet" and t.chunk is None and \
                isinstance(t.module, (torch.nn.Linear, torch.nn.Conv2d)) else None
            if costs is None:
                assert not c.bypass
                continue
            series = c.series["base"]
            merges = 1 + int((series[1:] != series[:-1]).sum())
            branch, remerges = costs[1] * int((series != 0).sum()), costs[0] * merges
            assert c.bypass == (branch < remerges * BYPASS_BELOW)
            near_parity += remerges * BYPASS_BELOW <= branch < remerges
    assert near_parity  # some layers were cheaper beside, not by enough: merged
    static = make_engine(ldm_trees("sd1"), "sd1", netdir, latent=(8, 8), batch=1)
    static.activate(plan("<lora:sd1_lora:0.7>", steps=20))  # a constant strength always merges
    assert not any(c.bypass for s in static._slots.values() for c in s.contributions)


def test_bypassed_strengths_read_back_and_cost_no_merges(netdir):
    engine = make_engine(ldm_trees("sd1"), "sd1", netdir, strategy="bypass")
    p = plan("<lora:sd1_lora:0@0,1@1>", steps=5)
    engine.activate(p)
    (t,) = engine.keymap.lookup("lora_unet_input_blocks_4_1_proj_in")
    start = engine.merges
    for k in range(5):
        engine.set_step(k)
        s = float(p.networks[0].base.strength["unet"][k])
        assert engine.strengths(t) == ({0: pytest.approx(s)} if s else {})
    assert engine.merges == start  # a schedule on bypassed layers re-merges nothing


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_merge_in_fp32_and_restore(dtype, netdir):
    trees = {k: v.to(dtype) for k, v in diffusers_trees("sd1").items()}
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", netdir)
    engine.activate(plan("<lora:sd1_lora:0.8> <lora:sd1_full:0.5> <lora:sd1_norm:1>"))
    (t,) = engine.keymap.lookup("lora_unet_down_blocks_1_attentions_0_proj_in")
    w0 = before["unet", t.path + ".weight"].float()
    want = w0.clone()
    for c in engine._slots[t].contributions:
        want += c.adapter.delta(w0, c.at("base", 0))
    assert t.weight.dtype == dtype
    ulp = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # one rounding to the weight dtype
    torch.testing.assert_close(t.weight.detach().float(), want.to(dtype).float(), rtol=ulp, atol=1e-6)
    engine.deactivate()
    assert_pristine(trees, before)


def test_a_plan_for_another_architecture_is_refused(netdir):
    engine = make_engine(ldm_trees("sd1"), "sd1", netdir)
    with pytest.raises(ValueError, match="compiled for sdxl"):
        engine.activate(plan("<lora:sd1_lora:1>", "sdxl"))


def test_the_same_tag_twice_in_a_prompt_adds_up(netdir):
    """Two identical tags are two networks, as `<lora:x:0.5> <lora:x:0.4>` is: they sum
    (before, the second was taken for the batch-shared copy of the first and dropped)."""
    trees = ldm_trees("sd1")
    km = KeyMap(trees)
    (t,) = km.lookup("lora_unet_input_blocks_1_1_proj_in")
    merged = {}
    for prompt in ("<lora:sd1_lora:0.5> <lora:sd1_lora:0.5>", "<lora:sd1_lora:1>"):
        engine = make_engine(trees, "sd1", netdir)
        engine.activate(plan(prompt, steps=2))
        engine.set_step(0)
        merged[prompt] = t.weight.detach().clone()
        engine.deactivate()
    twice, once = merged.values()
    assert torch.allclose(twice, once, atol=1e-6)
    # shared across a batch: each prompt has it twice, both copies stay
    engine = make_engine(trees, "sd1", netdir)
    p = plan("<lora:sd1_lora:0.5> <lora:sd1_lora:0.5>", steps=2)
    engine.activate([p, p])
    engine.set_step(0)
    assert torch.allclose(t.weight.detach(), once, atol=1e-6)
    engine.deactivate()


def test_a_merge_that_overflows_the_weights_dtype_leaves_its_network_out(tmp_path, netdir):
    """Factors and strength each within bounds, but their product beyond fp16: the network is
    left out with a message, nothing non-finite reaches a weight, the others apply."""
    import shutil
    from netweave.devtools.synthetic import write_network
    trees = {k: m.half() for k, m in ldm_trees("sd1").items()}
    shutil.copy(netdir / "sd1_lora.safetensors", tmp_path / "calm.safetensors")
    write_network(tmp_path / "loud.safetensors", trees, "lora", "kohya", "sd1", seed=7, scale=30.0)
    before = snapshot(trees)
    engine = make_engine(trees, "sd1", tmp_path)
    errors = engine.activate(plan("<lora:loud:1000> <lora:calm:0.5>"))
    assert len(errors) == 1 and errors[0].startswith("lora:loud:") and "float16" in errors[0]
    assert [e.net.name for e in engine.entries] == ["calm"]
    now = snapshot(trees)
    assert all(torch.isfinite(v).all() for v in now.values())
    assert any(not torch.equal(v, before[k]) for k, v in now.items())  # calm applied
    engine.deactivate()
    assert_pristine(trees, before)
