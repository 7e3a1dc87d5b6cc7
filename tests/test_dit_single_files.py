"""Single-file transformers of Z-Image, Qwen-Image, SD3/3.5 (each of its published layouts: SD3
Medium, SD3.5 Medium and Large) and Wan with `--components` (issue 19): each tiny transformer
(tinydits.py) is written in the names its published single files use — Z-Image's original
release (fused attention.qkv, attention.out, q_norm/k_norm, x_embedder, final_layer under
`model.diffusion_model.`), SD3/3.5's MMDiT (joint_blocks with x_block and context_block, fused
qkv, adaLN halves swapped where diffusers' converter swaps them back), Wan's original release
(test_dit_standalone.wan_original_file) and Qwen-Image's (ComfyUI's file keeps diffusers'
names; a file saved by ComfyUI puts them under `model.diffusion_model.`) — and `generate` runs
it with the diffusers folder of the same model for the rest, with no network: diffusers'
converter gives back the written weights, the picture is the folder's bit for bit, and a LoRA
tag changes it."""
import contextlib
import socket
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from test_dit_standalone import image, transformer_lora, wan_original_file
from tinydits import SD3_LAYOUTS, sd3_native, sd3_transformer, zimage_native
from tinypipes import wan_pipeline, write_pipeline

from netweave.extension.library import Library
from netweave.extension.masks import MaskStore
from netweave.extension.standalone.cli import main
from netweave.extension.standalone.host import DiffusersHost
from netweave.extension.standalone.models import load_model

PREFIX = "model.diffusion_model."
# What diffusers' converters rename besides the fused and renamed linear layers (tinydits'
# native trees): (diffusers' name part, the original's)
_ZIMAGE_REST = ((".attention.norm_q.", ".attention.q_norm."),
                (".attention.norm_k.", ".attention.k_norm."))
_SD3_REST = (("pos_embed.pos_embed", "pos_embed"), (".attn.norm_q.", ".x_block.attn.ln_q."),
             (".attn.norm_k.", ".x_block.attn.ln_k."),
             (".attn.norm_added_q.", ".context_block.attn.ln_q."),
             (".attn.norm_added_k.", ".context_block.attn.ln_k."),
             (".attn2.norm_q.", ".x_block.attn2.ln_q."), (".attn2.norm_k.", ".x_block.attn2.ln_k."),
             ("transformer_blocks.", "joint_blocks."))
# The key diffusers' infer_diffusers_model_type identifies each published file by
# (single_file_utils.CHECKPOINT_KEY_NAMES; Qwen-Image has none, its names being diffusers':
# one NetWeave's detection knows it by)
IDENTIFIED_BY = {"zimage": PREFIX + "layers.0.adaLN_modulation.0.weight",
                 "sd3": PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.bias",
                 "wan22": PREFIX + "head.modulation", "qwenimage": "txt_norm.weight"}


def original_state_dict(transformer, arch):
    """The transformer's weights in its published single file's names."""
    if arch == "qwenimage":
        return {k: v.clone() for k, v in transformer.state_dict().items()}
    native, renames = (zimage_native, _ZIMAGE_REST) if arch == "zimage" else (sd3_native, _SD3_REST)
    sd = {PREFIX + k: v.clone() for k, v in native(transformer).state_dict().items()}
    fused = {name for name, m in transformer.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))}
    for key, value in transformer.state_dict().items():
        if key.rsplit(".", 1)[0] in fused:
            continue  # a linear layer or the patch convolution: in the native tree
        for a, b in renames:
            key = key.replace(a, b)
        sd[PREFIX + key] = value.clone()
    return sd


@contextlib.contextmanager
def no_network():
    """Every connection attempt recorded and refused (HF_HUB_OFFLINE alone is read once, when
    huggingface_hub is imported)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield
    assert not attempts, f"network access: {attempts}"


# Each case: (architecture, its pipeline builder's arguments)
CASES = {"zimage": ("zimage", {}), "qwenimage": ("qwenimage", {}),
         **{layout: ("sd3", {"layout": layout}) for layout in SD3_LAYOUTS}, "wan22": ("wan22", {})}
# SD3's other layouts run `generate` in the slow sample: its command line reads any layout's
# file as the loader above does (the model is loaded the same way, offline, in the fixture)
OTHER_LAYOUTS = tuple(layout for layout in SD3_LAYOUTS if layout != "sd3.5-medium")


@dataclass
class Single:
    case: str
    arch: str
    folder: object  # the diffusers folder: the components, and the reference model
    path: object  # the single file
    loras: object
    file: DiffusersHost  # the single file's model, loaded with no network
    reference: DiffusersHost  # the folder's


@pytest.fixture(scope="module", params=tuple(CASES))
def single(request, tmp_path_factory):
    arch, kw = CASES[request.param]
    root = tmp_path_factory.mktemp(f"single-{request.param}")
    folder = root / f"tiny{arch}"
    if arch == "wan22":  # one expert (Wan 2.1, or 2.2 TI2V 5B): A14B's are two files
        wan_pipeline(experts=1).save_pretrained(str(folder))
    else:
        write_pipeline(folder, arch, **kw)
    reference = load_model(str(folder))
    path = root / f"{arch}-original.safetensors"
    if arch == "wan22":
        wan_original_file(path, reference.pipe.transformer)
    else:
        save_file({k: v.contiguous() for k, v in
                   original_state_dict(reference.pipe.transformer, arch).items()}, str(path))
    (root / "loras").mkdir()
    transformer_lora(root / "loras" / "dit.safetensors", reference.pipe.transformer)
    with no_network():
        model = load_model(str(path), components=str(folder))
    library = Library([str(root / "loras")], [], base=str(root))
    hosts = [DiffusersHost(m, library, MaskStore(str(root / "masks"))) for m in (model, reference)]
    return Single(request.param, arch, folder, path, root / "loras", *hosts)


def test_the_file_converts_to_the_written_weights(single):
    """The file is in the published names (diffusers identifies the model by one of them) and
    diffusers' converter gives back every weight of the folder's transformer, bit for bit."""
    from safetensors import safe_open
    weights = single.reference.model.pipe.transformer.state_dict()
    with safe_open(str(single.path), "pt") as f:
        keys = set(f.keys())
    assert IDENTIFIED_BY[single.arch] in keys
    assert not keys & set(weights) or single.arch == "qwenimage"  # none of diffusers' names
    if single.arch == "sd3":  # the layout's own layers, and only those
        layout = SD3_LAYOUTS[single.case]
        assert any(".ln_q." in k for k in keys) == (layout["qk_norm"] is not None)
        assert any(".attn2." in k for k in keys) == bool(layout["dual_attention_layers"])
    model = single.file.model
    assert model.arch == single.arch and model.name == f"{single.arch}-original"
    assert model.pipe.transformer is not single.reference.model.pipe.transformer
    loaded = model.pipe.transformer.state_dict()
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_the_file_draws_the_folders_picture_and_a_lora_changes_it(single):
    plain, _ = image(single.file, "a red square", steps=2)
    assert np.array_equal(plain, image(single.reference, "a red square", steps=2)[0])
    lora, result = image(single.file, "a red square <lora:dit:1>", steps=2)
    assert not result.errors and "Lora hashes" in result.infotexts[0]
    assert np.abs(lora - plain).mean() > 0.5


@pytest.mark.parametrize("single", [pytest.param(c, marks=pytest.mark.slow) if c in OTHER_LAYOUTS
                                    else c for c in CASES], indirect=True)
def test_generate_runs_the_file_offline_with_a_tag(single, tmp_path, capsys):
    """`generate --checkpoint FILE --components FOLDER`: the folder's picture with the LoRA."""
    out, prompt = tmp_path / "file.png", "a red square <lora:dit:1>"
    with no_network():
        assert main(["generate", "--prompt", prompt, "--negative", "blue", "--steps", "2",
                     "--width", "64", "--height", "64", "--seed", "7", "--out", str(out),
                     "--checkpoint", str(single.path), "--components", str(single.folder),
                     "--lora-dir", str(single.loras), "--mask-dir", str(tmp_path / "masks"),
                     "--device", "cpu"]) == 0
    text = capsys.readouterr()
    assert f"Model: {single.arch}-original" in text.out and "netweave:" not in text.err, text.err
    drawn = np.asarray(Image.open(out), dtype=np.float64)
    assert np.array_equal(drawn, image(single.reference, prompt, steps=2)[0])


def test_an_sd3_file_of_another_layout_than_the_components_is_refused_naming_both(single, tmp_path):
    """The three SD3 layouts share their encoders and VAE, so any SD3 folder passes for the
    components of any SD3 file; the transformer, built from the folder's config, would fail
    on a shape (diffusers' error advising to ignore it) or, for SD3.5 Large's file with SD3
    Medium's folder, leave the file's qk norms out unsaid. Each other layout's file is
    refused, both layouts named."""
    if single.arch != "sd3":
        pytest.skip("one layout per family here")
    describe = {"sd3-medium": "2 blocks 16 wide, no qk norms, no second image attention",
                "sd3.5-large": "2 blocks 16 wide, qk norms, no second image attention",
                "sd3.5-medium": "2 blocks 16 wide, qk norms, a second image attention in "
                                "blocks \\[0\\]"}
    for other in SD3_LAYOUTS:
        if other == single.case:
            continue
        path = tmp_path / f"{other}.safetensors"
        save_file({k: v.contiguous() for k, v in
                   original_state_dict(sd3_transformer(other), "sd3").items()}, str(path))
        with pytest.raises(ValueError, match=f"{other}.safetensors: its SD3 transformer has "
                                             f"{describe[other]}; that of --components .* has "
                                             f"{describe[single.case]}: give the diffusers "
                                             "folder of the file's own model"):
            load_model(str(path), components=str(single.folder))


def test_a_qwen_image_file_saved_by_comfyui_under_its_prefix(single, tmp_path):
    """ComfyUI's checkpoint save writes the transformer under `model.diffusion_model.`;
    diffusers reads Qwen-Image's file as it is, so the prefix comes off first. A file lacking
    a tensor is refused (diffusers would leave it unloaded)."""
    if single.arch != "qwenimage":
        pytest.skip("the other families' files are written under the prefix above")
    folder = single.folder
    weights = dict(single.reference.model.pipe.transformer.state_dict())
    path = tmp_path / "comfy.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in weights.items()}, str(path))
    loaded = load_model(str(path), components=str(folder)).pipe.transformer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    del weights["txt_in.weight"]
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    with pytest.raises(ValueError, match="lacks weights of the Qwen-Image transformer.*run a "
                                         "diffusers folder"):
        load_model(str(path), components=str(folder))
