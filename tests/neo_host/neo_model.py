"""The model objects Forge Neo hands extensions as `shared.sd_model`, after Neo's
backend/diffusion_engine/{sd15,flux,qwen}.py (`forge_objects` / `_original` /
`_after_applying_lora`, `current_lora_hash`, `is_sd1`/`is_sdxl`/`is_wan`, the engine's class
name saying the family), backend/modules/k_model.py (`KModel`: `storage_dtype`,
apply_model → diffusion_model(x, t, context=…, control=…, transformer_options=…, **extra
conds) and the denoised prediction back) and backend/patcher/clip.py (a JointTextEncoder of
clip_l, t5xxl, qwen25_7b …). The diffusion models are real torch trees in the module paths
Neo's backend/nn holds: the LDM UNet of `stable-diffusion-sdkit` (nn/unet.py keeps LDM's
names), Flux in BFL's layout (tests/flux_bfl.py; nn/flux.py has the same names) taking Neo's
arguments, and diffusers' Qwen-Image transformer (nn/qwen.py keeps diffusers' names); the text
encoders transformers' CLIP and T5 (Neo's IntegratedCLIP holds them as `.transformer`) and
Neo's own classes for qwen3, qwen25_7b and umt5xxl (backend/nn/llm/llama.py, nn/t5.py); their
layers turned into Neo's layer classes (backend/operations.py)."""
import dataclasses

import torch

from backend import memory_management
from backend.operations import forge_layers
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher


@dataclasses.dataclass
class ForgeObjects:
    """backend/diffusion_engine/base.py: the patchers a model holds; `shallow_copy()`."""

    unet: object
    clip: object
    vae: object = None
    clipvision: object = None

    def shallow_copy(self):
        return dataclasses.replace(self)


class KModel(torch.nn.Module):
    """apply_model: SD predicts noise (input scaled by 1/√(σ²+1), timestep from σ), the flow
    models a velocity (input as it is, timestep σ/σ_max); both return x − σ·prediction."""

    def __init__(self, diffusion_model, flow, storage_dtype=torch.float32):
        super().__init__()
        self.diffusion_model, self.flow = diffusion_model, flow
        self.storage_dtype = self.computation_dtype = storage_dtype

    def apply_model(self, x, t, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = t.view(-1, 1, 1, 1)
        if self.flow:
            xc, timestep = x, t / 8.0
        else:
            xc, timestep = x / (sigma ** 2 + 1) ** 0.5, (t * 100).long().clamp(0, 999)
        out = self.diffusion_model(xc, timestep, context=c_crossattn, control=control,
                                   transformer_options=transformer_options, **kwargs)
        return x - sigma * out.float()


class IntegratedCLIP(torch.nn.Module):
    """backend/nn/clip.py: the Hugging Face text model as `.transformer`."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer


def _make_every_layer_matter(model, seed=5):
    with torch.no_grad():  # zero-initialised output layers would hide every change
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


class Engine:
    """backend/diffusion_engine/base.py's ForgeDiffusionEngine, what NetWeave reads of it."""

    flow = False

    def __init__(self, unet, text, storage_dtype=torch.float32):
        from netweave.extension.tokenizer import clip_tokenizer
        clip = CLIP(text)
        unet = UnetPatcher(KModel(forge_layers(_make_every_layer_matter(unet)), self.flow,
                                  storage_dtype))
        self.forge_objects = ForgeObjects(unet, clip)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.tokenizer = clip_tokenizer()
        self.is_sd1 = self.is_sdxl = self.is_wan = False

    def ids(self, prompts):
        return self.tokenizer(list(prompts), padding="max_length", max_length=77,
                              truncation=True, return_tensors="pt").input_ids

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        return self.encode(self.forge_objects.clip.cond_stage_model, prompts)


def clip_text(width=32, seed=1):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=width,
                                        intermediate_size=2 * width, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407,
                                        pad_token_id=49407))


class StableDiffusion(Engine):
    """diffusion_engine/sd15.py: clip_l."""

    def __init__(self, storage_dtype=torch.float32):
        from tinymodels import ldm_unet
        super().__init__(ldm_unet("sd1"),
                         {"clip_l": IntegratedCLIP(forge_layers(clip_text()))}, storage_dtype)
        self.is_sd1 = True

    def encode(self, text, prompts):
        return text.clip_l.transformer(self.ids(prompts)).last_hidden_state


class NeoFlux(torch.nn.Module):
    """nn/flux.py's IntegratedFluxTransformer2DModel, as Neo calls it: forward(x, timestep,
    context, y, guidance, …, transformer_options) patches the latent 2×2 (channel, then patch
    row and column), text ids zero, image ids (row, column), runs the BFL trunk (text tokens
    first) and unpatches the image tokens. The trunk's modules are this module's children, at
    Neo's paths."""

    def __init__(self, **config):
        super().__init__()
        from flux_bfl import Flux
        self.trunk = Flux(**config)
        for name, child in list(self.trunk.named_children()):
            self.add_module(name, child)  # the same modules at the root, as Neo holds them
        self.__dict__["_trunk"] = self._modules.pop("trunk")

    def forward(self, x, timestep, context, y=None, guidance=None, control=None,
                transformer_options={}, **kwargs):
        b, c, h, w = x.shape
        img = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        img = img.reshape(b, (h // 2) * (w // 2), c * 4)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        img_ids = ids.reshape(1, -1, 3).repeat(b, 1, 1)
        txt_ids = torch.zeros(b, context.shape[1], 3)
        out = self._trunk(img, img_ids, context, txt_ids, timestep, y, guidance)
        out = out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


class Flux(Engine):
    """diffusion_engine/flux.py: clip_l (its pooled output the `vector`) and t5xxl (the
    `crossattn`), the distilled guidance in each cond."""

    flow = True

    def __init__(self, storage_dtype=torch.float32):
        from tinymodels import FLUX_CONTEXT, FLUX_HIDDEN, TE1_WIDTH, t5_text
        torch.manual_seed(3)
        unet = NeoFlux(in_channels=16, hidden=FLUX_HIDDEN, heads=2, depth=2, depth_single=2,
                       context_dim=FLUX_CONTEXT, vec_dim=TE1_WIDTH, axes_dim=(2, 2, 4),
                       guidance_embed=True)
        super().__init__(unet, {"clip_l": IntegratedCLIP(forge_layers(clip_text())),
                                "t5xxl": IntegratedCLIP(forge_layers(t5_text()))},
                         storage_dtype)

    def encode(self, text, prompts):
        ids = self.ids(prompts)
        pooled = text.clip_l.transformer(ids).pooler_output
        t5 = text.t5xxl.transformer(ids[:, :16] % 100).last_hidden_state
        return {"crossattn": t5, "vector": pooled, "guidance": torch.full((len(ids),), 3.5)}


class NeoQwen(torch.nn.Module):
    """nn/qwen.py's QwenImageTransformer2DModel as Neo calls it (x, timesteps, context, …,
    transformer_options): the latent packed 2×2 as Flux packs it, diffusers' transformer (the
    same module names) on the packed tokens, unpacked back."""

    def __init__(self):
        super().__init__()
        from tinydits import qwen_transformer
        model = qwen_transformer()
        for name, child in list(model.named_children()):
            self.add_module(name, child)
        self.__dict__["_model"] = model

    def forward(self, x, timestep, context, control=None, transformer_options={}, **kwargs):
        b, c, h, w = x.shape
        img = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        img = img.reshape(b, (h // 2) * (w // 2), c * 4)
        out = self._model(hidden_states=img, encoder_hidden_states=context,
                          encoder_hidden_states_mask=torch.ones(context.shape[:2], dtype=torch.long),
                          timestep=timestep, img_shapes=[[(1, h // 2, w // 2)]] * b).sample
        out = out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


def qwen3_text(seed=6):
    """Z-Image's `qwen3`: Neo's Qwen3_4B (backend/nn/llm/llama.py), small."""
    from backend.nn.llm.llama import Qwen3_4B
    torch.manual_seed(seed)
    return forge_layers(Qwen3_4B().eval())


def qwen25_text(seed=6):
    """Qwen-Image's `qwen25_7b`: Neo's Qwen25_7BVLI (the language model as `model`, its
    vision tower as `visual`), small, as wide as the tiny transformer's text input."""
    from backend.nn.llm.llama import Config, Qwen25_7BVLI
    from tinydits import QWEN_TEXT
    torch.manual_seed(seed)
    config = Config(hidden_size=QWEN_TEXT, qkv_bias=True, qk_norm=False)
    return forge_layers(Qwen25_7BVLI(config).eval())


def umt5_text(seed=6):
    """Wan's `umt5xxl`: Neo's IntegratedT5 of a umT5 config (backend/nn/t5.py), small."""
    from backend.nn.t5 import IntegratedT5
    from tinydits import WAN_TEXT
    torch.manual_seed(seed)
    return forge_layers(IntegratedT5(dict(model_type="umt5", d_model=WAN_TEXT, d_ff=24,
                                          num_layers=2, num_heads=2, vocab_size=128)).eval())


class QwenImage(Engine):
    """diffusion_engine/qwen.py: one text encoder, `qwen25_7b` (Neo's Qwen25_7BVLI); the
    conditioning its language model's last hidden state."""

    flow = True

    def __init__(self, storage_dtype=torch.float32):
        super().__init__(NeoQwen(), {"qwen25_7b": qwen25_text()}, storage_dtype)
        self.is_wan = True  # Neo sets it for Qwen-Image (its VAE is Wan's)

    def encode(self, text, prompts):
        return text.qwen25_7b(self.ids(prompts)[:, :16] % 128)[0]


class NeoWan(torch.nn.Module):
    """nn/wan.py's WanModel as Neo calls it (x, timestep, context, …, transformer_options):
    its layers at the original (ComfyUI) paths (tests/tinydits.py: wan_to_native) are the very
    layers of a tiny diffusers Wan transformer, which runs the image as one frame. Neo's
    state dict of it is these paths' (a checkpoint's `model.diffusion_model.` keys)."""

    def __init__(self):
        super().__init__()
        from tinydits import Tree, wan_to_native, wan_transformer
        model = wan_transformer()
        layers = {}
        for path, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                hit = wan_to_native(path)
                layers[hit[0] if hit else path] = m
        for name, child in Tree(layers).named_children():
            self.add_module(name, child)
        self.patch_embedding = model.patch_embedding  # a 3-D convolution, the same name
        self.__dict__["_model"] = model

    def forward(self, x, timestep, context, control=None, transformer_options={}, **kwargs):
        out = self._model(hidden_states=x.unsqueeze(2), timestep=timestep,
                          encoder_hidden_states=context).sample
        return out.squeeze(2)


class Wan(Engine):
    """diffusion_engine/wan.py: one text encoder, `umt5xxl` (Neo's IntegratedT5); the
    conditioning its last hidden state. A Wan 2.2 A14B expert (each a Wan 2.1 14B
    transformer), `sd_checkpoint_info` the checkpoint it was loaded from."""

    flow = True

    def __init__(self, storage_dtype=torch.float32, checkpoint_info=None):
        super().__init__(NeoWan(), {"umt5xxl": umt5_text()}, storage_dtype)
        self.is_wan = True
        self.sd_checkpoint_info = checkpoint_info

    def encode(self, text, prompts):
        return text.umt5xxl.transformer(self.ids(prompts)[:, :16] % 128)
