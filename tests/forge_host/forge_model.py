"""The model object Forge hands to extensions as `shared.sd_model`, after Forge dfdcbab's
backend/diffusion_engine/sd15.py (`StableDiffusion`: forge_objects / _original /
_after_applying_lora, current_lora_hash, is_sd1, get_learned_conditioning under
torch.inference_mode() after loading the clip patcher), backend/modules/k_model.py (`KModel`:
apply_model calls diffusion_model(x, t, context=…, control=…, transformer_options=…)) and
backend/nn/clip.py (`IntegratedCLIP`: the HF CLIP as `.transformer`). The UNet is the real
LDM UNet of `stable-diffusion-sdkit` and the text model a real transformers CLIP, their layers
turned into Forge's layer classes (backend/operations.py)."""
import torch

from backend import memory_management
from backend.operations import forge_layers
from backend.patcher.base import CLIP, ForgeObjects, ModelPatcher


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def apply_model(self, x, t, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        return self.diffusion_model(x, t, context=c_crossattn, control=control,
                                    transformer_options=transformer_options, **kwargs)


class IntegratedCLIP(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer


class JointTextEncoder(torch.nn.ModuleDict):
    pass


def text_model():
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))


class StableDiffusion:
    def __init__(self, unet_layers=None):
        """`unet_layers(unet)`: change the UNet before it is wrapped (a quantized layer)."""
        from netweave.extension.tokenizer import clip_tokenizer
        from tinymodels import ldm_unet
        unet = ldm_unet("sd1")
        with torch.no_grad():  # LDM zero-initialises output layers: make every layer matter
            gen = torch.Generator().manual_seed(5)
            for p in unet.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        unet = forge_layers(unet)
        if unet_layers is not None:
            unet_layers(unet)
        clip = CLIP(JointTextEncoder({"clip_l": IntegratedCLIP(forge_layers(text_model()))}))
        self.forge_objects = ForgeObjects(ModelPatcher(KModel(unet)), clip)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.tokenizer = clip_tokenizer()
        self.is_sd1, self.is_sd2, self.is_sdxl = True, False, False

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        clip_l = self.forge_objects.clip.cond_stage_model.clip_l
        return clip_l.transformer(ids).last_hidden_state
