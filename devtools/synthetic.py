"""Synthetic networks: real .safetensors files of every format and key style, with random
factors, covering every layer of a model's trees (tiny test trees, or the real SD trees on the
meta device). Tests check that every key lands where it was written for; benchmarks load and
apply them.

`write_network(path, targets, fmt, style)` returns {layer name in the file: target}, so a test
can check that every key lands on exactly the layer it was written for.
"""
import math

import torch
from safetensors.torch import save_file
from torch import nn

from ..network.keymap import KeyMap, diffusers_to_ldm

# format -> algorithm family as NetWeave reports it
FORMATS = {
    "lora": "lora", "lora_tucker": "lora", "peft": "lora", "dora_out": "dora", "dora_in": "dora",
    "loha": "loha", "loha_tucker": "loha", "lokr": "lokr", "lokr_decomposed": "lokr",
    "glora": "glora", "ia3": "ia3", "oft": "oft", "boft": "boft", "full": "full", "norm": "norm",
}
STYLES = ("kohya", "kohya_ldm", "lycoris", "peft", "oft", "diffusers", "comfy")


def _factor(n):
    """The divisor pair of n closest to √n (smaller first), as LyCORIS' factorization(n, -1)."""
    a = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return a, n // a


def _is_norm(target):
    """A norm's scale: GroupNorm, LayerNorm, or any 1-D weight (a transformer's RMSNorm
    scales are targets too: network/dit_keys.py)."""
    return isinstance(target.module, (nn.GroupNorm, nn.LayerNorm)) or target.weight.dim() == 1


def parts_for(fmt, shape, is_norm, has_bias, rank, rnd):
    """The parts one layer of format `fmt` has for a host weight of `shape`; None when the
    format does not apply to that kind of layer."""
    if fmt == "norm":
        if not is_norm:
            return None
        return {"w_norm": rnd(shape[0]), **({"b_norm": rnd(shape[0])} if has_bias else {})}
    if is_norm:
        return None
    out, inp, ks = shape[0], shape[1], tuple(shape[2:])
    k = math.prod(ks)
    spatial = bool(ks) and k > 1
    ones = (1,) * len(ks)
    alpha = torch.tensor(rank / 2)
    if fmt in ("lora", "peft", "dora_out", "dora_in") or (fmt == "lora_tucker" and not spatial):
        down, up = rnd(rank, inp, *ks), rnd(out, rank, *ones)
        if fmt == "peft":
            return {"lora_A.weight": down, "lora_B.weight": up}
        parts = {"lora_down.weight": down, "lora_up.weight": up, "alpha": alpha}
        if fmt == "dora_out":
            parts["dora_scale"] = rnd(out, 1, *ones).abs() + 1
        elif fmt == "dora_in":
            parts["dora_scale"] = rnd(1, inp, *ones).abs() + 1
        return parts
    if fmt == "lora_tucker":
        return {"lora_down.weight": rnd(rank, inp, *ones), "lora_mid.weight": rnd(rank, rank, *ks),
                "lora_up.weight": rnd(out, rank, *ones), "alpha": alpha}
    if fmt == "loha" or (fmt == "loha_tucker" and not spatial):
        return {"hada_w1_a": rnd(out, rank), "hada_w1_b": rnd(rank, inp * k),
                "hada_w2_a": rnd(out, rank), "hada_w2_b": rnd(rank, inp * k), "alpha": alpha}
    if fmt == "loha_tucker":
        return {"hada_t1": rnd(rank, rank, *ks), "hada_w1_a": rnd(rank, out), "hada_w1_b": rnd(rank, inp),
                "hada_t2": rnd(rank, rank, *ks), "hada_w2_a": rnd(rank, out), "hada_w2_b": rnd(rank, inp),
                "alpha": alpha}
    if fmt in ("lokr", "lokr_decomposed"):
        (a, b), (c, d) = _factor(out), _factor(inp)
        parts = {"lokr_w1": rnd(a, c), "alpha": alpha}
        if fmt == "lokr":
            parts["lokr_w2"] = rnd(b, d, *ks)
        else:
            parts.update(lokr_w2_a=rnd(b, rank), lokr_w2_b=rnd(rank, d * k))
        return parts
    if fmt == "glora":
        if spatial:
            return None  # GLoRA trains on linear layers and 1×1 convs
        return {"a1.weight": rnd(inp, rank), "a2.weight": rnd(rank, inp), "b1.weight": rnd(out, rank),
                "b2.weight": rnd(rank, inp, *ks), "alpha": alpha}
    if fmt == "ia3":
        return {"weight": rnd(out), "on_input": torch.tensor(False)}
    if fmt == "oft":
        block = 4
        return {"oft_blocks": rnd(out // block, block, block), "alpha": torch.tensor(0.0)}
    if fmt == "boft":
        return {"oft_blocks": rnd(2, out // 2, 2, 2), "alpha": torch.tensor(0.0)}
    if fmt == "full":
        parts = {"diff": rnd(*shape)}
        if has_bias:
            parts["diff_b"] = rnd(out)
        return parts
    raise ValueError(fmt)


def layer_name(target, style, arch, ldm_path=None):
    """The name a file of `style` gives a target (kohya, LDM-style kohya, LyCORIS, PEFT, OFT,
    diffusers: a transformer's layers under `transformer.`, as diffusers and ai-toolkit write
    Flux LoRAs; its text encoders as PEFT; comfy: the same names under ComfyUI's
    `diffusion_model.`, as ai-toolkit writes Z-Image LoRAs)."""
    if target.component == "unet":
        d = target.name
        if style in ("diffusers", "comfy"):
            return ("transformer." if style == "diffusers" else "diffusion_model.") + d
        if style == "peft":
            return "unet." + d
        if style == "kohya_ldm":
            return "lora_unet_" + ldm_path.replace(".", "_")
        prefix = {"kohya": "lora_unet_", "lycoris": "lycoris_", "oft": "oft_unet_"}[style]
        return prefix + d.replace(".", "_")
    full = "text_model." + target.name
    if style in ("peft", "diffusers"):
        return ("text_encoder." if target.component == "te1" else "text_encoder_2.") + full
    te = "te" if arch != "sdxl" else target.component
    prefix = "lycoris_" if style == "lycoris" else "lora_"
    return f"{prefix}{te}_" + full.replace(".", "_")


def write_network(path, trees, fmt, style="kohya", arch="sd1", rank=4, dtype=torch.float16,
                  seed=0, metadata=None, components=("unet", "te1", "te2"), scale=0.1,
                  select=None):
    """Write a network file covering every layer of `trees` (of `components`, and for which
    `select(target)` holds when given); returns {layer name: target}."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(shape, generator=gen) * scale).to(dtype)

    keymap = KeyMap(trees)
    unet = trees.get("unet")
    written, tensors = {}, {}
    for target in keymap.targets:
        if target.component not in components or (select is not None and not select(target)):
            continue
        shape = tuple(target.weight.shape)
        has_bias = target.bias_param is not None
        parts = parts_for(fmt, shape, _is_norm(target), has_bias, rank, rnd)
        if parts is None:
            continue
        ldm = None
        if target.component == "unet":
            ldm = target.path if hasattr(unet, "input_blocks") else diffusers_to_ldm(target.name, unet)
        name = layer_name(target, style, arch, ldm)
        written[name] = target
        for part, tensor in parts.items():
            tensors[f"{name}.{part}"] = tensor.contiguous()
    save_file(tensors, str(path), metadata=metadata or {})
    return written
