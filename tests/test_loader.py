"""Every format × key style × tree layout × architecture: each key of a full-coverage file
lands on exactly one host layer, none is dropped silently; bad files fail clearly and never
touch a weight; checkpoints become full-rank contributions."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from netweave.devtools.synthetic import FORMATS, write_network
from netweave.network.files import NetworkFileError
from netweave.network.keymap import KeyMap
from netweave.network.loader import load_checkpoint, load_network, split_key
from tinymodels import ARCHS, TREES, diffusers_trees, hf_text, ldm_trees

CELLS = [(fmt, "kohya") for fmt in FORMATS if fmt != "peft"] + [("peft", "peft")] + \
    [("lora", s) for s in ("kohya_ldm", "lycoris", "oft")]


@pytest.fixture(scope="module")
def keymaps():
    return {(layout, arch): KeyMap(TREES[layout](arch)) for layout in TREES for arch in ARCHS}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file per (arch, format, style), written from the LDM trees' names."""
    root, cache = tmp_path_factory.mktemp("nets"), {}

    def get(arch, fmt, style):
        if (arch, fmt, style) not in cache:
            path = root / f"{arch}-{fmt}-{style}.safetensors"
            cache[arch, fmt, style] = path, write_network(path, ldm_trees(arch), fmt, style, arch)
        return cache[arch, fmt, style]
    return get


@pytest.mark.parametrize("layout", sorted(TREES))
@pytest.mark.parametrize("fmt,style", CELLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_full_coverage(arch, fmt, style, layout, files, keymaps):
    path, written = files(arch, fmt, style)
    net = load_network(str(path), keymaps[layout, arch], arch)
    assert net.unmatched == ()
    got = {(t.component, t.name) for t in net.layers}
    want = {(t.component, t.name) for t in written.values()}
    assert got == want and len(net.layers) == len(written)
    assert set(net.algorithms) == {FORMATS[fmt]}
    if FORMATS[fmt] in ("lora", "dora", "full") or arch == "sdxl":
        assert net.arch == arch  # detected from the keys and shapes alone
    else:  # tiny SD1 and SD2 differ only in proj_in's kind, which e.g. LoHa does not show
        assert net.arch in (arch, None)
    if style == "oft":
        return
    if fmt not in ("norm",):  # every text encoder is covered too
        assert {t.component for t in net.layers} == ({"unet", "te1", "te2"} if arch == "sdxl"
                                                     else {"unet", "te1"})


def test_split_key():
    assert split_key("lora_unet_a_b.lora_down.weight") == ("lora_unet_a_b", "lora_down.weight")
    assert split_key("unet.down_blocks.0.attentions.0.proj_in.lora_A.weight") == \
        ("unet.down_blocks.0.attentions.0.proj_in", "lora_A.weight")
    assert split_key("unet.x.to_q.lora.down.weight") == ("unet.x.to_q", "lora_down.weight")
    assert split_key("lora_unet_x.hada_w1_a") == ("lora_unet_x", "hada_w1_a")
    assert split_key("lora_unet_x.something_else") is None


def test_unknown_keys_are_listed_not_dropped(tmp_path, keymaps):
    path = tmp_path / "extra.safetensors"
    write_network(path, ldm_trees("sd1"), "lora", "kohya", "sd1")
    tensors = load_all(path)
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 3)
    tensors["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(3, 2)
    tensors["lora_unet_conv_in.unknown_part"] = torch.zeros(1)
    tensors["bundle_emb.mytoken.string_to_param.*"] = torch.zeros(1, 32)
    save_file(tensors, str(path))
    net = load_network(str(path), keymaps["diffusers", "sd1"], "sd1")
    assert net.unmatched == ("lora_unet_conv_in.unknown_part", "lora_unet_not_a_layer.lora_down.weight",
                             "lora_unet_not_a_layer.lora_up.weight")
    assert net.embeddings == ("bundle_emb.mytoken.string_to_param.*",)


def load_all(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def snapshot(trees):
    return {(c, k): v.clone() for c, t in trees.items() for k, v in t.state_dict().items()}


def unchanged(trees, before):
    return all(torch.equal(v, before[c, k]) for c, t in trees.items() for k, v in t.state_dict().items())


@pytest.mark.parametrize("file_arch,host_arch", [("sdxl", "sd1"), ("sd1", "sd2"), ("sd2", "sdxl")])
def test_other_architecture_is_a_clear_error(file_arch, host_arch, tmp_path):
    path = tmp_path / f"{file_arch}.safetensors"
    write_network(path, ldm_trees(file_arch), "lora", "kohya", file_arch)
    trees = diffusers_trees(host_arch)
    before = snapshot(trees)
    with pytest.raises(NetworkFileError) as err:
        load_network(str(path), KeyMap(trees), host_arch)
    message = str(err.value)
    assert str(path) in message and file_arch.upper() in message and host_arch.upper() in message
    assert unchanged(trees, before)


def test_shapes_that_do_not_fit_are_a_clear_error(tmp_path):
    # a text-encoder-only file gives no architecture away; its widths do not fit
    path = tmp_path / "wide.safetensors"
    write_network(path, {"te1": hf_text(64)}, "lora", "kohya", "sd1")
    with pytest.raises(NetworkFileError, match=r"does not fit this SD1 model.*host weight is \[.*, 32\]"):
        load_network(str(path), KeyMap(diffusers_trees("sd1")), "sd1")


@pytest.mark.parametrize("damage,words", [
    ("nan", "NaN or infinite"),
    ("mixed", "mixes parts"),
    ("half", "lora_down.weight"),
    ("pickle", "pickled"),
    ("truncated", "truncated"),
])
def test_bad_files(damage, words, tmp_path, keymaps):
    path = tmp_path / "bad.safetensors"
    write_network(path, ldm_trees("sd1"), "lora", "kohya", "sd1")
    tensors = load_all(path)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    if damage == "nan":
        tensors[key][0, 0] = float("nan")
    elif damage == "mixed":
        tensors[key.replace("lora_up.weight", "hada_w1_a")] = torch.zeros(2, 2)
    elif damage == "half":
        del tensors[key.replace("lora_up", "lora_down")]
    if damage == "pickle":
        torch.save(tensors, str(path))
    else:
        save_file(tensors, str(path))
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NetworkFileError) as err:
        load_network(str(path), keymaps["ldm", "sd1"], "sd1")
    assert str(path) in str(err.value) and words in str(err.value)


def _ldm_checkpoint(trees, arch):
    """A single-file LDM checkpoint of `trees`, with the key prefixes A1111 files use."""
    out = {f"model.diffusion_model.{k}": v for k, v in trees["unet"].state_dict().items()}
    te_prefix = {"sd1": ["cond_stage_model."], "sd2": ["cond_stage_model."],
                 "sdxl": ["conditioner.embedders.0.", "conditioner.embedders.1."]}[arch]
    for prefix, component in zip(te_prefix, ("te1", "te2")):
        for k, v in trees[component].state_dict().items():
            # A1111's transformers 4 keeps CLIP's text_model level; transformers 5 dropped it
            if k.startswith("transformer.") and not k.startswith("transformer.text_model."):
                k = "transformer.text_model." + k[len("transformer."):]
            out[prefix + k] = v
    out["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # the VAE: not a layer of ours
    return {k: v.contiguous() for k, v in out.items()}


def _perturbed(trees, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in trees.values():
            for p in t.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return trees


@pytest.mark.parametrize("arch", ARCHS)
def test_single_file_checkpoint_as_lora_on_diffusers_host(arch, tmp_path):
    target = _perturbed(ldm_trees(arch), 5)
    path = tmp_path / "other.safetensors"
    save_file(_ldm_checkpoint(target, arch), str(path))
    host = diffusers_trees(arch)
    km = KeyMap(host)
    net = load_checkpoint(str(path), km, arch)
    assert net.unmatched == () and net.arch == arch
    expected = {(t.component, t.name) for t in km.targets} - \
        {("unet", "add_embedding.linear_1"), ("unet", "add_embedding.linear_2")}
    assert {(t.component, t.name) for t in net.layers} == expected
    by_name = {(t.component, t.name): t for t in KeyMap(target).targets}
    for t, adapter in net.layers.items():
        want = by_name[t.component, t.name].weight.detach() - t.weight.detach()
        torch.testing.assert_close(adapter.delta(t.weight.detach(), 1.0), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(adapter.delta(t.weight.detach(), 0.25), want * 0.25, rtol=1e-6, atol=1e-7)


def test_diffusers_folder_checkpoint_on_ldm_host(tmp_path):
    target = _perturbed(diffusers_trees("sdxl"), 7)
    for folder, component, name in (("unet", "unet", "diffusion_pytorch_model"),
                                    ("text_encoder", "te1", "model"), ("text_encoder_2", "te2", "model")):
        os.makedirs(tmp_path / folder)
        save_file({k: v.contiguous() for k, v in target[component].state_dict().items()},
                  str(tmp_path / folder / f"{name}.safetensors"))
    host = ldm_trees("sdxl")
    net = load_checkpoint(str(tmp_path), KeyMap(host), "sdxl")
    assert net.arch == "sdxl" and len(net.layers) == len(KeyMap(host).targets)
    by_name = {(t.component, t.name): t for t in KeyMap(target).targets}
    for t, adapter in net.layers.items():  # includes OpenCLIP q/k/v chunks of fused in_proj
        want = by_name[t.component, t.name].weight.detach() - t.weight.detach()
        torch.testing.assert_close(adapter.delta(t.weight.detach()), want, rtol=0, atol=1e-6)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file(_ldm_checkpoint(ldm_trees("sdxl"), "sdxl"), str(path))
    with pytest.raises(NetworkFileError, match="SDXL.*SD1"):
        load_checkpoint(str(path), KeyMap(ldm_trees("sd1")), "sd1")


def test_peft_alpha_from_adapter_metadata(tmp_path, keymaps):
    path = tmp_path / "peft.safetensors"
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2})}
    write_network(path, ldm_trees("sd1"), "peft", "peft", "sd1", metadata=meta)
    net = load_network(str(path), keymaps["ldm", "sd1"], "sd1")
    assert {a.scale for a in net.layers.values()} == {0.5}
