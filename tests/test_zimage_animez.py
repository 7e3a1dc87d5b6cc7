"""Anime-Z's Z-Image LoRA files: dotted factor names (`.lora.down.weight`), the split
projections written `attention.to.q/k/v`, and each layer stored twice — the fused `qkv`
beside `to.q/k/v`, `attention.out` beside `to_out.0`. Equal copies load once (the hand-merged
ΔW, on both trees); copies that differ are an error naming both layers."""
import copy
import re

import pytest
import torch
from safetensors.torch import save_file

import dit_contract as dc
from engine_helpers import assert_pristine, make_engine, plan, snapshot
from test_zimage import inputs, run
from tinydits import zimage_native, zimage_to_native, zimage_transformer

from netweave.network.files import NetworkFileError
from netweave.network.keymap import KeyMap
from netweave.network.loader import load_network


@pytest.fixture(scope="module")
def case():
    return dc.Case("zimage", zimage_transformer, zimage_native, zimage_to_native, inputs, run)


def animez_file(path, net, tamper=None, alpha_at="to_q"):
    """The network as Anime-Z writes it; `tamper`: a key whose up factor is changed (a
    copy that no longer agrees); `alpha_at`: the split parts' alpha under `to_q` (where
    diffusers' converter reads it) or `to.q`. Returns ΔW per canonical layer."""
    sd, scale = {}, dc.ALPHA / dc.RANK

    def put(name, down, up):
        head = name if alpha_at == "to.q" else re.sub(r"\.to\.([qkv])$", r".to_\1", name)
        sd.update({f"diffusion_model.{name}.lora.down.weight": down,
                   f"diffusion_model.{name}.lora.up.weight": up,
                   f"diffusion_model.{head}.alpha": torch.tensor(dc.ALPHA)})
    for layer, (down, up) in net.items():
        put(layer, down, up)
        if layer.endswith(".attention.qkv"):
            n = up.shape[0] // 3
            for i, part in enumerate(("to.q", "to.k", "to.v")):
                put(layer[:-3] + part, down, up[i * n:(i + 1) * n].clone())
        elif layer.endswith(".attention.out"):
            put(layer[:-3] + "to_out.0", down, up.clone())
    if tamper is not None:
        sd[tamper] = sd[tamper] + 0.5
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(path))
    return {n: scale * u @ d for n, (d, u) in net.items()}


@pytest.mark.parametrize("layout,alpha_at", [("diffusers", "to_q"), ("native", "to_q"),
                                             ("diffusers", "to.q")])
def test_equal_copies_load_once_and_merge_the_hand_merged_delta(layout, alpha_at, case, tmp_path):
    native = zimage_native(case.model)
    deltas = animez_file(tmp_path / "az.safetensors", dc.random_network(native), alpha_at=alpha_at)
    host = copy.deepcopy(case.model) if layout == "diffusers" else zimage_native(case.model)
    loaded = load_network(str(tmp_path / "az.safetensors"), KeyMap({"unet": host}), "zimage")
    assert loaded.arch == "zimage" and not loaded.unmatched, loaded.unmatched
    trees = {"unet": host}
    before = snapshot(trees)
    engine = make_engine(trees, "zimage", tmp_path)
    engine.find = lambda kind, name: str(tmp_path / "az.safetensors")
    assert engine.activate(plan("<lora:az:0.6>", "zimage", steps=2)) == []
    engine.set_step(0)
    scaled = {n: 0.6 * d for n, d in deltas.items()}
    if layout == "native":
        dc.assert_native_weights(host, dc.weights(native), scaled)
    else:
        x = inputs()
        expected = run(dc.merged_diffusers(case.model, scaled, case.parts), x)
        assert torch.allclose(run(host, x), expected, atol=1e-4)
    engine.deactivate()
    assert_pristine(trees, before)


@pytest.mark.parametrize("tampered", ["layers.1.attention.to.k", "noise_refiner.0.attention.to_out.0"])
def test_copies_that_differ_are_an_error_naming_both_keys(tampered, case, tmp_path):
    animez_file(tmp_path / "az.safetensors", dc.random_network(zimage_native(case.model)),
                tamper=f"diffusion_model.{tampered}.lora.up.weight")
    fused = tampered.replace("to.k", "qkv").replace("to_out.0", "out")
    with pytest.raises(NetworkFileError, match="both change") as err:
        load_network(str(tmp_path / "az.safetensors"), KeyMap({"unet": copy.deepcopy(case.model)}),
                     "zimage")
    named = tampered.replace("to.k", "to_k")  # the layer as read (loader.split_key)
    assert f"diffusion_model.{fused}'" in str(err.value) and \
        f"diffusion_model.{named}'" in str(err.value), str(err.value)
