"""The engine's fast paths and its measured cost model (README, "The engine"): keyframe
merges in batches, the low-rank branch on its rank-r intermediate, cross-attention re-runs
that reuse the main call's key and value projections, the calibration, and the benchmark's
own arithmetic."""
import math

import pytest
import torch

from netweave.network import batched_merge
from netweave.network.batched_merge import Job
from netweave.devtools.bench import Setup, run, table
from netweave.network.bypass import Factors
from netweave.network.calibrate import Calibration, calibration
from tinymodels import LEVELS, TE1_WIDTH, diffusers_trees, ldm_trees

from engine_helpers import assert_pristine, make_engine, plan, snapshot, unet_out


# Batches always pay / never pay: the engine's choice, forced through its cost model.
BATCH = Calibration(1.0, 100.0, 1.0, 0.0, 0.1, 0.0)
ONE_BY_ONE = Calibration(1.0, 0.0, 1.0, 0.0, 10.0, 100.0)


def jobs(n, shape, dtype, rank=4, seed=0, inference=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        w0 = torch.randn(shape, generator=gen).to(dtype)
        with torch.inference_mode(inference):
            dest = torch.zeros(shape, dtype=dtype)
        fan_in = math.prod(shape[1:])
        factors = Factors(torch.randn(rank, fan_in, generator=gen),
                          torch.randn(shape[0], rank, generator=gen))
        out.append(Job(dest, w0, factors, 0.3 * i - 0.5))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(24, 16), (8, 6, 3, 3)])
def test_a_batch_merges_what_each_layer_alone_would(dtype, shape):
    alone, batched = jobs(5, shape, dtype), jobs(5, shape, dtype)
    for job in alone:
        batched_merge.merge_one(job)
    (group,) = batched_merge.groups(batched).values()
    batched_merge.merge(group, budget_bytes=2 * batched[0].bytes)  # batches of 2, 2 and 1
    for a, b in zip(alone, batched):
        assert b.dest.dtype == dtype and not torch.equal(b.dest, torch.zeros_like(b.dest))
        expected = a.w0.float() + a.strength * (a.factors.up @ a.factors.down).reshape(shape)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(b.dest.float(), a.dest.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(b.dest.float(), expected.to(dtype).float(), rtol=tol, atol=tol)


def test_batches_group_by_shape_dtype_rank_and_mode():
    mixed = jobs(2, (8, 4), torch.float32) + jobs(2, (8, 4), torch.float16) + \
        jobs(2, (8, 4), torch.float32, rank=2) + jobs(2, (4, 8), torch.float32) + \
        jobs(2, (8, 4), torch.float32, inference=True)
    groups = batched_merge.groups(mixed)
    assert len(groups) == 5 and all(len(g) == 2 for g in groups.values())
    (inference,) = [g for k, g in groups.items() if k[-1]]
    batched_merge.merge(inference, 2 ** 20)  # inference tensors take writes in inference mode
    assert all(j.dest.is_inference() and j.dest.abs().sum() > 0 for j in inference)


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_keyframes_merge_the_same_in_batches_or_one_by_one(layout, netdir, monkeypatch):
    batches = []
    real = batched_merge.merge
    monkeypatch.setattr(batched_merge, "merge", lambda group, budget: (batches.append(len(group)),
                                                                       real(group, budget)))
    trees_of = ldm_trees if layout == "ldm" else diffusers_trees
    prompt = "<lora:sd1_lora:0.2@0,1@3,0.5@5>"
    outs = {}
    for name, costs in (("batch", BATCH), ("alone", ONE_BY_ONE)):
        trees = trees_of("sd1")
        before = snapshot(trees)
        engine = make_engine(trees, "sd1", netdir, costs=costs, strategy="merge")
        engine.activate(plan(prompt, steps=6))
        outs[name] = []
        for k in range(6):
            engine.set_step(k)
            outs[name].append(unet_out(trees, "sd1"))
        engine.deactivate()
        assert_pristine(trees, before)
        if name == "batch":
            assert batches and max(batches) > 4  # same-shaped layers went together
            count = len(batches)
        else:
            assert len(batches) == count  # nothing batched when it does not pay
    for a, b in zip(outs["batch"], outs["alone"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(outs["alone"][0], outs["alone"][3])  # the schedule shows


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_a_cross_attention_rerun_reuses_the_main_calls_text_projections(layout, netdir):
    """The re-run on a region computes its keys and values on no tokens: the main call's are
    reused and only the network's own delta is added (exactness: test_engine_regions)."""
    trees = (ldm_trees if layout == "ldm" else diffusers_trees)("sd1")
    engine = make_engine(trees, "sd1", netdir, latent=(8, 8))
    engine.activate(plan("<lora:sd1_lora:0.9:region=left>", steps=1))
    tokens = []

    def seen(module, args, out):
        tokens.append((engine.runtime.variant, args[0].shape[-2], out.shape[-2]))
    hooks = [unit.module.to_k.register_forward_hook(seen) for unit in engine._units.values()]
    engine.set_step(0)
    unet_out(trees, "sd1")
    for h in hooks:
        h.remove()
    reruns = [t for t in tokens if t[0] is not None]
    mains = [t for t in tokens if t[0] is None]
    assert reruns and len(reruns) == len(mains)
    assert all(seen == 0 and out == mains[0][2] for _, seen, out in reruns)
    assert all(u.kv == {} for u in engine._units.values())  # nothing held after the call
    engine.deactivate()


def test_calibration_is_measured_once_and_prices_every_path():
    first = calibration("cpu", torch.float32)
    assert calibration(torch.device("cpu"), torch.float32) is first
    for name, value in first.as_dict().items():
        assert math.isfinite(value) and value >= 0, name
    assert first.merge_ns_per_mac > 0 and first.bypass_ns_per_mac > 0
    assert first.bypass_seconds(10 ** 6) > first.bypass_seconds(10 ** 3)
    assert first.merge_seconds(0) == pytest.approx(first.merge_us_per_layer * 1e-6)


def test_the_cost_model_follows_the_measured_prices(netdir):
    """The same scheduled plan: a costly branch call keeps every layer merged; free calls and
    cheap multiply-adds send the scheduled LoRA layers to the branch."""
    prompt = "<lora:sd1_lora:0@0,0.3@0.25,0.6@0.5,1@0.75>"
    costly = make_engine(ldm_trees("sd1"), "sd1", netdir, latent=(8, 8), batch=1,
                         costs=Calibration(1.0, 0.0, 1.0, 10 ** 6))
    costly.activate(plan(prompt, steps=20))
    assert not any(c.bypass for s in costly._slots.values() for c in s.contributions)
    cheap = make_engine(ldm_trees("sd1"), "sd1", netdir, latent=(8, 8), batch=1,
                        costs=Calibration(1.0, 10 ** 6, 1e-6, 0.0))
    cheap.activate(plan(prompt, steps=20))
    unet = [c.bypass for s in cheap._slots.values() if s.target.component == "unet"
            for c in s.contributions if s.target.chunk is None]
    assert unet and all(unet)


TINY = Setup("tiny SD1", "sd1", 8, 3, dict(
    block_out_channels=LEVELS, cross_attention_dim=TE1_WIDTH, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")))


@pytest.mark.slow
def test_the_benchmark_reports_medians_spreads_floors_and_choices():
    result = run(setup=TINY, repeats=2, rank=4, quantize="q8_0")
    floor, ratios = result["floor"], result["ratios"]
    assert floor["static_vs_base"] == 1.0  # merged weights: the bare UNet's arithmetic
    assert floor["scheduled_vs_static"] > 1.0  # the keyframe merges
    assert floor["regional_vs_base"] > 1.0 and floor["bypass_all_vs_base"] > 1.0
    assert floor["per_region_passes_vs_base"] == 2.0
    for key, (lo, hi) in result["spread"].items():
        assert lo <= hi and ratios[key] > 0, key
    layers = result["touched_layers"]
    assert sum(result["choices"]["static"].values()) == layers
    assert result["choices"]["bypass_all"]["merged"] == 0
    assert result["choices"]["scheduled_merge_only"]["bypassed"] == 0
    # the keyframes are staggered: "re-merge all" re-merges every layer where any network
    # changes, the engine only the layers of the network that changes
    assert result["remerge_every_change_merges_during_steps"] > \
        result["scheduled_merge_only_merges_during_steps"] > 0
    assert result["choices"]["regional"]["bypassed"] > 0
    # the merges timed on their own: a static plan merges nothing while sampling
    seconds = result["timings_s"]
    assert seconds["remerge_every_change_set_step"] > 0 and "scheduled_vs_remerge_every_change" \
        in ratios and seconds["static_set_step"] < seconds["scheduled_set_step"]
    assert "set_step alone (the merges), per pass:" in table(result)
    assert result["kept_delta"]["static"] == 0  # merged once: nothing kept
    assert ("re-merged from a kept ΔW" in table(result)) == any(result["kept_delta"].values())
    # quantized rows: the LoRAs beside the quantized layers, the requantizing baseline merges
    # (the convolutions stay float: they merge in every workload)
    quantized, requantized = result["choices"]["quantized_static"], \
        result["choices"]["quantized_requantize_every_change"]
    assert quantized["bypassed"] > 0 and requantized["bypassed"] == 0
    assert requantized["merged"] == quantized["merged"] + quantized["bypassed"]
    assert {"quantized_static_vs_base", "quantized_requantize_vs_beside",
            "quantized_beside_vs_float_merged"} <= set(ratios)
    text = table(result)
    assert "above" in text and "cost model, measured here" in text and "tiny SD1" in text
    assert "requantize on change vs beside" in text and "quantized rows: q8_0" in text


@pytest.mark.parametrize("batched", [False, True])
def test_a_merge_beyond_the_weights_dtype_writes_nothing(batched):
    loud = jobs(3, (8, 8), torch.float16)
    big = Factors(loud[1].factors.down * 300, loud[1].factors.up * 300)
    loud[1] = Job(loud[1].dest, loud[1].w0, big, 1000.0, "the loud one")
    with pytest.raises(batched_merge.Overflow) as caught:
        if batched:
            batched_merge.merge(loud, 2 ** 20)
        else:
            for job in loud:
                batched_merge.merge_one(job)
    assert caught.value.job.source == "the loud one"
    assert not loud[1].dest.any()  # never written
    assert all(torch.isfinite(j.dest).all() for j in loud)


# ---- kept ΔW (network/deltas.py) ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_merge_from_a_kept_delta_equals_the_merge_from_the_factors(dtype):
    from netweave.network.deltas import delta_dtype
    plain, kept = jobs(4, (8, 6, 3, 3), dtype), jobs(4, (8, 6, 3, 3), dtype)
    kept = [Job(j.dest, j.w0, j.factors, j.strength, delta=(j.factors.up @ j.factors.down)
                .to(delta_dtype(dtype)).view(j.dest.shape)) for j in kept]
    for job in plain:
        batched_merge.merge_one(job)
    (group,) = batched_merge.groups(kept).values()  # one group, whatever the shapes
    batched_merge.merge_deltas(group)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for a, b in zip(plain, kept):
        assert not torch.equal(b.dest, torch.zeros_like(b.dest))
        torch.testing.assert_close(b.dest.float(), a.dest.float(), rtol=tol, atol=tol)


def test_a_merge_from_a_kept_delta_that_overflows_its_dtype_writes_nothing():
    (job,) = jobs(1, (4, 4), torch.float16)
    big = Job(job.dest, job.w0, job.factors, 2.0, delta=torch.full((4, 4), 6e4, dtype=torch.float16))
    with pytest.raises(batched_merge.Overflow):
        batched_merge.merge_deltas([big])
    assert torch.equal(job.dest, torch.zeros_like(job.dest))


# Kept ΔW always pays per layer here (a large fixed price of a merge from the factors).
KEEPS = Calibration(0.03, 50.0, 0.03, 10 ** 6, 0.045, 60.0, delta_ns_per_value=0.03,
                    delta_us_per_layer=1.0)


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_scheduled_layers_re_merge_from_their_kept_delta_and_restore_exactly(layout, netdir):
    """Every step's output equals that of merges from the factors; the kept ΔW stay within
    their budget, go to the contributions merged most often first, and are dropped with the
    generation."""
    from netweave.devtools.synthetic import write_network
    if not (netdir / "sd1_lora2.safetensors").exists():
        write_network(netdir / "sd1_lora2.safetensors", ldm_trees("sd1"), "lora", "kohya", "sd1",
                      seed=7)
    trees_of = ldm_trees if layout == "ldm" else diffusers_trees
    # 4 merges of sd1_lora (0.2, 1, 0.5, 0.8), 2 of sd1_lora2 (0.3, 0.9)
    prompt = "<lora:sd1_lora:0.2@0,1@0.4,0.5@0.6,0.8@1> <lora:sd1_lora2:0.3@0,0.9@0.6>"
    outs, kept, first = {}, {}, 0
    for name in ("kept", "factors", "first"):
        budget = {"kept": 2 ** 30, "factors": 0, "first": first}[name]
        trees = trees_of("sd1")
        before = snapshot(trees)
        engine = make_engine(trees, "sd1", netdir, costs=KEEPS, delta_bytes=budget)
        engine.activate(plan(prompt, steps=6))
        outs[name] = []
        for k in range(6):
            engine.set_step(k)
            outs[name].append(unet_out(trees, "sd1"))
        kept[name] = {engine.entries[c.network].net.name for s in engine._unet_slots()
                      for c in s.contributions if engine.deltas.granted(id(c))}
        if name == "kept":  # the budget that holds exactly the first network's
            first = sum(s.target.weight.numel() * 4 for s in engine._unet_slots()
                        for c in s.contributions if engine.deltas.granted(id(c)) and
                        engine.entries[c.network].net.name == "sd1_lora")
        assert 0 < engine.deltas.nbytes <= budget if kept[name] else engine.deltas.nbytes == 0
        assert not any(c.bypass for s in engine._slots.values() for c in s.contributions)
        engine.deactivate()
        assert engine.deltas.nbytes == 0
        assert_pristine(trees, before)
    assert kept == {"kept": {"sd1_lora", "sd1_lora2"}, "factors": set(), "first": {"sd1_lora"}}
    for name in ("kept", "first"):
        for a, b in zip(outs[name], outs["factors"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(outs["kept"][0], outs["kept"][3])  # the schedule shows


def test_kept_deltas_are_left_where_a_merge_from_the_factors_is_cheaper(netdir):
    costly = Calibration(0.03, 10.0, 0.03, 10 ** 6, delta_ns_per_value=100.0,
                         delta_us_per_layer=100.0)
    engine = make_engine(ldm_trees("sd1"), "sd1", netdir, costs=costly)
    engine.activate(plan("<lora:sd1_lora:0.2@0,1@2,0.5@4>", steps=6))
    assert not any(engine.deltas.granted(id(c)) for s in engine._unet_slots()
                   for c in s.contributions)
    engine.deactivate()


def test_the_calibration_prices_merges_from_a_kept_delta():
    measured = calibration("cpu", torch.float32)
    assert measured.delta_ns_per_value > 0
    assert measured.delta_seconds(10 ** 6) > measured.delta_seconds(10 ** 3)
